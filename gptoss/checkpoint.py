"""Read a GPT-OSS checkpoint folder (HF or OpenAI ``original/`` layout) into our parameter names.

Tensors are read lazily from memory-mapped safetensors, one at a time, and only for the layers kept
(DESIGN §4). Layout is detected from the tensor names.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import jax
import ml_dtypes
import numpy as np

from gptoss import mxfp4
from gptoss.config import GptOssConfig, load_checkpoint_config
from gptoss.errors import GptOssError
from gptoss.model import param_specs
from gptoss.safetensors_io import TensorStore

DTYPES = {"float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16)}


def _t(a: np.ndarray) -> np.ndarray:
    """``[out, in]`` (torch Linear) → ``[in, out]`` (our kernels)."""
    return a.T


def _count_nonfinite(a: np.ndarray, rows: int = 1 << 16) -> int:
    """NaN/Inf count, a block of leading rows at a time (a whole-array mask would be one more big temporary)."""
    flat = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(-1, 1)
    return sum(int((~np.isfinite(flat[i : i + rows])).sum()) for i in range(0, flat.shape[0], rows))


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint folder opened for reading: its config, layout and tensors."""

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

    def sources(self, num_layers: int, dtype: np.dtype) -> dict[str, Callable[[], np.ndarray]]:
        """Our param name → a function that reads and reshapes that tensor (stored dtype, cast later; MXFP4
        experts are decoded straight to ``dtype``)."""
        if self.layout == "hf":
            return self._hf_sources(num_layers, dtype)
        return self._original_sources(num_layers, dtype)

    def _get(self, name: str) -> np.ndarray:
        return self.store.get(name)

    def _decode_experts(self, blocks: str, scales: str, dtype: np.dtype) -> np.ndarray:
        """MXFP4 experts ``blocks``/``scales`` (``[E, out, ...]``) → our ``[E, in, out]`` kernel in ``dtype``.

        Decoded one expert at a time straight into the result: the float32 decode of a whole 20b tensor
        (2.1 GB) and its transposed copy never exist. Mismatched shapes are a clear error naming both tensors.
        Trap: ``down_proj`` is square for gpt-oss-20b (2880×2880), so a missing transpose keeps the shapes right.
        """
        b, s = self._get(blocks), self._get(scales)
        try:
            mxfp4.check_shapes(b, s)
            if b.ndim != 4:
                raise ValueError(f"MXFP4 experts {b.shape}: expected [experts, out, groups, 16]")
        except ValueError as exc:
            raise GptOssError(f"{self.store.file_of(blocks)}: tensors {blocks!r} and {scales!r}: {exc}") from None
        experts, out_features, groups, _ = b.shape
        out = np.empty((experts, groups * mxfp4.GROUP, out_features), dtype=dtype)
        for e in range(experts):
            out[e] = mxfp4.decode(b[e], s[e]).T  # [out, in] -> [in, out]
        return out

    def _mxfp4_or_dense(self, prefix: str, dtype: np.dtype) -> Callable[[], np.ndarray]:
        """HF experts: MXFP4 ``{prefix}_blocks/_scales`` or the dequantized ``{prefix}`` (stored input-major)."""
        if f"{prefix}_blocks" in self.store:
            return lambda: self._decode_experts(f"{prefix}_blocks", f"{prefix}_scales", dtype)
        # Trap: dequantized HF experts are already [E, in, out] (input-major): no transpose.
        return lambda: self._get(prefix)

    def _hf_sources(self, num_layers: int, dtype: np.dtype) -> dict[str, Callable[[], np.ndarray]]:
        g = self._get
        src: dict[str, Callable[[], np.ndarray]] = {
            "embed.embedding": lambda: g("model.embed_tokens.weight"),
            "norm.scale": lambda: g("model.norm.weight"),
            "unembed.kernel": lambda: _t(g("lm_head.weight")),
        }
        for i in range(num_layers):
            p, ours = f"model.layers.{i}", f"layers.{i}"
            src[f"{ours}.attn_norm.scale"] = lambda p=p: g(f"{p}.input_layernorm.weight")
            src[f"{ours}.mlp_norm.scale"] = lambda p=p: g(f"{p}.post_attention_layernorm.weight")
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                src[f"{ours}.attn.{proj}.kernel"] = lambda p=p, proj=proj: _t(g(f"{p}.self_attn.{proj}.weight"))
                src[f"{ours}.attn.{proj}.bias"] = lambda p=p, proj=proj: g(f"{p}.self_attn.{proj}.bias")
            src[f"{ours}.attn.sinks"] = lambda p=p: g(f"{p}.self_attn.sinks")
            src[f"{ours}.mlp.router.kernel"] = lambda p=p: _t(g(f"{p}.mlp.router.weight"))
            src[f"{ours}.mlp.router.bias"] = lambda p=p: g(f"{p}.mlp.router.bias")
            src[f"{ours}.mlp.gate_up_kernel"] = self._mxfp4_or_dense(f"{p}.mlp.experts.gate_up_proj", dtype)
            src[f"{ours}.mlp.gate_up_bias"] = lambda p=p: g(f"{p}.mlp.experts.gate_up_proj_bias")
            src[f"{ours}.mlp.down_kernel"] = self._mxfp4_or_dense(f"{p}.mlp.experts.down_proj", dtype)
            src[f"{ours}.mlp.down_bias"] = lambda p=p: g(f"{p}.mlp.experts.down_proj_bias")
        return src

    def _original_sources(self, num_layers: int, dtype: np.dtype) -> dict[str, Callable[[], np.ndarray]]:
        g, cfg = self._get, self.config
        q_rows = cfg.num_attention_heads * cfg.head_dim
        kv_rows = cfg.num_key_value_heads * cfg.head_dim
        # OpenAI's fused qkv stacks q, then k, then v along the output rows.
        qkv_slices = {
            "q_proj": slice(0, q_rows),
            "k_proj": slice(q_rows, q_rows + kv_rows),
            "v_proj": slice(q_rows + kv_rows, q_rows + 2 * kv_rows),
        }
        src: dict[str, Callable[[], np.ndarray]] = {
            "embed.embedding": lambda: g("embedding.weight"),
            "norm.scale": lambda: g("norm.scale"),
            "unembed.kernel": lambda: _t(g("unembedding.weight")),
        }

        def mlp_weight(name: str) -> Callable[[], np.ndarray]:
            return lambda: self._decode_experts(f"{name}.blocks", f"{name}.scales", dtype)

        for i in range(num_layers):
            p, ours = f"block.{i}", f"layers.{i}"
            src[f"{ours}.attn_norm.scale"] = lambda p=p: g(f"{p}.attn.norm.scale")
            src[f"{ours}.mlp_norm.scale"] = lambda p=p: g(f"{p}.mlp.norm.scale")
            for proj, rows in qkv_slices.items():
                src[f"{ours}.attn.{proj}.kernel"] = lambda p=p, rows=rows: _t(g(f"{p}.attn.qkv.weight")[rows])
                src[f"{ours}.attn.{proj}.bias"] = lambda p=p, rows=rows: g(f"{p}.attn.qkv.bias")[rows]
            src[f"{ours}.attn.o_proj.kernel"] = lambda p=p: _t(g(f"{p}.attn.out.weight"))
            src[f"{ours}.attn.o_proj.bias"] = lambda p=p: g(f"{p}.attn.out.bias")
            src[f"{ours}.attn.sinks"] = lambda p=p: g(f"{p}.attn.sinks")
            src[f"{ours}.mlp.router.kernel"] = lambda p=p: _t(g(f"{p}.mlp.gate.weight"))
            src[f"{ours}.mlp.router.bias"] = lambda p=p: g(f"{p}.mlp.gate.bias")
            src[f"{ours}.mlp.gate_up_kernel"] = mlp_weight(f"{p}.mlp.mlp1_weight")
            src[f"{ours}.mlp.gate_up_bias"] = lambda p=p: g(f"{p}.mlp.mlp1_bias")
            src[f"{ours}.mlp.down_kernel"] = mlp_weight(f"{p}.mlp.mlp2_weight")
            src[f"{ours}.mlp.down_bias"] = lambda p=p: g(f"{p}.mlp.mlp2_bias")
        return src


def load_params(
    folder: Path, num_layers: int | None = None, dtype: str = "float32"
) -> tuple[GptOssConfig, GptOssConfig, dict[str, jax.ShapeDtypeStruct], dict[str, Callable[[], np.ndarray]]]:
    """Open ``folder``; return the checkpoint's config, the truncated config, and name → spec and name → loader
    of each param.

    Each loader reads one tensor, checks its shape against the model and that it is finite, and casts
    it to ``dtype`` (norm scales stay float32).
    """
    if dtype not in DTYPES:
        raise GptOssError(f"--dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    ckpt = Checkpoint.open(folder)
    cfg = ckpt.config.truncated(ckpt.config.num_hidden_layers if num_layers is None else num_layers)
    specs = param_specs(cfg, DTYPES[dtype])
    sources = ckpt.sources(cfg.num_hidden_layers, DTYPES[dtype])

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
            if bad := _count_nonfinite(out):
                raise GptOssError(f"{folder}: tensor for {name!r} has {bad} NaN/Inf values")
            return out

        return load

    return ckpt.config, cfg, specs, {name: loader(name) for name in specs}
