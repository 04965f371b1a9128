"""GPT-OSS checkpoints to numerically proven ONNX graphs."""

__version__ = "0.1.0"
