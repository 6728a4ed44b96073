"""The frozen encoders: ONNX Runtime sessions, model sets (one encoder or an ensemble), embeddings of files."""
