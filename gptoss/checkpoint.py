"""Read a GPT-OSS checkpoint folder (HF or OpenAI ``original/`` layout) into our parameter names.

Tensors are read from the safetensors files one at a time when they are needed, and only for the layers kept.
The layout is detected from the tensor names.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from gptoss import mxfp4
from gptoss.config import GptOssConfig, load_checkpoint_config
from gptoss.errors import GptOssError
from gptoss.model import WEIGHT_FORMATS, param_specs
from gptoss.names import fused_qkv, original_name
from gptoss.safetensors_io import TensorStore

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
_LAYER = re.compile(r"^layers\.(\d+)\.(.+)$")


def hf_source(ours: str) -> tuple[str, str]:
    """Our parameter name -> (HF tensor name, kind): kind is ``transpose`` (a Linear kernel), ``experts`` (MXFP4
    or dequantized experts) or ``copy``."""
    m = _LAYER.match(ours)
    prefix, rest = (f"model.layers.{m.group(1)}.", m.group(2)) if m else ("", ours)
    module, _, leaf = rest.rpartition(".")
    if module in OURS_TO_HF_LINEAR:
        return f"{prefix}{OURS_TO_HF_LINEAR[module]}.{'weight' if leaf == 'kernel' else leaf}", (
            "transpose" if leaf == "kernel" else "copy"
        )
    if rest in OURS_TO_HF_EXPERTS:
        return prefix + OURS_TO_HF_EXPERTS[rest], "experts"
    if rest in OURS_TO_HF_MXFP4:
        return prefix + OURS_TO_HF_MXFP4[rest], "mxfp4"
    if rest in OURS_TO_HF:
        return prefix + OURS_TO_HF[rest], "copy"
    raise KeyError(f"no checkpoint tensor for parameter {ours!r}")


def _count_nonfinite(a: np.ndarray, rows: int = 1 << 16) -> int:
    """NaN/Inf count, a block of leading rows at a time (a whole-array mask would be one more big temporary)."""
    flat = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(-1, 1)
    return sum(int((~np.isfinite(flat[i : i + rows])).sum()) for i in range(0, flat.shape[0], rows))


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint folder opened for reading: its config, layout and tensors, read by their HF names whatever
    the layout (original/ tensors are renamed, and q/k/v sliced out of the fused qkv)."""

    config: GptOssConfig
    layout: str  # "hf" | "original"
    store: TensorStore

    @classmethod
    def open(cls, folder: Path) -> Checkpoint:
        folder = Path(folder)
        if not folder.is_dir():
            raise GptOssError(f"{folder}: checkpoint folder not found")
        config = load_checkpoint_config(folder)
        store = TensorStore.open(folder)
        if "model.embed_tokens.weight" in store:
            layout = "hf"
        elif "embedding.weight" in store:
            layout = "original"
        else:
            raise GptOssError(
                f"{folder}: unrecognised tensor names (neither 'model.embed_tokens.weight' (HF) nor "
                "'embedding.weight' (original/) found)"
            )
        return cls(config, layout, store)

    def _stored(self, hf: str) -> tuple[str, slice | None]:
        """Where an HF tensor is stored: its name in this checkpoint and, for original/'s fused qkv, its rows."""
        if self.layout == "hf":
            return hf, None
        if fused := fused_qkv(hf):
            name, index = fused
            cfg = self.config
            sizes = [cfg.num_attention_heads * cfg.head_dim] + [cfg.num_key_value_heads * cfg.head_dim] * 2
            return name, slice(sum(sizes[:index]), sum(sizes[: index + 1]))
        return original_name(hf) or hf, None

    def __contains__(self, hf: str) -> bool:
        return self._stored(hf)[0] in self.store

    def get(self, hf: str) -> np.ndarray:
        """A tensor by its HF name, read from its file."""
        name, rows = self._stored(hf)
        tensor = self.store.get(name)
        return tensor if rows is None else tensor[rows]

    def file_of(self, hf: str) -> Path:
        return self.store.file_of(self._stored(hf)[0])

    def sources(self, names: list[str], dtype: np.dtype) -> dict[str, Callable[[], np.ndarray]]:
        """Our param name -> a function that reads that tensor (stored dtype, cast later; MXFP4 experts are
        decoded straight to ``dtype``)."""
        sources = {}
        for ours in names:
            hf, kind = hf_source(ours)
            if kind == "experts":
                sources[ours] = self._experts(hf, dtype)
            elif kind == "mxfp4" and hf not in self:
                dense = hf.rsplit("_", 1)[0]
                found = f"the dequantized {dense!r}" if dense in self else f"no {hf!r}"
                raise GptOssError(
                    f"{self.store.file_of(next(self.store.names()))}: dtype mxfp4 keeps the experts as MXFP4 blocks "
                    f"and scales, but this checkpoint has {found}; convert it with --dtype float32 or bfloat16"
                )
            elif kind == "transpose":
                sources[ours] = lambda hf=hf: self.get(hf).T
            else:
                sources[ours] = lambda hf=hf: self.get(hf)
        return sources

    def _experts(self, hf: str, dtype: np.dtype) -> Callable[[], np.ndarray]:
        """HF experts: MXFP4 ``{hf}_blocks/_scales`` or the dequantized ``{hf}`` (stored input-major)."""
        if f"{hf}_blocks" in self:
            return lambda: self._decode_experts(f"{hf}_blocks", f"{hf}_scales", dtype)
        # Trap: dequantized HF experts are already [E, in, out] (input-major): no transpose.
        return lambda: self.get(hf)

    def _decode_experts(self, blocks: str, scales: str, dtype: np.dtype) -> np.ndarray:
        """MXFP4 experts ``blocks``/``scales`` (``[E, out, ...]``) → our ``[E, in, out]`` kernel in ``dtype``.

        Decoded one expert at a time straight into the result: the float32 decode of a whole 20b tensor
        (2.1 GB) and its transposed copy never exist. Mismatched shapes are a clear error naming both tensors.
        Trap: ``down_proj`` is square for gpt-oss-20b (2880×2880), so a missing transpose keeps the shapes right.
        """
        b, s = self.get(blocks), self.get(scales)
        try:
            mxfp4.check_shapes(b, s)
            if b.ndim != 4:
                raise ValueError(f"MXFP4 experts {b.shape}: expected [experts, out, groups, 16]")
        except ValueError as exc:
            raise GptOssError(f"{self.file_of(blocks)}: tensors {blocks!r} and {scales!r}: {exc}") from None
        experts, out_features, groups, _ = b.shape
        out = np.empty((experts, groups * mxfp4.GROUP, out_features), dtype=dtype)
        for e in range(experts):
            out[e] = mxfp4.decode(b[e], s[e]).T  # [out, in] -> [in, out]
        return out


