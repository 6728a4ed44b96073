"""Offline export of pretrained audio encoders (BEATs, CED, EfficientAT-MN) to ONNX. Uses torch."""

EXPORTER_VERSION = "0.1.0"
