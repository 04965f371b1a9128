"""``gptoss export``: Flax params → ONNX with jax2onnx (canonical logits-only graph, or a debug graph with taps).

The canonical graph has input ``input_ids [batch, sequence]`` (int32, both axes symbolic) and one output
``logits [batch, sequence, vocab]`` float32. The debug graph fixes the sequence length and adds
``hidden_state_{i}`` and ``block_{i}_{tap}`` outputs. Weights over 1 MB go to one ``<name>.onnx.data``
next to the graph (the file always exists, so workflows can declare it). Both files are written in a
temporary folder beside the destination and renamed into place when complete.

Memory: the graph is traced from an *abstract* model with the weights as graph inputs (no weight is ever
materialised, nor captured as a constant by ``jax.jit``/jax2onnx). Those inputs then become initializers
whose bytes are streamed from the params msgpack into ``.onnx.data`` one tensor at a time, so export needs
about one tensor of memory whatever the model size. Validation runs JAX first, frees it, then ONNX Runtime.
"""

from __future__ import annotations

import functools
import gc
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnx_ir as ir
from flax import nnx

from gptoss import __version__
from gptoss.config import GptOssConfig
from gptoss.errors import GptOssError
from gptoss.files import atomic_output, require_free_space, temporary_name
from gptoss.formats.params_file import StoredArray
from gptoss.graphs.genai import TOTAL_LENGTH, past_names, present_names, write_companions
from gptoss.graphs.names import INPUT_NAME, MASK_NAME, PAST_PREFIX, data_path
from gptoss.model.gpt_oss import GptOss, forward
from gptoss.model.outputs import output_names
from gptoss.model.params import Params, abstract_model, flat_param_specs

log = logging.getLogger("gptoss.export")
# onnx_ir notes every shape-only value it serialises without a type: benign and very chatty.
logging.getLogger("onnx_ir.serde").setLevel(logging.ERROR)

EXTERNAL_THRESHOLD_BYTES = 1024 * 1024
DEFAULT_OPSET = 21
VALIDATION_ATOL = 1e-4
DATA_ALIGNMENT = 64 * 1024


@dataclass(frozen=True)
class ExportSpec:
    """What to export: which outputs, which axes are symbolic; ``decoder`` for the KV-cache graph."""

    sequence_length: int
    emit_hidden_states: bool = False
    emit_block_debug: bool = False
    opset: int = DEFAULT_OPSET
    decoder: bool = False
    context_length: int | None = None  # decoder: genai_config's context length (default: the model's)

    @property
    def debug(self) -> bool:
        return self.emit_hidden_states or self.emit_block_debug

    @property
    def stage(self) -> str:
        return "decoder" if self.decoder else "debug" if self.debug else "canonical"

    def input_shape(self) -> tuple[str | int, str | int]:
        # The debug graph may fix the sequence length; the canonical graph keeps both axes symbolic.
        return ("batch", self.sequence_length) if self.debug else ("batch", "sequence")


class _Traceable:
    """The model as a function of its inputs and ``*weights``: weights become graph inputs, never constants."""

    def __init__(self, model: GptOss) -> None:
        self.graphdef, state = nnx.split(model)
        flat = flat_param_specs(state)
        self.paths = [path for path, _, _ in flat]
        self.weight_names = [name for _, name, _ in flat]
        self.weight_specs = [spec for _, _, spec in flat]

    def live(self, weights: tuple[jax.Array, ...]) -> GptOss:
        return nnx.merge(self.graphdef, nnx.from_flat_state(list(zip(self.paths, weights, strict=True))))


def forward_outputs(traceable: _Traceable, spec: ExportSpec) -> Callable[..., dict[str, jax.Array]]:
    def outputs(input_ids: jax.Array, *weights: jax.Array) -> dict[str, jax.Array]:
        return traceable.live(weights)(input_ids, spec.emit_hidden_states, spec.emit_block_debug)

    return outputs


