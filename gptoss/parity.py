"""``gptoss parity``: JAX vs ONNX Runtime on the same token ids, every real position, into a CSV.

Memory: the two sides never hold their weights at the same time. JAX runs every prompt first and spills its
outputs to a temporary ``.npz``; the model is dropped; then ONNX Runtime runs and each output is compared
against the JAX tensor loaded on its own.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from gptoss.atomic import sha256
from gptoss.compare import compare_prompt, logits_diff, write_results
from gptoss.errors import GptOssError
from gptoss.model import output_names
from gptoss.names import INPUT_NAME, data_path
from gptoss.prompts import padded, prompt_inputs
from gptoss.runtime import ort_session, spill_jax_outputs
from gptoss.tolerances import Tolerances

log = logging.getLogger("gptoss.parity")


def check_graph(onnx_path: Path, wanted: Sequence[str], sequence_length: int) -> None:
    """Fail early (before any computation) if the graph lacks outputs or has another static length."""
    if not onnx_path.is_file():
        raise GptOssError(f"{onnx_path}: ONNX file not found")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    available = {o.name for o in graph.output}
    missing = [name for name in wanted if name not in available]
    if missing:
        needs = []
        if any(n.startswith("hidden_state_") for n in missing):
            needs.append("--emit-hidden-states")
        if any(n.startswith("block_") for n in missing):
            needs.append("--emit-block-debug")
        raise GptOssError(
            f"{onnx_path} lacks outputs {missing[:3]}{'...' if len(missing) > 3 else ''}: "
            f"export it with {' '.join(needs) or 'the matching flags'}"
        )
    dims = graph.input[0].type.tensor_type.shape.dim
    if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value != sequence_length:
        raise GptOssError(
            f"{onnx_path} was exported for sequence length {dims[1].dim_value}, not --sequence-length {sequence_length}"
        )


def parity(
    params: Path,
    onnx_path: Path,
    csv_path: Path,
    sequence_length: int,
    prompts: Sequence[str] = (),
    token_ids: Sequence[str] = (),
    tokenizer: Path | None = None,
    config: Path | None = None,
    compare_hidden_states: bool = False,
    compare_block_debug: bool = False,
    stage: str | None = None,
    tolerances: Tolerances | None = None,
    threads: int | None = None,
    logits_diffs: Path | None = None,
) -> list[dict]:
    """Run both sides, write the CSV atomically, return its rows.

    ``logits_diffs``: also write every real position's logits |diff| (float32, one array per prompt) to this
    ``.npz``, for the report's histogram.
    """
    tolerances = tolerances or Tolerances()
    stage = stage or ("debug" if compare_hidden_states or compare_block_debug else "canonical")
    config, params_cfg, resolved = prompt_inputs(params, config, prompts, token_ids, tokenizer, sequence_length)
    wanted = output_names(params_cfg.model, compare_hidden_states, compare_block_debug)
    check_graph(onnx_path, wanted, sequence_length)
    hashes = dict(onnx_sha256=sha256(onnx_path), data_sha256=sha256(data_path(onnx_path)))

    rows: list[dict] = []
    diffs: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="gptoss-parity-") as spill_dir:
        spill = Path(spill_dir)
        log.info("JAX side: %d prompt(s), %d outputs each", len(resolved), len(wanted))
        spill_jax_outputs(params, config, resolved, sequence_length, compare_hidden_states, compare_block_debug, spill)
        log.info("ONNX Runtime side: %s", onnx_path)
        session = ort_session(onnx_path, threads)
        for prompt in resolved:
            got = dict(zip(wanted, session.run(wanted, {INPUT_NAME: padded(prompt, sequence_length)}), strict=True))
            with np.load(spill / f"{prompt.prompt_id}.npz") as ref:
                rows += [{**row, **hashes} for row in compare_prompt(stage, prompt, ref, got, tolerances)]
                diffs[prompt.prompt_id] = logits_diff(prompt, ref, got)
            del got
    write_results(csv_path, rows, tolerances, diffs, logits_diffs)
    return rows
