"""``gptoss export``'s entry points: trace a graph of the params (:mod:`gptoss.graphs.trace`), attach the shared
weights file ``model.onnx.data`` beside it (:mod:`gptoss.graphs.weights_file`; it always exists, so workflows can
declare it) and write the graph, each file atomically, in about one tensor of memory."""

from __future__ import annotations

import functools
import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import onnx
import onnx_ir as ir

from gptoss import __version__
from gptoss.errors import GptOssError
from gptoss.files import atomic_output, temporary_name
from gptoss.graphs.genai import write_companions
from gptoss.graphs.names import data_path
from gptoss.graphs.segments import mark_segment
from gptoss.graphs.trace import ExportSpec, build_onnx, build_segment_onnx
from gptoss.graphs.variants import Variant, quantize_graph
from gptoss.graphs.weights_file import (
    DATA_ALIGNMENT,
    EXTERNAL_THRESHOLD_BYTES,
    attach_weights,
    weights_layout,
    write_weights,
)
from gptoss.model.outputs import segment_input_name
from gptoss.model.params import Params, abstract_model
from gptoss.segment_plan import Segment

log = logging.getLogger("gptoss.export")
# onnx_ir notes every shape-only value it serialises without a type: benign and very chatty.
logging.getLogger("onnx_ir.serde").setLevel(logging.ERROR)


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


def export(params: Params, output: Path, spec: ExportSpec, reuse_weights: bool = False) -> None:
    """Trace the graph ``spec`` asks for and write it. The weights go to ``model.onnx.data`` beside the graph;
    ``reuse_weights``: that file is already there (an earlier export of the same params, or ``--weights-only``)
    and every graph in the folder shares it."""
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


def export_segment(params: Params, output: Path, spec: ExportSpec, segment: Segment) -> None:
    """The graph of one segment of the debug or canonical graph (parity in segments), traced alone
    (:func:`gptoss.graphs.trace.build_segment_onnx`) and written to ``output``, beside the whole graph: it reads
    the same weights file there, which must exist."""
    if spec.decoder:
        raise GptOssError("the decoder graph's parity is not segmented (greedy generation needs the whole model)")
    log.info("tracing segment %s of the %s graph", segment.name, spec.stage)
    onnx_model = build_segment_onnx(abstract_model(params.model_config, params.config.weight_format), spec,
                                    segment.first, segment.last)  # fmt: skip
    mark_segment(onnx_model, segment, segment_input_name(segment.first))
    layout, size = weights_layout(params)
    attach_weights(onnx_model, params, layout, size, data_path(output))
    onnx_model.producer_name, onnx_model.producer_version = "gptoss", __version__
    write_onnx(onnx_model, output)


def export_variant(params: Params, output: Path, spec: ExportSpec, variant: Variant) -> None:
    """A graph of ``spec`` as the quantized ``variant`` (:mod:`gptoss.graphs.variants`), in a folder of its own:
    ``output`` with its own ``model.onnx.data`` (the quantized weights, computed from ``params`` one tensor at a
    time while they are written, and the exact ones it keeps); a decoder also gets ``genai_config.json`` and the
    tokenizer files. The other graph a variant has is its *probe* for the quality stage: the whole-sequence graph
    with ``hidden_state_{i}`` outputs (block taps need the experts' expansion, which a variant replaces). All is
    written into a hidden staging folder first, then moved into place, the graph last."""
    if spec.emit_block_debug:
        raise GptOssError(f"variant {variant.name}: no block taps (its experts are one QMoE node per layer); "
                          "its probe has the hidden states only")  # fmt: skip
    log.info("tracing the %s graph for variant %s", spec.stage, variant.name)
    onnx_model = build_onnx(
        abstract_model(params.model_config, params.config.weight_format),
        spec,
        rewrite=functools.partial(quantize_graph, params=params, spec=variant),
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_name(output.with_suffix(".variant"))
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        staged = staging / output.name
        log.info("writing %s with its quantized weights in %s", output, data_path(output).name)
        ir.save(
            onnx_model,
            staged,
            external_data=data_path(staged).name,
            size_threshold_bytes=EXTERNAL_THRESHOLD_BYTES,
            alignment=DATA_ALIGNMENT,
            max_workers=1,
        )
        onnx.checker.check_model(str(staged), full_check=False)
        if spec.decoder:
            context = spec.context_length or params.model_config.max_position_embeddings
            write_companions(staging, params.config, context, output.name)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == output.name):  # the graph last
            os.replace(path, output.parent / path.name)
    except onnx.checker.ValidationError as exc:
        raise GptOssError(f"{output}: variant graph fails onnx.checker: {str(exc).splitlines()[0]}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