def aliases(outputs: Callable[..., dict[str, jax.Array]], specs: list[jax.ShapeDtypeStruct]) -> dict[str, str]:
    """Outputs that are the very same value as an earlier one (name → earlier name).

    ``hidden_state_{i}`` is ``block_{i}_output`` and ``block_{i+1}_input``; an ONNX value has one name, so
    such duplicates become Identity nodes after export. Found by one abstract trace (no computation).
    """
    found: dict[str, str] = {}

    def probe(*args: jax.Array) -> jax.Array:
        values = outputs(*args)
        first_by_id: dict[int, str] = {}
        for name, value in values.items():
            found.setdefault(name, first_by_id.setdefault(id(value), name))
        return values["logits"]

    jax.eval_shape(probe, *specs)
    return {name: first for name, first in found.items() if name != first}


def _linear_output_check() -> None:
    """jax2onnx 0.17 checks, after lowering each equation, that its outputs are connected by scanning every node
    built so far: quadratic in the graph's size (a 24-layer debug graph traced for over an hour). A value that a
    node produced is connected; only the others get the original scan (and onnx.checker checks the written graph
    whole)."""
    from jax2onnx.converter import output_binding

    original = output_binding._value_is_graph_connected
    if getattr(original, "linear", False):
        return

    def connected(ctx: object, value: ir.Value) -> bool:
        return value.producer() is not None or original(ctx, value)

    connected.linear = True
    output_binding._value_is_graph_connected = connected


def build_onnx(model: GptOss, spec: ExportSpec) -> ir.Model:
    """Trace ``model`` (usually abstract) with jax2onnx; every weight is a graph input named after the param."""
    from jax2onnx import to_onnx

    _linear_output_check()

    traceable = _Traceable(model)
    weight_specs = traceable.weight_specs
    if spec.decoder:
        input_names, input_specs, outputs = decoder_inputs(model.cfg, traceable)
        names, duplicates = ["logits", *present_names(model.cfg.num_hidden_layers)], {}
    else:
        input_names = [INPUT_NAME]
        input_specs = [jax.ShapeDtypeStruct(spec.input_shape(), jnp.int32)]
        outputs = forward_outputs(traceable, spec)
        names = output_names(model.cfg, spec.emit_hidden_states, spec.emit_block_debug)
        duplicates = aliases(outputs, [jax.ShapeDtypeStruct((1, spec.sequence_length), jnp.int32), *weight_specs])
    unique = [name for name in names if name not in duplicates]

    def selected(*args: jax.Array) -> tuple[jax.Array, ...]:
        values = outputs(*args)  # one trace of the model
        return tuple(values[name] for name in unique)

    onnx_model = to_onnx(
        selected,
        [*input_specs, *weight_specs],
        input_names=[*input_names, *traceable.weight_names],
        output_names=unique,
        opset=spec.opset,
        model_name="gpt_oss",
        return_mode="ir",
    )
    graph = onnx_model.graph
    by_name = {v.name: v for v in graph.outputs}
    for alias, target in duplicates.items():
        source = by_name[target]
        node = ir.node("Identity", inputs=[source], outputs=[ir.Value(name=alias)])
        node.outputs[0].type = source.type
        node.outputs[0].shape = source.shape
        graph.append(node)
        by_name[alias] = node.outputs[0]
    graph.outputs.clear()
    graph.outputs.extend(by_name[name] for name in names)
    if spec.decoder:
        genai_interface(graph)
    log.info("%d matmul-shaped Einsum nodes rewritten as MatMul", einsums_to_matmul(graph))
    log.info("%d Expand nodes left to the broadcasting of their consumers", drop_expands(graph))
    log.info("%d weight reads made to wait for their activations", defer_weight_reads(graph))
    onnx_model.producer_name = "gptoss"
    onnx_model.producer_version = __version__
    return onnx_model