def load_params(
    folder: Path, num_layers: int | None = None, dtype: str = "float32"
) -> tuple[GptOssConfig, GptOssConfig, dict[str, jax.ShapeDtypeStruct], dict[str, Callable[[], np.ndarray]]]:
    """Open ``folder``; return the checkpoint's config, the truncated config, and name → spec and name → loader
    of each param.

    Each loader reads one tensor, checks its shape against the model and that it is finite, and casts
    it to ``dtype`` (norm scales stay float32).
    """
    if dtype not in WEIGHT_FORMATS:
        raise GptOssError(f"--dtype {dtype!r} is not supported; choose one of {sorted(WEIGHT_FORMATS)}")
    ckpt = Checkpoint.open(folder)
    cfg = ckpt.config.truncated(ckpt.config.num_hidden_layers if num_layers is None else num_layers)
    specs = param_specs(cfg, dtype)
    sources = ckpt.sources(list(specs), np.dtype(WEIGHT_FORMATS[dtype][0]))

    def loader(name: str) -> Callable[[], np.ndarray]:
        def load() -> np.ndarray:
            raw = sources[name]()
            spec = specs[name]
            if tuple(raw.shape) != tuple(spec.shape):
                raise GptOssError(
                    f"{folder}: tensor for {name!r} has shape {list(raw.shape)}, expected {list(spec.shape)} "
                    "from config.json"
                )
            out = np.ascontiguousarray(raw, dtype=np.dtype(spec.dtype))
            if name.endswith("_scales") and (nan := int(np.count_nonzero(out == mxfp4.E8M0_NAN))):
                raise GptOssError(f"{folder}: MXFP4 scales for {name!r} hold {nan} NaN scales (0xFF)")
            if bad := _count_nonfinite(out):
                raise GptOssError(f"{folder}: tensor for {name!r} has {bad} NaN/Inf values")
            return out

        return load

    return ckpt.config, cfg, specs, {name: loader(name) for name in specs}
