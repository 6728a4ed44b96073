"""edge-asd runtime: frozen audio encoder (ONNX) + kNN memory banks + alerts. Never imports torch."""

__version__ = "0.1.0"