def decoder_inputs(
    cfg: GptOssConfig, traceable: _Traceable
) -> tuple[list[str], list[jax.ShapeDtypeStruct], Callable[..., dict[str, jax.Array]]]:
    """The decoder's input names and symbolic specs (the mask spans past + new positions), and its outputs."""
    batch, seq, past = jax.export.symbolic_shape("batch_size, sequence_length, past_sequence_length")
    kv = jax.ShapeDtypeStruct((batch, cfg.num_key_value_heads, past, cfg.head_dim), jnp.float32)
    layers = cfg.num_hidden_layers
    specs = [jax.ShapeDtypeStruct((batch, seq), jnp.int32), jax.ShapeDtypeStruct((batch, past + seq), jnp.int32)]
    presents = present_names(layers)

    def outputs(input_ids: jax.Array, mask: jax.Array, *rest: jax.Array) -> dict[str, jax.Array]:
        caches, weights = rest[: 2 * layers], rest[2 * layers :]
        past_kv = [(caches[2 * i], caches[2 * i + 1]) for i in range(layers)]
        logits, present = traceable.live(weights).decode(input_ids, mask, past_kv)
        return {"logits": logits, **dict(zip(presents, [t for kv in present for t in kv], strict=True))}

    return [INPUT_NAME, MASK_NAME, *past_names(layers)], specs + [kv] * (2 * layers), outputs


def genai_interface(graph: ir.Graph) -> None:
    """onnxruntime-genai's side of the decoder: int64 ``input_ids``/``attention_mask`` (cast to the int32 the
    model computes with) and the axis name ``total_sequence_length`` for past + new positions."""
    for value in list(graph.inputs):
        if value.name in (INPUT_NAME, MASK_NAME):
            wide = ir.Value(name=value.name, shape=value.shape, type=ir.TensorType(ir.DataType.INT64))
            value.name = f"{value.name}_int32"
            cast = ir.node("Cast", inputs=[wide], attributes={"to": ir.DataType.INT32})
            ir.convenience.replace_all_uses_with(value, cast.outputs[0])
            graph.inputs[graph.inputs.index(value)] = wide
            graph.insert_before(graph.node(0), cast)
    for value in [*graph.inputs, *graph.outputs]:
        if value.shape is not None and any(not isinstance(d, int) and "+" in str(d) for d in value.shape):
            value.shape = ir.Shape([TOTAL_LENGTH if "+" in str(d) else d for d in value.shape])


def is_matmul_equation(equation: str) -> bool:
    """True for einsum equations that are exactly ONNX MatMul: ``P ik, [P] kj -> P ij`` (e.g. ``abc,cd->abd``)."""
    inputs, _, out = equation.replace(" ", "").partition("->")
    a, _, b = inputs.partition(",")
    if len(a) < 2 or len(b) < 2 or not out:
        return False
    batch_a, (i, k), batch_b, (k2, j) = a[:-2], a[-2:], b[:-2], b[-2:]
    letters = a + b
    distinct = len(set(letters)) == len(letters) - 1 - len(batch_b)
    return k == k2 and batch_b in ("", batch_a) and out == batch_a + i + j and distinct


def einsums_to_matmul(graph: ir.Graph) -> int:
    """Rewrite matmul-shaped Einsum nodes (jax2onnx's form of ``dot_general``) as MatMul.

    Same arithmetic, but ONNX Runtime's MatMul reads weights in place (pre-packed once), where its generic
    Einsum kernel transposes operands per call: measured on the 2-layer 20b graph, 2-4× faster and
    5 GB less resident memory.
    """
    rewritten = 0
    for node in list(ir.traversal.RecursiveGraphIterator(graph)):  # If branches (the decoder's MoE) too
        equation = node.attributes.get("equation")
        if node.op_type != "Einsum" or equation is None or not is_matmul_equation(equation.as_string()):
            continue
        matmul = ir.node("MatMul", inputs=list(node.inputs), name=node.name)
        ir.convenience.replace_nodes_and_values(node.graph, node, [node], [matmul], node.outputs, matmul.outputs)
        rewritten += 1
    return rewritten


def is_data_input(name: str) -> bool:
    """The graph inputs a caller feeds (token ids, the decoder's mask and cache); every other one is a weight."""
    return name in (INPUT_NAME, MASK_NAME) or name.startswith(PAST_PREFIX)


