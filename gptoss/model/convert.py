"""``gptoss convert``: checkpoint folder → Flax params msgpack + ``.config.json`` (tensor by tensor)."""

from __future__ import annotations

import functools
import itertools
import json
import logging
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np

from gptoss.config import GptOssConfig, ParamsConfig, generation_tokens, params_config_path, read_json
from gptoss.errors import GptOssError
from gptoss.files import atomic_output, require_free_space
from gptoss.formats import mxfp4
from gptoss.formats.checkpoint import Checkpoint
from gptoss.formats.hub import REVISION_FILE
from gptoss.formats.params_file import write_params
from gptoss.formats.synth import SYNTH_FILE
from gptoss.model.layers import WEIGHT_FORMATS
from gptoss.model.params import param_specs

log = logging.getLogger("gptoss.convert")


def find_tokenizer(checkpoint: Path) -> Path | None:
    candidates = (checkpoint / "tokenizer.json", checkpoint.parent / "tokenizer.json")
    return next((candidate.resolve() for candidate in candidates if candidate.is_file()), None)


def checkpoint_origin(checkpoint: Path) -> dict | None:
    """What the checkpoint folder says about where it came from (hub download or synthetic preset)."""
    found = [checkpoint / name for name in (REVISION_FILE, SYNTH_FILE) if (checkpoint / name).is_file()]
    return read_json(found[0]) if found else None


def convert(
    checkpoint: Path, output: Path, num_layers: int | None = None, weight_format: str = "float32"
) -> ParamsConfig:
    """Convert ``checkpoint`` to ``output`` (msgpack) and its config; both written atomically."""
    checkpoint = Path(checkpoint)
    full_cfg, cfg, specs, loaders = load_params(checkpoint, num_layers, weight_format)
    total = sum(s.size * s.dtype.itemsize for s in specs.values())
    require_free_space(output.parent, int(total * 1.02), f"{output.name}")
    log.info(
        f"converting {checkpoint}: {cfg.num_hidden_layers} layers, {cfg.param_count()} params, "
        f"{total / 1e9:.2f} GB as {weight_format}"
    )
    done = itertools.count(1)

    def progress(name: str) -> None:
        log.info("[%d/%d] %s", next(done), len(specs), name)

    write_params(output, list(specs), lambda name: loaders[name](), progress)
    tokenizer = find_tokenizer(checkpoint)
    if tokenizer is None:
        log.warning("%s has no tokenizer.json: parity will need --tokenizer or --token-ids", checkpoint)
    params_cfg = ParamsConfig(
        model=cfg,
        weight_format=weight_format,
        source_checkpoint=str(checkpoint.resolve()),
        tokenizer=str(tokenizer) if tokenizer else None,
        source_layers=full_cfg.num_hidden_layers,
        origin=checkpoint_origin(checkpoint),
        generation=generation_tokens(checkpoint),
    )
    try:
        with atomic_output(params_config_path(output)) as tmp:
            tmp.write_text(json.dumps(params_cfg.to_dict(), indent=2) + "\n")
    except BaseException:
        output.unlink(missing_ok=True)
        raise
    return params_cfg


def load_params(
    folder: Path, num_layers: int | None = None, weight_format: str = "float32"
) -> tuple[GptOssConfig, GptOssConfig, dict[str, jax.ShapeDtypeStruct], dict[str, Callable[[], np.ndarray]]]:
    """The checkpoint's config, the truncated config, and name → spec and name → loader of each param of
    ``folder``. A loader reads one tensor, checks its shape against the model and that it is finite, and casts it
    to the ``weight_format``'s dtype (norm scales stay float32)."""
    if weight_format not in WEIGHT_FORMATS:
        raise GptOssError(f"weight format {weight_format!r} is not supported; choose one of {sorted(WEIGHT_FORMATS)}")
    ckpt = Checkpoint.open(folder)
    cfg = ckpt.config.truncated(ckpt.config.num_hidden_layers if num_layers is None else num_layers)
    specs = param_specs(cfg, weight_format)
    sources = ckpt.sources(list(specs), np.dtype(WEIGHT_FORMATS[weight_format][0]))

    def load(name: str) -> np.ndarray:
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

    return ckpt.config, cfg, specs, {name: functools.partial(load, name) for name in specs}


def _count_nonfinite(a: np.ndarray, rows: int = 1 << 16) -> int:
    """NaN/Inf count, a block of leading rows at a time (a whole-array mask would be one more big temporary)."""
    flat = a.reshape(a.shape[0], -1) if a.ndim > 1 else a.reshape(-1, 1)
    return sum(int((~np.isfinite(flat[i : i + rows])).sum()) for i in range(0, flat.shape[0], rows))
