"""``gptoss export``'s entry points: trace a graph of the params (:mod:`gptoss.graphs.trace`), attach the shared
weights file (:mod:`gptoss.graphs.weights_file`), write the graph and validate it. The weights go to
``model.onnx.data`` beside the graph (the file always exists, so workflows can declare it); each file is written in a
temporary beside its destination and renamed into place when complete. Export needs about one tensor of memory
whatever the model size, since the weights stream from the params msgpack one tensor at a time; validation runs
JAX first, frees it, then ONNX Runtime."""

from __future__ import annotations

import functools
import gc
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import onnx
import onnx_ir as ir

from gptoss.errors import GptOssError
from gptoss.files import atomic_output, temporary_name
from gptoss.graphs.genai import write_companions
from gptoss.graphs.names import INPUT_NAME, data_path
from gptoss.graphs.trace import ExportSpec, build_onnx
from gptoss.graphs.weights_file import attach_weights, weights_layout, write_weights
from gptoss.model.gpt_oss import forward
from gptoss.model.params import Params, abstract_model

log = logging.getLogger("gptoss.export")
# onnx_ir notes every shape-only value it serialises without a type: benign and very chatty.
logging.getLogger("onnx_ir.serde").setLevel(logging.ERROR)

VALIDATION_ATOL = 1e-4


def write_onnx(onnx_model: ir.Model, output: Path, companions: Callable[[Path], object] | None = None) -> None:
    """Write the graph ``output`` atomically (a hidden temporary beside the weights file it reads, checked with
    onnx.checker, then renamed), after whatever ``companions(folder)`` writes beside it (staged, then moved)."""
    staging = temporary_name(output.with_suffix(".companions"))
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        with atomic_output(output) as staged:
            ir.save(onnx_model, staged)
            onnx.checker.check_model(str(staged), full_check=False)
            if companions is not None:
                companions(staging)
                for path in staging.iterdir():
                    os.replace(path, output.parent / path.name)
    except onnx.checker.ValidationError as exc:
        raise GptOssError(f"{output}: exported graph fails onnx.checker: {str(exc).splitlines()[0]}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def export_weights(params: Params, output: Path) -> None:
    """Only the weights file: what every graph of these params reads (``gptoss export --weights-only``)."""
    layout, size = weights_layout(params)
    log.info("writing %s (%.2f GB), streaming from %s", output, size / 1e9, params.path)
    write_weights(params, layout, output)


def validate(params: Params, onnx_path: Path, spec: ExportSpec, seed: int = 0, threads: int | None = None) -> float:
    """Random token ids (not zeros) through JAX, then (JAX freed) ONNX Runtime; fail if logits differ > 1e-4."""
    from gptoss.runtimes.jax_model import StreamedModel
    from gptoss.runtimes.onnx_runtime import ort_session

    model = StreamedModel(params)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.cfg.vocab_size, size=(2, spec.sequence_length)).astype(np.int32)
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


def export(
    params: Params,
    output: Path,
    spec: ExportSpec,
    skip_validation: bool = False,
    threads: int | None = None,
    reuse_weights: bool = False,
) -> float | None:
    """Export and (unless skipped) validate; returns the validation logits max |diff|. The weights go to
    ``model.onnx.data`` beside the graph; ``reuse_weights``: that file is already there (an earlier export of the
    same params, or ``--weights-only``) and every graph in the folder shares it."""
    if spec.sequence_length < 1:
        raise GptOssError(f"--sequence-length must be positive, got {spec.sequence_length}")
    log.info("tracing the %s graph", spec.stage)
    onnx_model = build_onnx(abstract_model(params.model_config, params.config.weight_format), spec)
    weights = data_path(output)
    layout, size = weights_layout(params)
    if not reuse_weights:
        write_weights(params, layout, weights)
    log.info("writing %s (weights in %s)", output, weights)
    attach_weights(onnx_model, params, layout, size, weights)
    companions = None
    if spec.decoder:
        context = spec.context_length or params.model_config.max_position_embeddings
        companions = functools.partial(
            write_companions, params_cfg=params.config, context_length=context, filename=output.name
        )
    write_onnx(onnx_model, output, companions)
    del onnx_model
    if skip_validation or spec.decoder:  # the decoder is checked by `gptoss parity --stage decoder`
        return None
    diff = validate(params, output, spec, threads=threads)
    log.info("validation: logits max |diff| JAX vs ONNX Runtime = %.3g", diff)
    return diff
