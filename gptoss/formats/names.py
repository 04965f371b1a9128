"""Checkpoint tensor names: Hugging Face's, OpenAI's original/ ones, and which of ours each one holds."""

from __future__ import annotations

import re

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
_HF_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_HF_QKV = re.compile(r"^model\.layers\.(\d+)\.self_attn\.([qkv])_proj\.([^.\n]*)$")


def original_name(hf: str) -> str | None:
    """The original/ name of an HF tensor (None for q/k/v, which are fused, and for unknown names)."""
    if hf in HF_TO_ORIGINAL:
        return HF_TO_ORIGINAL[hf]
    m = _HF_LAYER.match(hf)
    rest = HF_TO_ORIGINAL_LAYER.get(m.group(2)) if m else None
    return f"block.{m.group(1)}.{rest}" if rest else None


def fused_qkv(hf: str) -> tuple[str, int] | None:
    """For an HF q/k/v tensor: the original/ fused tensor holding it and its index (0 q, 1 k, 2 v)."""
    m = _HF_QKV.match(hf)
    return (f"block.{m.group(1)}.attn.qkv.{m.group(3)}", "qkv".index(m.group(2))) if m else None


# Our parameter -> its HF tensor (in the model's layers: after `layers.{i}.` and `model.layers.{i}.`). Linear
# modules map as modules: our `X.kernel` is HF's `X.weight` transposed (torch's [out, in] -> our [in, out]) and
# `X.bias` is `X.bias`. The experts are HF's MXFP4 `{name}_blocks`/`_scales` or the dequantized `{name}`.
OURS_TO_HF_LINEAR = {
    "unembed": "lm_head",
    "attn.q_proj": "self_attn.q_proj",
    "attn.k_proj": "self_attn.k_proj",
    "attn.v_proj": "self_attn.v_proj",
    "attn.o_proj": "self_attn.o_proj",
    "mlp.router": "mlp.router",
}
OURS_TO_HF = {
    "embed.embedding": "model.embed_tokens.weight",
    "norm.scale": "model.norm.weight",
    "attn_norm.scale": "input_layernorm.weight",
    "mlp_norm.scale": "post_attention_layernorm.weight",
    "attn.sinks": "self_attn.sinks",
    "mlp.gate_up_bias": "mlp.experts.gate_up_proj_bias",
    "mlp.down_bias": "mlp.experts.down_proj_bias",
}
OURS_TO_HF_EXPERTS = {"mlp.gate_up_kernel": "mlp.experts.gate_up_proj", "mlp.down_kernel": "mlp.experts.down_proj"}
# dtype mxfp4: the experts' MXFP4 tensors themselves, copied as they are.
OURS_TO_HF_MXFP4 = {
    f"mlp.{ours}_{part}": f"mlp.experts.{ours}_proj_{part}"
    for ours in ("gate_up", "down")
    for part in ("blocks", "scales")
}
_OURS_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def hf_source(ours: str) -> tuple[str, str]:
    """Our parameter name -> (HF tensor name, kind): kind is ``transpose`` (a Linear kernel), ``experts`` (MXFP4
    or dequantized experts) or ``copy``."""
    m = _OURS_LAYER.match(ours)
    prefix, rest = (f"model.layers.{m.group(1)}.", m.group(2)) if m else ("", ours)
    module, _, leaf = rest.rpartition(".")
    if module in OURS_TO_HF_LINEAR:
        kernel = leaf == "kernel"
        return f"{prefix}{OURS_TO_HF_LINEAR[module]}.{'weight' if kernel else leaf}", "transpose" if kernel else "copy"
    if rest in OURS_TO_HF_EXPERTS:
        return prefix + OURS_TO_HF_EXPERTS[rest], "experts"
    if rest in OURS_TO_HF_MXFP4:
        return prefix + OURS_TO_HF_MXFP4[rest], "mxfp4"
    if rest in OURS_TO_HF:
        return prefix + OURS_TO_HF[rest], "copy"
    raise KeyError(f"no checkpoint tensor for parameter {ours!r}")