@dataclass(frozen=True)
class Placed:
    """A weight's place in the weights file: ``offset`` and ``nbytes`` there, or ``None`` (small: in the graph)."""

    name: str
    stored: StoredArray
    offset: int | None
    nbytes: int


def weights_layout(params: Params) -> tuple[list[Placed], int]:
    """Where each weight of ``params`` goes, and the weights file's size. Tensors over ``EXTERNAL_THRESHOLD_BYTES``
    go to the file, in the params' order, each at a 64 KiB-aligned offset so ONNX Runtime can memory-map it. A
    function of the params alone, so every graph of a model shares one weights file."""
    layout, end = [], 0
    for name, place in params.index.items():
        nbytes = sum(n for _, n in place.segments)
        offset = None if nbytes <= EXTERNAL_THRESHOLD_BYTES else end + (-end % DATA_ALIGNMENT)
        layout.append(Placed(name, place, offset, nbytes))
        end = end if offset is None else offset + nbytes
    return layout, end


def write_weights(params: Params, layout: list[Placed], data_file: Path) -> None:
    """Stream the large weights into ``data_file`` (a temporary renamed into place), one tensor at a time."""
    require_free_space(data_file.parent, params.path.stat().st_size, data_file.name)
    with atomic_output(data_file) as tmp, open(tmp, "wb") as fh:
        for placed in (p for p in layout if p.offset is not None):
            fh.write(b"\0" * (placed.offset - fh.tell()))
            fh.write(memoryview(params.read(placed.name).reshape(-1).view(np.uint8)))


BROADCASTING_OPS = {"Add", "Sub", "Mul", "Div"}


def drop_expands(graph: ir.Graph) -> int:
    """Remove Expand nodes (JAX's explicit broadcasts) whose every consumer is an elementwise op that broadcasts
    by itself and whose other operand already has the expanded shape: same arithmetic, without materialising the
    broadcast (the MXFP4 scale factors expanded over their 32 values were a 2 GB tensor per 20b layer)."""
    dropped = 0
    for node in list(ir.traversal.RecursiveGraphIterator(graph)):
        if node.op_type != "Expand":
            continue
        source, out = node.inputs[0], node.outputs[0]
        uses = list(out.uses())
        if not uses or out in node.graph.outputs or source.shape is None or out.shape is None:
            continue
        if len(source.shape) != len(out.shape) or any(
            s != o and s != 1 for s, o in zip(source.shape.dims, out.shape.dims, strict=True)
        ):
            continue
        if any(user.op_type not in BROADCASTING_OPS for user, _ in uses):
            continue
        others = [user.inputs[1 - index] for user, index in uses]
        if any(
            other is None or other.shape is None or tuple(other.shape.dims) != tuple(out.shape.dims) for other in others
        ):
            continue
        for user, index in uses:
            user.replace_input_with(index, source)
        node.graph.remove(node, safe=True)
        dropped += 1
    return dropped


