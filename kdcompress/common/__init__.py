"""What several subpackages need, in one lower place: ONNX conversion and onnxruntime sessions, static
int8 quantization, checkpoints, the host CPU, processes (torchrun/DDP) and MLflow tracking."""
