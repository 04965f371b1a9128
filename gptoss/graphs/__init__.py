"""ONNX graphs of the model: tracing, rewrite passes, the shared weights file and onnxruntime-genai's contract."""
