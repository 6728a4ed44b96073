"""Offline export of pretrained audio encoders (BEATs, CED, EfficientAT-MN) to ONNX. Uses torch."""

EXPORTER_VERSION = "0.3.0"  # 0.3.0: EfficientAT split-DFT front-end (frontend_stft); 0.2.0: poolings
