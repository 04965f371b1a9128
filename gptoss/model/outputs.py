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


def segment_output_names(cfg: GptOssConfig, first: int, last: int, debug: bool) -> list[str]:
    """The outputs of the segment of ranks ``first`` to ``last`` (0 the embedding, ``i + 1`` block ``i``,
    ``layers + 1`` the head), as the whole graph names them. Canonical (``debug`` False): the value leaving it
    (``block_0_input``, ``hidden_state_{i}`` or ``logits``). Debug: every whole-graph output it computes, each in
    one segment only: a block's input tap is the output of the block (or embedding) before it."""
    layers = cfg.num_hidden_layers
    blocks = range(max(first, 1) - 1, min(last, layers))
    names = ["block_0_input"] if first == 0 else []
    for i in blocks:
        if debug:
            names.append(f"hidden_state_{i}")
            names.extend(f"block_{i}_{tap}" for tap in BLOCK_TAPS if tap != "input")
            names.extend([f"block_{i + 1}_input"] if i + 1 < layers else [])
        elif i == blocks[-1]:
            names.append(f"hidden_state_{i}")
    return names + (["logits"] if last == layers + 1 else [])


def segment_input_name(first: int) -> str | None:
    """The hidden state entering the segment that starts at rank ``first``, as the whole graph names it."""
    if first == 0:
        return None
    return "block_0_input" if first == 1 else f"hidden_state_{first - 2}"
