"""Deployment: the ONNX export and its metadata, the int8 gate and the search over int8
configurations, latency and memory profiling, the shipping decision and the torch-free predictor
that ships beside the model."""
