"""Tracing the Flax model into an ONNX graph (canonical, debug or decoder: docs/gpt_oss/README.md) with jax2onnx,
then applying the rewrite passes (:mod:`gptoss.graphs.passes`). The model is *abstract* and every weight a graph
input, so no weight is materialised nor captured as a constant; the weights file (:mod:`gptoss.graphs.weights_file`)
turns those inputs into initializers."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import onnx_ir as ir
from flax import nnx

from gptoss import __version__
from gptoss.config import GptOssConfig
from gptoss.graphs.genai import cache_names
from gptoss.graphs.names import INPUT_NAME, MASK_NAME, PRESENT_KEY, PRESENT_VALUE
from gptoss.graphs.passes import defer_weight_reads, drop_expands, einsums_to_matmul, genai_interface
from gptoss.graphs.routed_experts import expand_routed_experts
from gptoss.model.gpt_oss import GptOss, run_segment
from gptoss.model.outputs import output_names, segment_input_name, segment_output_names
from gptoss.model.params import flat_param_specs

log = logging.getLogger("gptoss.export")


@dataclass(frozen=True)
class ExportSpec:
    """What to export: which outputs, which axes are symbolic; ``decoder`` for the KV-cache graph."""

    sequence_length: int
    emit_hidden_states: bool = False
    emit_block_debug: bool = False
    opset: int = 21
    decoder: bool = False
    context_length: int | None = None  # decoder: genai_config's context length (default: the model's)

    @property
    def debug(self) -> bool:
        return self.emit_hidden_states or self.emit_block_debug

    @property
    def stage(self) -> str:
        return "decoder" if self.decoder else "debug" if self.debug else "canonical"


class _Traceable:
    """The model as a function of its inputs and ``*weights``: weights become graph inputs, never constants."""

    def __init__(self, model: GptOss) -> None:
        self.graphdef, state = nnx.split(model)
        self.paths, self.weight_names, self.weight_specs = map(list, zip(*flat_param_specs(state), strict=True))

    def live(self, weights: tuple[jax.Array, ...]) -> GptOss:
        return nnx.merge(self.graphdef, nnx.from_flat_state(list(zip(self.paths, weights, strict=True))))


def forward_outputs(traceable: _Traceable, spec: ExportSpec) -> Callable[..., dict[str, jax.Array]]:
    def outputs(input_ids: jax.Array, *weights: jax.Array) -> dict[str, jax.Array]:
        return traceable.live(weights)(input_ids, spec.emit_hidden_states, spec.emit_block_debug)

    return outputs


def aliases(outputs: Callable[..., dict[str, jax.Array]], specs: list[jax.ShapeDtypeStruct]) -> dict[str, str]:
    """Outputs that are the very same value as an earlier one (name → earlier name), found by one abstract trace:
    ``hidden_state_{i}`` is ``block_{i}_output`` and ``block_{i+1}_input``, and an ONNX value has one name, so such
    duplicates become Identity nodes after export."""
    found: dict[str, str] = {}

    def probe(*args: jax.Array) -> jax.Array:
        values = outputs(*args)
        first_by_id: dict[int, str] = {}
        for name, value in values.items():
            found.setdefault(name, first_by_id.setdefault(id(value), name))
        return next(iter(values.values()))

    jax.eval_shape(probe, *specs)
    return {name: first for name, first in found.items() if name != first}


def _linear_output_check() -> None:
    """jax2onnx 0.17 checks, after lowering each equation, that its outputs are connected by scanning every node
    built so far: quadratic in the graph's size (docs/performance.md). A value that a node produced is connected;
    only the others get the original scan (and onnx.checker checks the written graph whole)."""
    from jax2onnx.converter import output_binding

    original = output_binding._value_is_graph_connected
    if getattr(original, "linear", False):
        return

    def connected(ctx: object, value: ir.Value) -> bool:
        return value.producer() is not None or original(ctx, value)

    connected.linear = True
    output_binding._value_is_graph_connected = connected


def build_onnx(model: GptOss, spec: ExportSpec, rewrite: Callable[[ir.Model], None] | None = None) -> ir.Model:
    """Trace ``model`` (usually abstract) with jax2onnx; every weight is a graph input named after the param.
    ``rewrite`` (a quantized variant, :mod:`gptoss.graphs.variants`) takes the traced model in place of the routed
    experts' expansion, once its Einsums are MatMuls."""
    _linear_output_check()

    traceable = _Traceable(model)
    weight_specs = traceable.weight_specs
    if spec.decoder:
        input_names, input_specs, outputs = decoder_inputs(model.cfg, traceable)
        names, duplicates = ["logits", *cache_names(model.cfg.num_hidden_layers, (PRESENT_KEY, PRESENT_VALUE))], {}
    else:
        input_names = [INPUT_NAME]
        # The debug graph fixes the sequence length; the canonical graph keeps both axes symbolic.
        shape = ("batch", spec.sequence_length) if spec.debug else ("batch", "sequence")
        input_specs = [jax.ShapeDtypeStruct(shape, jnp.int32)]
        outputs = forward_outputs(traceable, spec)
        names = output_names(model.cfg, spec.emit_hidden_states, spec.emit_block_debug)
        duplicates = aliases(outputs, [jax.ShapeDtypeStruct((1, spec.sequence_length), jnp.int32), *weight_specs])
    return _to_onnx(outputs, input_names, input_specs, traceable.weight_names, weight_specs, names, duplicates,
                    spec, rewrite)  # fmt: skip


