"""Offline export of pretrained audio encoders (BEATs, CED, EfficientAT-MN) to ONNX. Uses torch."""

EXPORTER_VERSION = "0.2.0"  # 0.2.0: output_poolings and gem_p metadata, several poolings
