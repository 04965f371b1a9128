"""GPT-OSS checkpoints to numerically proven ONNX graphs."""

import os

__version__ = "0.1.0"

# XLA on CPU: no oneDNN matmuls (they keep re-laid-out copies of large weights alive), and the memory-minimising
# scheduler (the concurrency-optimised one casts all of a bfloat16 block's weight slices at once; docs/performance.md).
for _flag in ("xla_cpu_use_onednn", "xla_cpu_enable_concurrency_optimized_scheduler"):
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_flag}=false".strip()
