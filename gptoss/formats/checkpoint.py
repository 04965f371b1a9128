"""Read a GPT-OSS checkpoint folder (HF or OpenAI ``original/`` layout, told apart by the tensor names)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np

from gptoss.config import GptOssConfig, load_checkpoint_config
from gptoss.errors import GptOssError
from gptoss.formats import mxfp4
from gptoss.formats.names import fused_qkv, hf_source, original_name
from gptoss.formats.safetensors_file import TensorStore


@dataclasses.dataclass
class Checkpoint:
    """A checkpoint folder opened for reading: its config, layout and tensors, each read when needed by its HF name
    whatever the layout (original/ tensors are renamed, and q/k/v sliced out of the fused qkv)."""

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
                    f"{self.store.file_of(next(self.store.names()))}: weight format mxfp4 keeps the experts as MXFP4 "
                    f"blocks and scales, but this checkpoint has {found}; convert it with --weight-format float32 or "
                    "bfloat16"
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
        """MXFP4 experts ``blocks``/``scales`` (``[E, out, ...]``) → our ``[E, in, out]`` kernel in ``dtype``,
        decoded one expert at a time straight into the result (no whole float32 decode, no transposed copy).
        Trap: ``down_proj`` is square for gpt-oss-20b (2880×2880), so a missing transpose keeps the shapes right."""
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
