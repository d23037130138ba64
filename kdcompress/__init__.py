"""kdcompress: distil a large image classifier into a small ONNX student."""

__version__ = "0.1.0"
