"""The check ``gptoss export`` runs on a graph it wrote: JAX and ONNX Runtime on random token ids, logits
compared. A quick gate before the parity stages; JAX runs first and is freed before ONNX Runtime loads."""

from __future__ import annotations

import gc
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from gptoss.errors import GptOssError
from gptoss.graphs.names import INPUT_NAME
from gptoss.model.gpt_oss import forward
from gptoss.model.params import Params
from gptoss.runtimes.jax_model import StreamedModel
from gptoss.runtimes.onnx_runtime import ort_session

VALIDATION_ATOL = 1e-4


def check_export(params: Params, onnx_path: Path, sequence_length: int, threads: int | None = None) -> float:
    """The logits max |diff| on random token ids (seed 0, not zeros); fail above ``VALIDATION_ATOL``."""
    model = StreamedModel(params)
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, size=(2, sequence_length)).astype(np.int32)
    expected = np.asarray(forward(model, jnp.asarray(ids))["logits"])
    del model
    gc.collect()
    (actual,) = ort_session(onnx_path, threads).run(["logits"], {INPUT_NAME: ids})
    diff = float(np.abs(actual.astype(np.float64) - expected).max())
    if not np.isfinite(diff) or diff > VALIDATION_ATOL:
        raise GptOssError(
            f"{onnx_path}: validation failed: logits max |diff| {diff:.3g} between JAX and ONNX Runtime "
            f"exceeds {VALIDATION_ATOL:g}"
        )
    return diff
