"""On-device: export to ONNX/TorchScript, int8 quantization, fast prediction on image files."""
