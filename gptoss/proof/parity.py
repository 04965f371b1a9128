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

from gptoss.errors import GptOssError
from gptoss.files import sha256
from gptoss.graphs.genai import GENAI_CONFIG, check_folder
from gptoss.graphs.names import INPUT_NAME, data_path
from gptoss.model.outputs import output_names
from gptoss.proof.compare import compare_prompt, logits_diff, logits_row, step_rows, token_row, write_results
from gptoss.proof.driver import spill_jax_outputs
from gptoss.proof.prompts import Prompt, padded, prompt_inputs
from gptoss.proof.tolerances import Tolerances
from gptoss.runtimes.genai import genai_generate_all
from gptoss.runtimes.generation import Generation
from gptoss.runtimes.onnx_runtime import batched_ort_run, ort_generate, ort_session
from gptoss.runtimes.process import in_fresh_process

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
        jax_side = (params, config, resolved, sequence_length, compare_hidden_states, compare_block_debug, spill)
        in_fresh_process(spill_jax_outputs, *jax_side)
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


def parity_decoder(
    params: Path,
    onnx_path: Path,
    csv_path: Path,
    generate_tokens: int,
    prompts: Sequence[str] = (),
    token_ids: Sequence[str] = (),
    tokenizer: Path | None = None,
    config: Path | None = None,
    tolerances: Tolerances | None = None,
    threads: int | None = None,
    logits_diffs: Path | None = None,
) -> list[dict]:
    """Generation parity on the decoder graph: every prompt, then ``generate_tokens`` greedy steps, by the JAX
    model with its cache, by ONNX Runtime on the graph and by onnxruntime-genai on the graph's folder.

    Rows: ``decode_logits`` per step (JAX vs ONNX Runtime, while their tokens agree), the same for every prompt
    at once in a left-padded batch (``logits_batched``: each row must equal its prompt run alone), and one
    ``greedy_tokens`` row per prompt and runtime. The sides run one after the other, as in :func:`parity`.
    """
    tolerances = tolerances or Tolerances()
    if generate_tokens < 1:
        raise GptOssError(f"--generate-tokens must be at least 1, got {generate_tokens}")
    config, params_cfg, resolved = prompt_inputs(params, config, prompts, token_ids, tokenizer, 1 << 62)
    folder = onnx_path.parent
    context = check_folder(folder)["model"]["context_length"]
    for prompt in resolved:
        if len(prompt.ids) + generate_tokens > context:
            raise GptOssError(
                f"prompt {prompt.prompt_id} has {len(prompt.ids)} tokens; with --generate-tokens {generate_tokens} "
                f"that is {len(prompt.ids) + generate_tokens} positions, more than the context length {context} "
                f"{onnx_path} was exported for ({GENAI_CONFIG})"
            )
    suppress = params_cfg.eos_token_ids
    hashes = dict(onnx_sha256=sha256(onnx_path), data_sha256=sha256(data_path(onnx_path)))

    rows: list[dict] = []
    diffs: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="gptoss-parity-") as spill_dir:
        spill = Path(spill_dir)
        log.info("JAX side: %d prompt(s), %d greedy steps each, with the KV cache", len(resolved), generate_tokens)
        jax_side = (params, config, resolved, None, False, False, spill, generate_tokens, suppress)
        in_fresh_process(spill_jax_outputs, *jax_side)

        log.info("ONNX Runtime side: %s", onnx_path)
        session = ort_session(onnx_path, threads)
        references = {p.prompt_id: Generation.load(spill / f"{p.prompt_id}.generation.npz") for p in resolved}
        for prompt in resolved:
            reference = references[prompt.prompt_id]
            got = ort_generate(session, prompt.ids, generate_tokens, suppress)
            rows += step_rows("decoder", prompt, reference, got, tolerances)
            rows.append(token_row("decoder", prompt, "onnxruntime", reference, got.tokens, suppress, tolerances))
            diffs[prompt.prompt_id] = np.abs(got.logits[0] - reference.logits[0]).astype(np.float32).ravel()
        rows += batched_rows(session, resolved, references, tolerances)
        del session

        log.info("onnxruntime-genai side: %s", folder)
        generated = in_fresh_process(genai_generate_all, folder, [p.ids for p in resolved], generate_tokens)
        for prompt, tokens in zip(resolved, generated, strict=True):
            reference = references[prompt.prompt_id]
            rows.append(token_row("decoder", prompt, "genai", reference, tokens, suppress, tolerances))
    rows = [{**row, **hashes} for row in rows]
    write_results(csv_path, rows, tolerances, diffs, logits_diffs)
    return rows


def batched_rows(session, prompts: list[Prompt], references: dict[str, Generation], tol: Tolerances) -> list[dict]:
    """Every prompt and its first half, left-padded into one batch (``attention_mask`` 0 on the padding): a
    prefill, then one step feeding each row its next token. Each row's logits must be the ones JAX computed for
    its prompt alone (those of the first half are the first positions of the whole prompt's: attention is
    causal). Rows ``logits_batched``, step 0 (prefill, every real position) and 1."""
    batch = [(p, m) for p in prompts for m in sorted({len(p.ids), max(1, len(p.ids) // 2)})]
    batch = [(p, m) for p, m in batch if m - len(p.ids) + 1 < len(references[p.prompt_id].logits)]
    if not batch:
        return []
    width = max(m for _, m in batch)
    ids, mask = np.zeros((len(batch), width), np.int64), np.zeros((len(batch), width), np.int64)
    step_ids = np.zeros((len(batch), 1), np.int64)
    for row, (prompt, m) in enumerate(batch):
        sequence = list(prompt.ids) + references[prompt.prompt_id].tokens
        ids[row, width - m :], mask[row, width - m :], step_ids[row] = sequence[:m], 1, sequence[m]
    got_prefill, got_step = batched_ort_run(session, ids, mask, step_ids)
    rows = []
    for row, (prompt, m) in enumerate(batch):
        reference, n = references[prompt.prompt_id], len(prompt.ids)
        want = [reference.logits[0][p] if p < n else reference.logits[p - n + 1][0] for p in range(m + 1)]
        rows.append(
            logits_row("decoder", prompt, "logits_batched", 0, np.stack(want[:m]), got_prefill[row, width - m :], tol)
        )
        rows.append(logits_row("decoder", prompt, "logits_batched", 1, want[m][None], got_step[row], tol))
    return rows
