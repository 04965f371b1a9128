"""``gptoss convert``: checkpoint folder → Flax params msgpack + ``.config.json`` (tensor by tensor)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from gptoss.atomic import atomic_output, require_free_space
from gptoss.checkpoint import load_params
from gptoss.config import ParamsConfig, generation_tokens, params_config_path, read_json
from gptoss.hub import REVISION_FILE
from gptoss.params_io import write_params
from gptoss.synth import SYNTH_FILE

log = logging.getLogger("gptoss.convert")


def find_tokenizer(checkpoint: Path) -> Path | None:
    for candidate in (checkpoint / "tokenizer.json", checkpoint.parent / "tokenizer.json"):
        if candidate.is_file():
            return candidate.resolve()
    return None


def checkpoint_origin(checkpoint: Path) -> dict | None:
    """What the checkpoint folder says about where it came from (hub download or synthetic preset)."""
    for name in (REVISION_FILE, SYNTH_FILE):
        if (checkpoint / name).is_file():
            return read_json(checkpoint / name)
    return None


def convert(checkpoint: Path, output: Path, num_layers: int | None = None, dtype: str = "float32") -> ParamsConfig:
    """Convert ``checkpoint`` to ``output`` (msgpack) and its config; both written atomically."""
    full_cfg, cfg, specs, loaders = load_params(checkpoint, num_layers, dtype)
    total = sum(s.size * s.dtype.itemsize for s in specs.values())
    require_free_space(output.parent, int(total * 1.02), f"{output.name}")
    log.info(
        "converting %s: %d layers, %d params, %.2f GB as %s",
        checkpoint,
        cfg.num_hidden_layers,
        cfg.param_count(),
        total / 1e9,
        dtype,
    )
    done = [0]

    def progress(name: str) -> None:
        done[0] += 1
        log.info("[%d/%d] %s", done[0], len(specs), name)

    write_params(output, list(specs), lambda name: loaders[name](), progress)
    tokenizer = find_tokenizer(Path(checkpoint))
    if tokenizer is None:
        log.warning("%s has no tokenizer.json: parity will need --tokenizer or --token-ids", checkpoint)
    params_cfg = ParamsConfig(
        model=cfg,
        dtype=dtype,
        source_checkpoint=str(Path(checkpoint).resolve()),
        tokenizer=str(tokenizer) if tokenizer else None,
        source_layers=full_cfg.num_hidden_layers,
        origin=checkpoint_origin(Path(checkpoint)),
        generation=generation_tokens(Path(checkpoint)),
    )
    config_path = params_config_path(output)
    try:
        with atomic_output(config_path) as tmp:
            tmp.write_text(json.dumps(params_cfg.to_dict(), indent=2) + "\n")
    except BaseException:
        output.unlink(missing_ok=True)
        raise
    return params_cfg