def _to_onnx(
    outputs: Callable[..., dict[str, jax.Array]],
    input_names: list[str],
    input_specs: list[jax.ShapeDtypeStruct],
    weight_names: list[str],
    weight_specs: list[jax.ShapeDtypeStruct],
    names: list[str],
    duplicates: dict[str, str],
    spec: ExportSpec,
    rewrite: Callable[[ir.Model], None] | None = None,
) -> ir.Model:
    """One trace of ``outputs`` into the graph whose outputs are ``names`` (``duplicates`` as Identity nodes), then
    the rewrite passes."""
    from jax2onnx import to_onnx

    unique = [name for name in names if name not in duplicates]

    def selected(*args: jax.Array) -> tuple[jax.Array, ...]:
        values = outputs(*args)  # one trace of the model
        return tuple(values[name] for name in unique)

    onnx_model = to_onnx(
        selected,
        [*input_specs, *weight_specs],
        input_names=[*input_names, *weight_names],
        output_names=unique,
        opset=spec.opset,
        model_name="gpt_oss",
        return_mode="ir",
    )
    graph = onnx_model.graph
    by_name = {v.name: v for v in graph.outputs}
    for alias, target in duplicates.items():
        source = by_name[target]
        by_name[alias] = ir.Value(name=alias, type=source.type, shape=source.shape)
        graph.append(ir.node("Identity", inputs=[source], outputs=[by_name[alias]]))
    graph.outputs.clear()
    graph.outputs.extend(by_name[name] for name in names)
    if spec.decoder:
        genai_interface(graph)
    if rewrite is None:
        log.info("%d MoE layers routed: each expert once, on its tokens", expand_routed_experts(graph))
    log.info("%d matmul-shaped Einsum nodes rewritten as MatMul", einsums_to_matmul(graph))
    if rewrite is not None:
        rewrite(onnx_model)
    log.info("%d Expand nodes left to the broadcasting of their consumers", drop_expands(graph))
    log.info("%d weight reads made to wait for their activations", defer_weight_reads(graph))
    onnx_model.producer_name = "gptoss"
    onnx_model.producer_version = __version__
    return onnx_model


def segment_pieces(model: GptOss, first: int, last: int) -> dict[str, nnx.Module]:
    """The modules of ranks ``first`` to ``last`` by their weights' prefix: ``embed.``, ``layers.{i}.``, ``norm.``
    and ``unembed.``."""
    layers = model.cfg.num_hidden_layers
    pieces: dict[str, nnx.Module] = {"embed.": model.embed} if first == 0 else {}
    pieces |= {f"layers.{i}.": model.layers[i] for i in range(max(first, 1) - 1, min(last, layers))}
    return pieces | ({"norm.": model.norm, "unembed.": model.unembed} if last == layers + 1 else {})


