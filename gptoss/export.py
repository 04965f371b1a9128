"""``gptoss export``: Flax params → ONNX with jax2onnx (canonical logits-only graph, or a debug graph with taps).

The canonical graph has input ``input_ids [batch, sequence]`` (int32, both axes symbolic) and one output
``logits [batch, sequence, vocab]`` float32. The debug graph fixes the sequence length and adds
``hidden_state_{i}`` and ``block_{i}_{tap}`` outputs. Weights over 1 MB go to one ``<name>.onnx.data``
next to the graph (the file always exists, so workflows can declare it). Both files are written in a
temporary folder beside the destination and renamed into place when complete.
"""

from __future__ import annotations

import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnx_ir as ir

from gptoss import __version__
from gptoss.atomic import temporary_name
from gptoss.config import ParamsConfig, params_config_path
from gptoss.errors import GptOssError
from gptoss.model import GptOss, build_model, forward, output_names
from gptoss.params_io import read_params

log = logging.getLogger("gptoss.export")
# onnx_ir notes every shape-only value it serialises without a type: benign and very chatty.
logging.getLogger("onnx_ir.serde").setLevel(logging.ERROR)

INPUT_NAME = "input_ids"
EXTERNAL_THRESHOLD_BYTES = 1024 * 1024
DEFAULT_OPSET = 21
VALIDATION_ATOL = 1e-4


@dataclass(frozen=True)
class ExportSpec:
    """What to export: which outputs, which axes are symbolic."""

    sequence_length: int
    emit_hidden_states: bool = False
    emit_block_debug: bool = False
    opset: int = DEFAULT_OPSET

    @property
    def debug(self) -> bool:
        return self.emit_hidden_states or self.emit_block_debug

    def input_shape(self) -> tuple[str | int, str | int]:
        # The debug graph may fix the sequence length; the canonical graph keeps both axes symbolic.
        return ("batch", self.sequence_length) if self.debug else ("batch", "sequence")


def data_path(onnx_path: Path) -> Path:
    """``x/model.onnx`` → ``x/model.onnx.data``."""
    return onnx_path.with_name(onnx_path.name + ".data")


def load_model(params: Path, config: Path | None = None) -> tuple[ParamsConfig, GptOss]:
    """Read params + config and build the Flax model; mismatches become one clear error."""
    config = config or params_config_path(params)
    params_cfg = ParamsConfig.read(config)
    arrays = read_params(params)
    try:
        model = build_model(params_cfg.model, arrays)
    except GptOssError as exc:
        raise GptOssError(f"{params} does not match {config}: {exc}") from None
    return params_cfg, model


def _outputs(model: GptOss, spec: ExportSpec, input_ids: jax.Array) -> dict[str, jax.Array]:
    return model(input_ids, emit_hidden_states=spec.emit_hidden_states, emit_block_debug=spec.emit_block_debug)


def _aliases(model: GptOss, spec: ExportSpec) -> dict[str, str]:
    """Outputs that are the very same value as an earlier one (name → earlier name).

    ``hidden_state_{i}`` is ``block_{i}_output`` and ``block_{i+1}_input``; an ONNX value has one name, so
    such duplicates become Identity nodes after export. Found by one abstract trace (no computation).
    """
    aliases: dict[str, str] = {}

    def probe(input_ids: jax.Array) -> jax.Array:
        outputs = _outputs(model, spec, input_ids)
        first_by_id: dict[int, str] = {}
        for name, value in outputs.items():
            if id(value) in first_by_id:
                aliases[name] = first_by_id[id(value)]
            else:
                first_by_id[id(value)] = name
        return outputs["logits"]

    jax.eval_shape(probe, jax.ShapeDtypeStruct((1, spec.sequence_length), jnp.int32))
    return aliases


