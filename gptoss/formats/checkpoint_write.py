"""Write real checkpoint folders (HF or OpenAI ``original/`` layout): safetensors shards, index, config. The
``config.json`` has what openai/gpt-oss-*'s has beyond the architecture, so Hugging Face tools read a written folder
as they read the real one."""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from safetensors.numpy import save_file

from gptoss.config import GptOssConfig
from gptoss.formats.names import fused_qkv, original_name
from gptoss.formats.safetensors_file import INDEX_NAME
from gptoss.formats.tokenizer import SpecialTokenIds

SHARD_BYTES = 2 * 1024**3
# openai/gpt-oss-*: the experts are MXFP4 (``*_blocks``/``*_scales``); transformers dequantizes them on load.
MXFP4_QUANTIZATION = {
    "modules_to_not_convert": [
        "model.layers.*.self_attn",
        "model.layers.*.mlp.router",
        "model.embed_tokens",
        "lm_head",
    ],
    "quant_method": "mxfp4",
}
# Keys of openai/gpt-oss-*'s config.json beyond GptOssConfig.to_hf_dict(): not in the forward pass; HF tools read them.
HF_ONLY_KEYS: dict[str, Any] = {
    "attention_dropout": 0.0,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "output_router_logits": False,
    "router_aux_loss_coef": 0.9,
    "use_cache": True,
}
# safetensors' dtype names; OpenAI's original/dtypes.json names the MXFP4 parts FP4 (blocks) and UE8 (scales).
_DTYPE_NAMES = {np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}


def hf_config_dict(
    cfg: GptOssConfig, quantized: bool, dtype: np.dtype | None = None, special: SpecialTokenIds | None = None
) -> dict[str, Any]:
    """``config.json`` as openai/gpt-oss-* writes it: the architecture plus ``quantization_config`` (when the
    experts are MXFP4), ``torch_dtype`` (the dense tensors' dtype), ``eos_token_id``/``pad_token_id`` and the
    remaining HF-only keys."""
    raw = {**cfg.to_hf_dict(), **HF_ONLY_KEYS, "experts_per_token": cfg.num_experts_per_tok}
    if quantized:
        raw["quantization_config"] = copy.deepcopy(MXFP4_QUANTIZATION)
    if dtype is not None:
        raw["torch_dtype"] = dtype.name
    if special is not None:
        raw["eos_token_id"] = special.eos
        raw["pad_token_id"] = special.pad
    return raw


def write_generation_config(folder: Path, special: SpecialTokenIds) -> None:
    """``folder/generation_config.json`` in openai/gpt-oss-*'s form (sampling on, several end-of-generation ids)."""
    raw = {
        "bos_token_id": special.bos,
        "do_sample": True,
        "eos_token_id": list(special.stop),
        "pad_token_id": special.pad,
    }
    (folder / "generation_config.json").write_text(json.dumps(raw, indent=2) + "\n")


def _original_dtype(name: str, dtype: np.dtype) -> str:
    if name.endswith(".blocks"):
        return "FP4"
    if name.endswith(".scales"):
        return "UE8"
    return _DTYPE_NAMES.get(dtype, dtype.name.upper())


def hf_to_original(tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Rename HF-layout tensors to OpenAI's ``original/`` names (:mod:`gptoss.formats.names`), fusing q/k/v (so
    the tensors of one layer must arrive together)."""
    fused: dict[str, list[np.ndarray | None]] = {}
    for name, arr in tensors:
        if (original := original_name(name)) is not None:
            yield original, arr
            continue
        if (qkv := fused_qkv(name)) is None:
            raise ValueError(f"tensor without an original/ name: {name!r}")
        target, index = qkv
        parts = fused.setdefault(target, [None, None, None])
        parts[index] = arr
        if all(p is not None for p in parts):
            yield target, np.concatenate(fused.pop(target), axis=0)
    if fused:
        raise ValueError(f"q/k/v incomplete for {sorted(fused)[:3]}")


def write_checkpoint(
    folder: Path,
    cfg: GptOssConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    layout: str = "hf",
    shard_bytes: int = SHARD_BYTES,
    special: SpecialTokenIds | None = None,
) -> list[Path]:
    """Write ``tensors`` (HF names) as safetensors shards plus ``config.json`` into ``folder``, or with
    ``layout="original"`` OpenAI's names, ``config.json`` and ``dtypes.json`` into ``folder/original/``. Above
    ``shard_bytes`` the files are sharded, with an index. ``special``: the eos and pad ids for HF's ``config.json``."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / "original" if layout == "original" else folder
    if layout == "original":
        target.mkdir(exist_ok=True)
        (target / "config.json").write_text(json.dumps(cfg.to_original_dict(), indent=2) + "\n")
        tensors = hf_to_original(tensors)
    dtypes: dict[str, np.dtype] = {}
    weight_map: dict[str, int] = {}  # tensor -> the index of its shard
    shard: dict[str, np.ndarray] = {}
    total_size = 0
    tmp_names: list[Path] = []

    def flush() -> None:
        path = target / f".shard-{len(tmp_names):05d}.safetensors"
        save_file(shard, str(path), metadata={"format": "pt"})
        tmp_names.append(path)
        shard.clear()

    for name, arr in tensors:
        arr = np.ascontiguousarray(arr)
        if shard and sum(a.nbytes for a in shard.values()) + arr.nbytes > shard_bytes:
            flush()
        shard[name] = arr
        dtypes[name] = arr.dtype
        weight_map[name] = len(tmp_names)
        total_size += arr.nbytes
    flush()

    count = len(tmp_names)
    if count == 1:
        final = [target / "model.safetensors"]
    else:
        final = [target / f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    for tmp, dest in zip(tmp_names, final, strict=True):
        tmp.rename(dest)
    if count > 1:
        index = {
            "metadata": {"total_size": total_size},
            "weight_map": {name: final[i].name for name, i in sorted(weight_map.items())},
        }
        (target / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    if layout == "original":
        original_dtypes = {name: _original_dtype(name, dtype) for name, dtype in dtypes.items()}
        (target / "dtypes.json").write_text(json.dumps(original_dtypes, indent=2) + "\n")
    else:
        dense = {dtype for name, dtype in dtypes.items() if not name.endswith(("_blocks", "_scales"))}
        quantized = any(name.endswith("_blocks") for name in dtypes)
        raw = hf_config_dict(cfg, quantized, dtype=dense.pop() if len(dense) == 1 else None, special=special)
        (folder / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    return final