def build_segment_onnx(model: GptOss, spec: ExportSpec, first: int, last: int) -> ir.Model:
    """The graph of the pieces of ranks ``first`` to ``last`` alone (parity in segments), traced as the whole graph
    is, with the same passes: inputs the token ids and the hidden state entering it, weights only its pieces'
    (named as in the whole graph), outputs :func:`gptoss.model.outputs.segment_output_names`."""
    _linear_output_check()
    cfg, layers = model.cfg, model.cfg.num_hidden_layers
    pieces = []
    for prefix, module in segment_pieces(model, first, last).items():
        graphdef, state = nnx.split(module)
        paths, names, specs = map(list, zip(*flat_param_specs(state), strict=True))
        pieces.append((prefix, graphdef, paths, [prefix + n for n in names], specs))
    weight_names = [name for piece in pieces for name in piece[3]]
    weight_specs = [s for piece in pieces for s in piece[4]]
    shape = ("batch", spec.sequence_length) if spec.debug else ("batch", "sequence")
    entering = segment_input_name(first)
    input_names = [INPUT_NAME] + ([entering] if entering else [])
    input_specs = [jax.ShapeDtypeStruct(shape, jnp.int32)]
    input_specs += [jax.ShapeDtypeStruct((*shape, cfg.hidden_size), jnp.float32)] if entering else []

    def outputs(input_ids: jax.Array, *rest: jax.Array) -> dict[str, jax.Array]:
        hidden, weights = (rest[0], rest[1:]) if entering else (None, rest)
        live: dict[str, nnx.Module] = {}
        for prefix, graphdef, paths, names, _ in pieces:
            mine, weights = weights[: len(names)], weights[len(names) :]
            live[prefix] = nnx.merge(graphdef, nnx.from_flat_state(list(zip(paths, mine, strict=True))))
        view = _SegmentModel(cfg, live)
        return run_segment(view, input_ids, hidden, first, last, spec.emit_block_debug, jit=False)

    names = segment_output_names(cfg, first, last, spec.debug)
    probe = [jax.ShapeDtypeStruct((1, spec.sequence_length), jnp.int32)]
    probe += [jax.ShapeDtypeStruct((1, spec.sequence_length, cfg.hidden_size), jnp.float32)] if entering else []
    duplicates = aliases(outputs, [*probe, *weight_specs])
    duplicates = {alias: target for alias, target in duplicates.items() if alias in names and target in names}
    log.info("tracing ranks %d-%d of 0-%d: %d weights, %d outputs", first, last, layers + 1, len(weight_names),
             len(names))  # fmt: skip
    return _to_onnx(outputs, input_names, input_specs, weight_names, weight_specs, names, duplicates, spec)


class _SegmentModel:
    """A segment's live pieces as :func:`run_segment` asks for them (``embed``, ``layers[i]``, ``norm``,
    ``unembed``, ``cfg``)."""

    def __init__(self, cfg: GptOssConfig, live: dict[str, nnx.Module]) -> None:
        self.cfg = cfg
        self.embed, self.norm, self.unembed = live.get("embed."), live.get("norm."), live.get("unembed.")
        self.layers = {int(p.split(".")[1]): m for p, m in live.items() if p.startswith("layers.")}


def decoder_inputs(
    cfg: GptOssConfig, traceable: _Traceable
) -> tuple[list[str], list[jax.ShapeDtypeStruct], Callable[..., dict[str, jax.Array]]]:
    """The decoder's input names and symbolic specs (the mask spans past + new positions), and its outputs."""
    batch, seq, past = jax.export.symbolic_shape("batch_size, sequence_length, past_sequence_length")
    kv = jax.ShapeDtypeStruct((batch, cfg.num_key_value_heads, past, cfg.head_dim), jnp.float32)
    layers = cfg.num_hidden_layers
    specs = [jax.ShapeDtypeStruct((batch, seq), jnp.int32), jax.ShapeDtypeStruct((batch, past + seq), jnp.int32)]
    presents = cache_names(layers, (PRESENT_KEY, PRESENT_VALUE))

    def outputs(input_ids: jax.Array, mask: jax.Array, *rest: jax.Array) -> dict[str, jax.Array]:
        caches, weights = rest[: 2 * layers], rest[2 * layers :]
        past_kv = [(caches[2 * i], caches[2 * i + 1]) for i in range(layers)]
        logits, present = traceable.live(weights).decode(input_ids, mask, past_kv)
        return {"logits": logits, **dict(zip(presents, [t for kv in present for t in kv], strict=True))}

    return [INPUT_NAME, MASK_NAME, *cache_names(layers)], specs + [kv] * (2 * layers), outputs
