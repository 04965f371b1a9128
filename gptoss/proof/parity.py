"""``gptoss parity``: the Flax model in JAX against the exported graphs, every real position, into a CSV.

Stages debug and canonical run the whole-sequence graph in ONNX Runtime (every hidden state and tap in debug);
stage decoder runs greedy generation on the KV-cache graph, by ONNX Runtime and by onnxruntime-genai.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnx

from gptoss.errors import GptOssError
from gptoss.files import atomic_output, sha256
from gptoss.graphs.genai import GENAI_CONFIG, check_folder
from gptoss.graphs.names import INPUT_NAME
from gptoss.graphs.segments import segment_meta, tensor_sha256s
from gptoss.model.outputs import output_names, segment_input_name, segment_output_names
from gptoss.model.params import Params
from gptoss.proof.compare import Results, compare_prompt, logits_diff, logits_row, step_rows, token_row
from gptoss.proof.driver import JaxOutputs, JaxRequest, compare
from gptoss.proof.prompts import Prompt, padded
from gptoss.proof.segment_carry import Carry
from gptoss.proof.tolerances import Tolerances
from gptoss.runtimes.genai import genai_generate_all
from gptoss.runtimes.generation import Generation
from gptoss.runtimes.onnx_runtime import batched_ort_run, ort_generate, ort_session
from gptoss.runtimes.process import in_fresh_process
from gptoss.segment_plan import carry_path, tensors_path

log = logging.getLogger("gptoss.parity")


def check_graph(onnx_path: Path, wanted: Sequence[str], sequence_length: int) -> None:
    """Fail early (before any computation) if the graph lacks outputs or has another static length."""
    if not onnx_path.is_file():
        raise GptOssError(f"{onnx_path}: ONNX file not found")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    available = {o.name for o in graph.output}
    if missing := [name for name in wanted if name not in available]:
        flags = {"hidden_state_": "--emit-hidden-states", "block_": "--emit-block-debug"}
        needs = [flag for prefix, flag in flags.items() if any(n.startswith(prefix) for n in missing)]
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
    params: Params, onnx_path: Path, results: Results, request: JaxRequest, threads: int | None = None
) -> list[dict]:
    """Every prompt of ``request`` through JAX and through the graph in ONNX Runtime, padded to its sequence length:
    one row per output (stage ``debug`` with hidden states or taps, else ``canonical``)."""
    stage = "debug" if request.hidden_states or request.block_debug else "canonical"
    wanted = output_names(params.model_config, request.hidden_states, request.block_debug)
    check_graph(onnx_path, wanted, request.sequence_length)

    def onnx_runtime_side(jax: JaxOutputs) -> tuple[list[dict], dict[str, np.ndarray]]:
        log.info("ONNX Runtime side: %s", onnx_path)
        session = ort_session(onnx_path, threads)
        rows, diffs = [], {}
        for prompt in request.prompts:
            ids = padded(prompt, request.sequence_length)
            got = dict(zip(wanted, session.run(wanted, {INPUT_NAME: ids}), strict=True))
            with jax.forward(prompt) as ref:
                rows += compare_prompt(stage, prompt, ref, got, results.tolerances)
                diffs[prompt.prompt_id] = logits_diff(prompt, ref, got)
            del got
        return rows, diffs

    return compare(stage, params, request, onnx_runtime_side, results, onnx_path)


def parity_segment(
    params: Params,
    onnx_path: Path,
    results: Results,
    request: JaxRequest,
    threads: int | None = None,
    entering: Path | None = None,
    leaving: Path | None = None,
) -> list[dict]:
    """A segment graph (``gptoss export --segment``) against the JAX model, continuing from ``entering``, the carry
    the previous segment's parity left (:mod:`gptoss.proof.segment_carry`; none for the embedding): ONNX Runtime
    from ONNX Runtime's state, JAX from JAX's, so the rows are the whole graph's rows for the outputs the whole
    graph has. The states leaving the segment go to ``leaving`` (default: beside the CSV). The sha256 of every
    weight the segment graph reads goes beside the CSV (:func:`tensors_path`), and that file's sha256 into the
    rows' ``data_sha256``: the gate checks them against the whole graph's."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    meta = segment_meta(model)
    if meta is None:
        raise GptOssError(
            f"{onnx_path} is a whole graph, not a segment graph: run parity without --entering and --leaving"
        )
    cfg = params.model_config
    debug = request.hidden_states or request.block_debug
    stage = "debug" if debug else "canonical"
    first, last = meta["first"], meta["last"]
    wanted = segment_output_names(cfg, first, last, debug)
    check_graph(onnx_path, wanted, request.sequence_length)
    carried = _entering_carry(meta, entering)
    request = dataclasses.replace(request, segment=(first, last), entering=entering)
    whole_outputs = set(output_names(cfg, request.hidden_states, request.block_debug))
    leaving_name = segment_input_name(last + 1) if last <= cfg.num_hidden_layers else None
    record = {"stage": stage, "segment": meta["name"], "onnx": onnx_path.name, "onnx_sha256": sha256(onnx_path)}
    record |= tensor_sha256s(model, onnx_path.parent)
    record["entering"] = {"segment": carried.segment, "sha256": sha256(entering)} if carried else None
    del model
    with atomic_output(tensors_path(results.csv)) as tmp:
        tmp.write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")
    provenance = dict(onnx_sha256=record["onnx_sha256"], data_sha256=sha256(tensors_path(results.csv)))
    carry = Carry(meta["name"], last, provenance["data_sha256"])

    def onnx_runtime_side(jax: JaxOutputs) -> tuple[list[dict], dict[str, np.ndarray]]:
        log.info("ONNX Runtime side: %s (segment %s)", onnx_path, meta["name"])
        session = ort_session(onnx_path, threads)
        rows, diffs = [], {}
        for prompt in request.prompts:
            feeds = {INPUT_NAME: padded(prompt, request.sequence_length)}
            if carried:
                feeds[meta["input"]] = carried.state("onnxruntime", prompt, entering)
            fed = {i.name for i in session.get_inputs()}
            got = dict(zip(wanted, session.run(wanted, {k: v for k, v in feeds.items() if k in fed}), strict=True))
            with jax.forward(prompt) as ref:
                compared = {name: value for name, value in got.items() if name in whole_outputs}
                rows += compare_prompt(stage, prompt, ref, compared, results.tolerances)
                if "logits" in got:
                    diffs[prompt.prompt_id] = logits_diff(prompt, ref, got)
                if leaving_name:
                    carry.add(prompt, jax=ref[leaving_name], onnxruntime=got[leaving_name])
            del got
        return rows, diffs

    rows = compare(stage, params, request, onnx_runtime_side, results, onnx_path, provenance)
    carry.save(leaving or carry_path(results.csv))
    return rows


