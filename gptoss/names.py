"""Names shared by the model, the graphs and the tools that read them: the graph input, the per-block debug taps
and the external-data file. Kept free of heavy imports, so ``gate``, ``plots`` and ``promote`` use them without
loading JAX."""

from __future__ import annotations

from pathlib import Path

INPUT_NAME = "input_ids"

# Per-block debug taps, in forward order (the order `parity` uses to localise a discrepancy).
BLOCK_TAPS = (
    "input",
    "attn_norm",
    "q",
    "k",
    "v",
    "attn_output",
    "post_attn_residual",
    "mlp_norm",
    "router_logits",
    "expert_indices",
    "expert_weights",
    "expert_preact",
    "expert_act",
    "expert_out",
    "moe_output",
    "output",
)


def data_path(onnx_path: Path) -> Path:
    """``x/model.onnx`` → ``x/model.onnx.data``."""
    return onnx_path.with_name(onnx_path.name + ".data")