def defer_weight_reads(graph: ir.Graph) -> int:
    """Make every node that reads only weights (a bfloat16 Cast, a Slice of MXFP4 blocks, then what follows it)
    wait for the activation its result is combined with, so that ONNX Runtime runs it just in time.

    Nothing in a graph keeps ONNX Runtime from running such nodes as soon as a run starts, and it does: on the
    24-layer 20b it cast every layer's attention weights to float32 first and kept them until their layer came
    (2.5 GB). So each such read now takes its weight through a Reshape to the weight's own shape, computed from
    the activation's shape (``shape + 0·dim``): nothing is copied, and the read waits for the activation.
    Returns the number of deferred reads (inside If branches too).
    """
    deferred = 0
    weights = {v for v in graph.inputs if not is_data_input(v.name)} | set(graph.initializers.values())
    for sub in (graph, *subgraphs(graph)):
        constant = weights | set(sub.initializers.values())
        for node in sub:  # in topological order: a node of constants makes constants
            if all(v is None or v in constant for v in node.inputs):
                constant.update(node.outputs)
        for node in list(sub):
            weight = node.inputs[0] if node.op_type in ("Cast", "Slice") and node.inputs else None
            if weight not in weights or weight.shape is None or not weight.shape.is_static():
                continue
            anchor = runtime_anchor(node, constant)
            if anchor is None:
                continue
            size = ir.node("Shape", [anchor], attributes={"start": 0, "end": 1})
            zero = ir.node("Mul", [size.outputs[0], constant_node(np.zeros(1, np.int64)).outputs[0]])
            target = constant_node(np.asarray(weight.shape.numpy(), np.int64))
            shape = ir.node("Add", [target.outputs[0], zero.outputs[0]])
            reshaped = ir.node("Reshape", [weight, shape.outputs[0]])
            reshaped.outputs[0].shape, reshaped.outputs[0].type = weight.shape, weight.type
            nodes = [size, zero.inputs[1].producer(), zero, target, shape, reshaped]
            sub.insert_before(node, nodes)
            node.replace_input_with(0, reshaped.outputs[0])
            deferred += 1
        sub.sort()  # the anchors come later in the node list than some of the reads now waiting for them
    return deferred


def subgraphs(graph: ir.Graph) -> list[ir.Graph]:
    """Every graph nested in ``graph``'s nodes (If branches), at any depth."""
    found = []
    for node in ir.traversal.RecursiveGraphIterator(graph):
        found += [a.value for a in node.attributes.values() if a.type == ir.AttributeType.GRAPH]
    return found


def constant_node(array: np.ndarray) -> ir.Node:
    return ir.node("Constant", [], attributes={"value": ir.tensor(array)})


def runtime_anchor(node: ir.Node, constant: set[ir.Value]) -> ir.Value | None:
    """The first run-time value (not made of weights and constants) that ``node``'s result meets downstream, in
    the same graph: the activation it is multiplied with, added to, looked up by."""
    frontier, seen = [node], {id(node)}
    while frontier:
        for value in frontier.pop(0).outputs:
            for user, _ in value.uses():
                if user.graph is not node.graph:
                    continue
                runtime = [v for v in user.inputs if v is not None and v not in constant]
                if runtime:
                    return runtime[0]
                if id(user) not in seen:
                    seen.add(id(user))
                    frontier.append(user)
    return None


def attach_weights(onnx_model: ir.Model, params: Params, layout: list[Placed], size: int, data_file: Path) -> None:
    """Turn the weight inputs into initializers by their ``layout`` (:func:`weights_layout`): the large ones point
    into ``data_file`` (written by :func:`write_weights`, or an earlier export's: it is checked to have the
    layout's ``size``), the small ones are read into the graph."""
    graph = onnx_model.graph
    inputs = {v.name: v for v in graph.inputs if not is_data_input(v.name)}
    if not data_file.is_file() or data_file.stat().st_size != size:
        found = f"{data_file.stat().st_size} bytes" if data_file.is_file() else "no file"
        raise GptOssError(f"{data_file}: {found}, but the weights of {params.path} take {size}: export them first")
    for placed in layout:
        value = inputs[placed.name]
        if placed.offset is None:
            value.const_value = ir.Tensor(params.read(placed.name), name=placed.name)
        else:
            value.const_value = ir.ExternalTensor(
                data_file.name,
                placed.offset,
                placed.nbytes,
                value.dtype,
                shape=value.shape,
                name=placed.name,
                base_dir=data_file.parent,
            )
    # Weights that are not float32 (bfloat16, MXFP4 blocks and scales) stay graph inputs too, with their
    # initializers as defaults: ONNX Runtime never constant-folds an overridable initializer. Folded, their
    # float32 casts and MXFP4 decodes would be computed once at load and kept, four to eight times their size
    # (onnxruntime-genai, which cannot switch constant folding off, ran out of memory on the 2-layer 20b).
    graph.inputs[:] = [v for v in graph.inputs if is_data_input(v.name) or v.dtype != ir.DataType.FLOAT]
    for value in inputs.values():
        graph.register_initializer(value)


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