def build_onnx(model: GptOss, spec: ExportSpec) -> ir.Model:
    """Trace the model with jax2onnx into an ONNX IR model with named inputs and outputs."""
    from jax2onnx import to_onnx

    names = output_names(model.cfg, spec.emit_hidden_states, spec.emit_block_debug)
    aliases = _aliases(model, spec)
    unique = [name for name in names if name not in aliases]

    def fn(input_ids: jax.Array) -> tuple[jax.Array, ...]:
        outputs = _outputs(model, spec, input_ids)
        return tuple(outputs[name] for name in unique)

    onnx_model = to_onnx(
        fn,
        [jax.ShapeDtypeStruct(spec.input_shape(), jnp.int32)],
        input_names=[INPUT_NAME],
        output_names=unique,
        opset=spec.opset,
        model_name="gpt_oss",
        return_mode="ir",
    )
    graph = onnx_model.graph
    by_name = {v.name: v for v in graph.outputs}
    for alias, target in aliases.items():
        source = by_name[target]
        node = ir.node("Identity", inputs=[source], outputs=[ir.Value(name=alias)])
        node.outputs[0].type = source.type
        node.outputs[0].shape = source.shape
        graph.append(node)
        by_name[alias] = node.outputs[0]
    graph.outputs.clear()
    graph.outputs.extend(by_name[name] for name in names)
    onnx_model.producer_name = "gptoss"
    onnx_model.producer_version = __version__
    return onnx_model


def save_onnx(onnx_model: ir.Model, output: Path, threshold: int = EXTERNAL_THRESHOLD_BYTES) -> None:
    """Write ``output`` and ``output.data`` atomically (temporary folder, then two renames)."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = temporary_name(output)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        staged = staging / output.name
        ir.save(onnx_model, staged, external_data=data_path(output).name, size_threshold_bytes=threshold)
        staged_data = data_path(staged)
        if not staged_data.exists():
            staged_data.touch()  # nothing over the threshold: an empty data file keeps the file pair stable
        onnx.checker.check_model(str(staged), full_check=False)
        os.replace(staged_data, data_path(output))
        os.replace(staged, output)
    except onnx.checker.ValidationError as exc:
        raise GptOssError(f"{output}: exported graph fails onnx.checker: {str(exc).splitlines()[0]}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def validate(model: GptOss, onnx_path: Path, spec: ExportSpec, seed: int = 0) -> float:
    """Random token ids (not zeros) through JAX and ONNX Runtime; fail if logits differ by more than 1e-4."""
    from gptoss.ort import ort_session

    rng = np.random.default_rng(seed)
    ids = rng.integers(0, model.cfg.vocab_size, size=(2, spec.sequence_length)).astype(np.int32)
    expected = np.asarray(forward(model, jnp.asarray(ids))["logits"])
    session = ort_session(onnx_path)
    (actual,) = session.run(["logits"], {INPUT_NAME: ids})
    diff = float(np.abs(actual.astype(np.float64) - expected).max())
    if not np.isfinite(diff) or diff > VALIDATION_ATOL:
        raise GptOssError(
            f"{onnx_path}: validation failed: logits max |diff| {diff:.3g} between JAX and ONNX Runtime "
            f"exceeds {VALIDATION_ATOL:g}"
        )
    return diff


def export(
    params: Path,
    output: Path,
    spec: ExportSpec,
    config: Path | None = None,
    skip_validation: bool = False,
) -> float | None:
    """Export and (unless skipped) validate; returns the validation logits max |diff|."""
    if spec.sequence_length < 1:
        raise GptOssError(f"--sequence-length must be positive, got {spec.sequence_length}")
    _, model = load_model(params, config)
    log.info("tracing %s graph (%s)", "debug" if spec.debug else "canonical", spec.input_shape())
    onnx_model = build_onnx(model, spec)
    log.info("writing %s (+ %s)", output, data_path(output).name)
    save_onnx(onnx_model, output)
    del onnx_model
    if skip_validation:
        return None
    diff = validate(model, output, spec)
    log.info("validation: logits max |diff| JAX vs ONNX Runtime = %.3g", diff)
    return diff
