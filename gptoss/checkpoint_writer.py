"""Write real checkpoint folders (HF or OpenAI ``original/`` layout): safetensors shards, index, config."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from gptoss.config import GptOssConfig
from gptoss.safetensors_io import INDEX_NAME

SHARD_BYTES = 2 * 1024**3


def hf_to_original(tensors: Iterable[tuple[str, np.ndarray]]) -> Iterator[tuple[str, np.ndarray]]:
    """Rename HF-layout tensors to OpenAI's ``original/`` names, fusing q/k/v (expects MXFP4 experts).

    Tensors of one layer must arrive together (as ``synth`` and the tests produce them).
    """
    plain = {
        "model.embed_tokens.weight": "embedding.weight",
        "model.norm.weight": "norm.scale",
        "lm_head.weight": "unembedding.weight",
    }
    per_layer = {
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
    pending: dict[str, np.ndarray] = {}
    for name, arr in tensors:
        if name in plain:
            yield plain[name], arr
            continue
        _, _, layer, rest = name.split(".", 3)
        if rest in per_layer:
            yield f"block.{layer}.{per_layer[rest]}", arr
            continue
        pending[name] = arr
        for kind in ("weight", "bias"):
            parts = [f"model.layers.{layer}.self_attn.{p}_proj.{kind}" for p in "qkv"]
            if all(p in pending for p in parts):
                yield f"block.{layer}.attn.qkv.{kind}", np.concatenate([pending.pop(p) for p in parts], axis=0)
    if pending:
        raise ValueError(f"tensors without an original/ name: {sorted(pending)[:3]}")


def write_checkpoint(
    folder: Path,
    cfg: GptOssConfig,
    tensors: Iterable[tuple[str, np.ndarray]],
    layout: str = "hf",
    shard_bytes: int = SHARD_BYTES,
) -> list[Path]:
    """Write ``tensors`` (HF names) as safetensors shards plus ``config.json`` into ``folder``.

    ``layout="original"`` writes OpenAI's names into ``folder/original/`` with its ``config.json`` there.
    Above ``shard_bytes`` the files are sharded with a ``model.safetensors.index.json``.
    """
    folder.mkdir(parents=True, exist_ok=True)
    if layout == "original":
        target = folder / "original"
        target.mkdir(exist_ok=True)
        (target / "config.json").write_text(json.dumps(cfg.to_original_dict(), indent=2) + "\n")
        tensors = hf_to_original(tensors)
    else:
        target = folder
        (folder / "config.json").write_text(json.dumps(cfg.to_hf_dict(), indent=2) + "\n")

    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    written: list[Path] = []
    tmp_names: list[Path] = []

    def flush() -> None:
        path = target / f".shard-{len(tmp_names):05d}.safetensors"
        save_file(shards[-1], str(path), metadata={"format": "pt"})
        tmp_names.append(path)
        shards[-1] = {}

    weight_map: dict[str, int] = {}
    for name, arr in tensors:
        arr = np.ascontiguousarray(arr)
        if shards[-1] and sizes[-1] + arr.nbytes > shard_bytes:
            flush()
            shards.append({})
            sizes.append(0)
        shards[-1][name] = arr
        sizes[-1] += arr.nbytes
        weight_map[name] = len(tmp_names)
    flush()

    count = len(tmp_names)
    if count == 1:
        final = [target / "model.safetensors"]
    else:
        final = [target / f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
    for tmp, dest in zip(tmp_names, final, strict=True):
        tmp.rename(dest)
        written.append(dest)
    if count > 1:
        index = {
            "metadata": {"total_size": int(sum(sizes))},
            "weight_map": {name: final[i].name for name, i in sorted(weight_map.items())},
        }
        (target / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    return written
