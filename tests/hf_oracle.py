"""Build tiny random transformers GptOssForCausalLM models and write them as checkpoints (the oracle's side)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from gptoss.config import GptOssConfig, default_layer_types
from gptoss.formats import mxfp4
from gptoss.formats.checkpoint_write import write_checkpoint


@dataclasses.dataclass(frozen=True)
class OracleCase:
    name: str
    heads: int
    kv_heads: int
    window: int
    seq: int
    layers: int = 3
    hidden: int = 64
    head_dim: int = 16
    experts: int = 8
    top_k: int = 4
    intermediate: int = 64
    vocab: int = 300
    layout: str = "hf"  # hf | original | dense (dequantized input-major experts)
    bf16: bool = False
    params_dtype: str = "float32"  # gptoss convert --dtype

    def config(self) -> GptOssConfig:
        return GptOssConfig(
            vocab_size=self.vocab,
            hidden_size=self.hidden,
            intermediate_size=self.intermediate,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads,
            head_dim=self.head_dim,
            num_local_experts=self.experts,
            num_experts_per_tok=self.top_k,
            sliding_window=self.window,
            layer_types=default_layer_types(self.layers),
        )


def hf_model(case: OracleCase, seed: int = 0):
    """A random-weight ``GptOssForCausalLM`` in float32 whose expert weights are exactly MXFP4-representable."""
    from transformers import GptOssConfig as HFConfig
    from transformers import GptOssForCausalLM

    torch.manual_seed(seed)
    hf_cfg = HFConfig(**{k: v for k, v in case.config().to_hf_dict().items() if k not in ("architectures",)})
    hf_cfg._attn_implementation = "eager"
    model = GptOssForCausalLM(hf_cfg).eval().float()
    rng = np.random.default_rng(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = {"sinks": 1.0}.get(name.rsplit(".", 1)[-1], 0.0)
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(torch.from_numpy(1 + 0.1 * rng.standard_normal(p.shape).astype(np.float32)))
            elif name.endswith("sinks"):
                p.copy_(torch.from_numpy(std * rng.standard_normal(p.shape).astype(np.float32)))
            elif name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
                fan_in = p.shape[1]
                scale = 4.0 if "gate_up" in name else 1.0
                w = (scale / np.sqrt(fan_in)) * rng.standard_normal(p.shape).astype(np.float32)
                # HF stores experts input-major [E, in, out]; MXFP4 quantizes along `in` of [E, out, in].
                blocks, scales = mxfp4.encode(w.transpose(0, 2, 1))
                p.copy_(torch.from_numpy(mxfp4.decode(blocks, scales).transpose(0, 2, 1).copy()))
            elif name.endswith("bias"):
                p.copy_(torch.from_numpy(0.3 * rng.standard_normal(p.shape).astype(np.float32)))
            else:
                fan_in = p.shape[-1]
                gain = 2.0 if "router" in name else 1.0
                p.copy_(torch.from_numpy((gain / np.sqrt(fan_in)) * rng.standard_normal(p.shape).astype(np.float32)))
            if case.bf16:
                p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model


def hf_tensors(model, case: OracleCase):
    """The model's weights under HF checkpoint names (MXFP4 experts unless ``case.layout == 'dense'``)."""
    import ml_dtypes

    for name, p in model.state_dict().items():
        arr = p.detach().numpy()
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            if case.layout != "dense":
                blocks, scales = mxfp4.encode(arr.transpose(0, 2, 1))
                yield f"{name}_blocks", blocks
                yield f"{name}_scales", scales
                continue
        yield name, arr.astype(ml_dtypes.bfloat16) if case.bf16 else arr


def write_case(model, case: OracleCase, folder: Path) -> Path:
    write_checkpoint(
        folder,
        case.config(),
        hf_tensors(model, case),
        layout="original" if case.layout == "original" else "hf",
        shard_bytes=200_000,
    )
    return folder / "original" if case.layout == "original" else folder
