"""GPT-OSS checkpoints to numerically proven ONNX graphs."""

import os

__version__ = "0.1.0"

# XLA's oneDNN matmul path keeps re-laid-out copies of large weights alive next to the originals: measured on
# the 2-layer gpt-oss-20b forward pass, +2 GB peak. The default Eigen path computes the same in place.
if "xla_cpu_use_onednn" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_cpu_use_onednn=false").strip()