def _entering_carry(meta: dict, entering: Path | None) -> Carry | None:
    """The carry a segment starts from: none for the embedding, else the one the segment just before it left."""
    if meta["first"] == 0:
        if entering is not None:
            raise GptOssError(f"segment {meta['name']} is the embedding: it starts from the prompt, not --entering")
        return None
    if entering is None:
        raise GptOssError(
            f"segment {meta['name']} continues from the segment before it: pass --entering with the .carry.npz "
            "that segment's parity left"
        )
    carried = Carry.load(entering)
    if carried.last != meta["first"] - 1:
        raise GptOssError(
            f"{entering}: the state leaving segment {carried.segment}, which does not end just before segment "
            f"{meta['name']}"
        )
    return carried


def parity_decoder(
    params: Params, onnx_path: Path, results: Results, prompts: list[Prompt], steps: int, threads: int | None = None
) -> list[dict]:
    """Generation parity on the decoder graph: every prompt, then ``steps`` greedy tokens, by the JAX model with
    its cache, by ONNX Runtime on the graph and by onnxruntime-genai on the graph's folder.

    Rows: ``decode_logits`` per step (JAX vs ONNX Runtime, while their tokens agree), the same for every prompt
    at once in a left-padded batch (``logits_batched``: each row must equal its prompt run alone), and one
    ``greedy_tokens`` row per prompt and runtime."""
    tolerances = results.tolerances
    if steps < 1:
        raise GptOssError(f"--generate-tokens must be at least 1, got {steps}")
    folder = onnx_path.parent
    context = check_folder(folder)["model"]["context_length"]
    for prompt in prompts:
        if len(prompt.ids) + steps > context:
            raise GptOssError(
                f"prompt {prompt.prompt_id} has {len(prompt.ids)} tokens; with --generate-tokens {steps} "
                f"that is {len(prompt.ids) + steps} positions, more than the context length {context} "
                f"{onnx_path} was exported for ({GENAI_CONFIG})"
            )
    suppress = tuple(params.config.eos_token_ids)

    def generation_side(jax: JaxOutputs) -> tuple[list[dict], dict[str, np.ndarray]]:
        log.info("ONNX Runtime side: %s", onnx_path)
        session = ort_session(onnx_path, threads)
        references = {p.prompt_id: jax.generation(p) for p in prompts}
        rows, diffs = [], {}
        for prompt in prompts:
            reference = references[prompt.prompt_id]
            got = ort_generate(session, prompt.ids, steps, suppress)
            rows += step_rows("decoder", prompt, reference, got, tolerances)
            rows.append(token_row("decoder", prompt, "onnxruntime", reference, got.tokens, suppress, tolerances))
            diffs[prompt.prompt_id] = np.abs(got.logits[0] - reference.logits[0]).astype(np.float32).ravel()
        rows += batched_rows(session, prompts, references, tolerances)
        del session

        log.info("onnxruntime-genai side: %s", folder)
        generated = in_fresh_process(genai_generate_all, folder, [p.ids for p in prompts], steps)
        for prompt, tokens in zip(prompts, generated, strict=True):
            reference = references[prompt.prompt_id]
            rows.append(token_row("decoder", prompt, "genai", reference, tokens, suppress, tolerances))
        return rows, diffs

    request = JaxRequest(prompts, generate_tokens=steps, suppress=suppress)
    return compare("decoder", params, request, generation_side, results, onnx_path)


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
        prefill = np.stack(want[:m])
        rows.append(logits_row("decoder", prompt, "logits_batched", 0, prefill, got_prefill[row, width - m :], tol))
        rows.append(logits_row("decoder", prompt, "logits_batched", 1, want[m][None], got_step[row], tol))
    return rows
