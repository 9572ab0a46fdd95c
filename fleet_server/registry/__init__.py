"""The model registry: named ML models and their immutable, semantically versioned ONNX
uploads."""
