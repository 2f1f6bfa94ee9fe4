"""Serving: export a run to ONNX / TorchScript / a Triton model repository, and serve it."""
