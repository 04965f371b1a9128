"""ONNX Runtime on the exported graphs: a session as a deployment makes it, and the decoder graph's greedy loop
(``present.*`` fed back as ``past_key_values.*``)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from gptoss.errors import GptOssError
from gptoss.graphs.names import INPUT_NAME, MASK_NAME, PAST_PREFIX, PRESENT_PREFIX
from gptoss.runtimes.generation import Generation, choose


def ort_session(onnx_path: Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session as a deployment (and onnxruntime-genai) makes it: full graph optimisations, memory arena.
    Constant folding keeps no float32 copy of weights stored narrower: those are overridable graph inputs
    (``gptoss.graphs.weights_file.attach_weights``)."""
    if not Path(onnx_path).is_file():
        raise GptOssError(f"{onnx_path}: ONNX file not found")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise GptOssError(f"{onnx_path}: ONNX Runtime cannot load the graph ({str(exc).splitlines()[0]})") from None


def ort_generate(
    session, prompt: Sequence[int], steps: int, suppress: Sequence[int], head_size: int | None = None
) -> Generation:
    """The decoder graph's greedy loop in ONNX Runtime: ``present.*`` fed back as ``past_key_values.*``."""
    past = empty_past(session, 1, head_size)
    ids, out = np.asarray([prompt], np.int64), Generation([], [])
    for _ in range(steps):
        mask = np.ones((1, len(prompt) + len(out.tokens)), np.int64)
        logits, past = ort_step(session, ids, mask, past)
        out.logits.append(logits[0])
        out.tokens.append(choose(out.logits[-1][-1], suppress))
        ids = np.asarray([[out.tokens[-1]]], np.int64)
    return out


def batched_ort_run(session, ids: np.ndarray, mask: np.ndarray, step_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A batch through the decoder graph: the prefill of ``ids`` (``mask`` 0 on padding), then one step of
    ``step_ids``; the logits of both."""
    prefill, past = ort_step(session, ids, mask, empty_past(session, len(ids)))
    mask = np.concatenate([mask, np.ones_like(step_ids)], axis=1)
    step, _ = ort_step(session, step_ids, mask, past)
    return prefill, step


def empty_past(session, batch: int, head_size: int | None = None) -> dict[str, np.ndarray]:
    """No cache yet: every ``past_key_values.*`` input with 0 positions (``head_size``: where the graph leaves the
    head dimension symbolic, as the onnxruntime-genai builder's graphs do; genai_config.json's ``head_size``)."""
    inputs = [i for i in session.get_inputs() if i.name.startswith(PAST_PREFIX)]
    past = {}
    for i in inputs:
        heads, dim = i.shape[1], i.shape[3] if isinstance(i.shape[3], int) else head_size
        if not isinstance(heads, int) or dim is None:
            raise GptOssError(f"past input {i.name} {i.shape}: its heads or head size is symbolic and not given")
        past[i.name] = np.zeros((batch, heads, 0, dim), np.float32)
    return past


def ort_step(
    session, ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One run of the decoder graph: the logits, and the presents as the next run's past."""
    past_length = next(iter(past.values())).shape[2]
    if mask.shape[1] != past_length + ids.shape[1]:
        raise GptOssError(
            f"attention_mask has {mask.shape[1]} positions; past {past_length} + new {ids.shape[1]} needs "
            f"{past_length + ids.shape[1]}"
        )
    names = [o.name for o in session.get_outputs()]
    results = dict(zip(names, session.run(names, {INPUT_NAME: ids, MASK_NAME: mask, **past}), strict=True))
    return results["logits"], {name: results[name.replace(PAST_PREFIX, PRESENT_PREFIX)] for name in past}
