"""ONNX Runtime: sessions and providers, adapter files, serving with hot-swapped adapters,
fusions."""
