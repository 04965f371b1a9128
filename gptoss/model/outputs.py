"""The forward pass's named outputs (the ONNX output names): ``logits``, ``hidden_state_{i}``, ``block_{i}_{tap}``.
Free of JAX, so the gate and the plots read it too."""

from __future__ import annotations

from gptoss.config import GptOssConfig

# Per-block debug taps, in forward order (the order the gate uses to localise a discrepancy).
BLOCK_TAPS = tuple(
    "input attn_norm q k v attn_output post_attn_residual mlp_norm router_logits expert_indices "
    "expert_weights expert_preact expert_act expert_out moe_output output".split()
)


def output_names(cfg: GptOssConfig, emit_hidden_states: bool, emit_block_debug: bool) -> list[str]:
    """The forward pass's output names, in order."""
    names = ["logits"]
    for i in range(cfg.num_hidden_layers):
        if emit_hidden_states:
            names.append(f"hidden_state_{i}")
        if emit_block_debug:
            names.extend(f"block_{i}_{tap}" for tap in BLOCK_TAPS)
    return names
