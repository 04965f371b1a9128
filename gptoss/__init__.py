"""GPT-OSS checkpoints to numerically proven ONNX graphs."""

import os

__version__ = "0.1.0"

# XLA's oneDNN matmul path keeps re-laid-out copies of large weights alive next to the originals; the default
# Eigen path computes the same in place. XLA's concurrency-optimised CPU scheduler starts every independent op as
# early as it can, so the float32 casts of a bfloat16 block's weight slices would all be alive together; the
# memory-minimising scheduler casts each slice where it is used. (What each costs: docs/performance.md.)
_XLA_DEFAULTS = {"xla_cpu_use_onednn": "false", "xla_cpu_enable_concurrency_optimized_scheduler": "false"}
for _flag, _value in _XLA_DEFAULTS.items():
    if _flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --{_flag}={_value}".strip()
