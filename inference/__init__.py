"""A checkpoint's networks applied to a scan on its own grid (PyTorch or ONNX Runtime)."""
