"""Names shared by the model, the graphs and the tools that read them: the graph input, the per-block debug taps,
the external-data file and the checkpoint tensor names of both layouts. Kept free of heavy imports, so ``gate``,
``plots`` and ``promote`` use them without loading JAX."""

from __future__ import annotations

import re
from pathlib import Path

INPUT_NAME = "input_ids"
# The decoder graph's other inputs and its outputs (onnxruntime-genai's names): per layer i, %d -> i.
MASK_NAME = "attention_mask"
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
PAST_KEY, PAST_VALUE = PAST_PREFIX + "%d.key", PAST_PREFIX + "%d.value"
PRESENT_KEY, PRESENT_VALUE = PRESENT_PREFIX + "%d.key", PRESENT_PREFIX + "%d.value"

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


WEIGHTS_FILE = "model.onnx.data"


def data_path(onnx_path: Path) -> Path:
    """The weights of a graph: ``model.onnx.data`` in its folder, which every graph of a model there shares
    (``x/model.onnx`` and ``x/decoder.onnx`` both read ``x/model.onnx.data``)."""
    return onnx_path.with_name(WEIGHTS_FILE)


# --- checkpoint tensor names -------------------------------------------------------------------------------------
# Hugging Face names -> OpenAI's original/ names, one to one: reading an original/ checkpoint by HF names and
# writing one from HF tensors both use it. Per layer, after `model.layers.{i}.` (HF) and `block.{i}.` (original).
# Not in the table: q/k/v, which original/ fuses into `attn.qkv.{weight,bias}` (q, then k, then v along the rows).
HF_TO_ORIGINAL = {
    "model.embed_tokens.weight": "embedding.weight",
    "model.norm.weight": "norm.scale",
    "lm_head.weight": "unembedding.weight",
}
HF_TO_ORIGINAL_LAYER = {
    "input_layernorm.weight": "attn.norm.scale",
    "post_attention_layernorm.weight": "mlp.norm.scale",
    "self_attn.sinks": "attn.sinks",
    "self_attn.o_proj.weight": "attn.out.weight",
    "self_attn.o_proj.bias": "attn.out.bias",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.router.bias": "mlp.gate.bias",
    "mlp.experts.gate_up_proj_blocks": "mlp.mlp1_weight.blocks",
    "mlp.experts.gate_up_proj_scales": "mlp.mlp1_weight.scales",
    "mlp.experts.gate_up_proj_bias": "mlp.mlp1_bias",
    "mlp.experts.down_proj_blocks": "mlp.mlp2_weight.blocks",
    "mlp.experts.down_proj_scales": "mlp.mlp2_weight.scales",
    "mlp.experts.down_proj_bias": "mlp.mlp2_bias",
}
QKV = ("q_proj", "k_proj", "v_proj")
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_ORIGINAL_LAYER = re.compile(r"^block\.(\d+)\.(.+)$")


def original_name(hf: str) -> str | None:
    """The original/ name of an HF tensor (None for q/k/v, which are fused, and for unknown names)."""
    if hf in HF_TO_ORIGINAL:
        return HF_TO_ORIGINAL[hf]
    m = _HF_LAYER.match(hf)
    rest = HF_TO_ORIGINAL_LAYER.get(m.group(2)) if m else None
    return f"block.{m.group(1)}.{rest}" if rest else None


def fused_qkv(hf: str) -> tuple[str, int] | None:
    """For an HF q/k/v tensor: the original/ fused tensor holding it and its index (0 q, 1 k, 2 v)."""
    m = _HF_LAYER.match(hf)
    if not m:
        return None
    module, _, kind = m.group(2).rpartition(".")
    proj = module.removeprefix("self_attn.")
    if proj not in QKV or not module.startswith("self_attn."):
        return None
    return f"block.{m.group(1)}.attn.qkv.{kind}", QKV.index(proj)
