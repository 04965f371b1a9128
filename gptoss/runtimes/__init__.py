"""Each runtime that runs the model (JAX, ONNX Runtime, onnxruntime-genai, transformers), one module each."""
