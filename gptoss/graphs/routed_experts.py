"""The routed experts in ONNX: each expert computed once, on the tokens routed to it, and only if any are.

The model's ``routed_experts_p`` (:mod:`gptoss.model.experts`) traces to one placeholder node (``RoutedExperts``
in the ``gptoss`` domain, by the jax2onnx plugin below); :func:`expand_routed_experts` replaces it with, for
each expert ``e`` in turn:

* the tokens that selected ``e`` (``NonZero`` of ``top_idx == e``) and their routing weights;
* an ``If`` on their count: when there are any, expert ``e``'s weights are read (MXFP4 blocks decoded, bfloat16
  cast) once, its two matmuls run on those tokens only (``Gemm``, the bias added in the same op), and the weighted
  rows are added into the output (``ScatterND`` with ``add``: a token selects an expert at most once).

Against the dense path (every token through every expert, 8× the FLOPs at top-4 of 32) and the gathered path (one
copy of an expert's weights per (token, expert) pair), a prefill reads and decodes each used expert once and
multiplies only the routed pairs; a decoding step decodes only the k selected experts. The same products, summed
in another order: the parity proves it against JAX."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx_ir as ir
from jax2onnx.plugins.plugin_system import PrimitiveLeafPlugin, register_primitive

from gptoss.formats import mxfp4 as mxfp4_format
from gptoss.graphs.names import expert_view, viewed_weight
from gptoss.graphs.passes import replace_output
from gptoss.model.experts import ExpertMath, routed_experts_p

DOMAIN, OP = "gptoss", "RoutedExperts"
FLOAT = ir.DataType.FLOAT


@register_primitive(jaxpr_primitive=routed_experts_p.name, context="primitives.gptoss", component="routed_experts")
class RoutedExpertsPlugin(PrimitiveLeafPlugin):
    """jax2onnx lowering of ``routed_experts_p``: the placeholder node, its math as attributes."""

    def lower(self, ctx: Any, eqn: Any) -> None:
        inputs = [ctx.get_value_for_var(v, name_hint=ctx.fresh_name("routed_in")) for v in eqn.invars]
        out_spec = ctx.get_value_for_var(eqn.outvars[0], name_hint=ctx.fresh_name("routed_out"))
        math: ExpertMath = eqn.params["math"]
        attributes = {field: getattr(math, field) for field in ExpertMath.__dataclass_fields__}
        attributes["mxfp4"] = int(math.mxfp4)
        result = getattr(ctx.builder, OP)(*inputs, _domain=DOMAIN, _outputs=[out_spec.name], **attributes)
        result.type, result.shape = out_spec.type, out_spec.shape
        ctx.bind_value_for_var(eqn.outvars[0], result)


class _Nodes:
    """Appends nodes to a list; ``op`` returns the node's single output."""

    def __init__(self, prefix: str) -> None:
        self.nodes: list[ir.Node] = []
        self.prefix = prefix

    def op(self, op_type: str, *inputs: ir.Value | None, **attributes: Any) -> ir.Value:
        node = ir.node(op_type, list(inputs), attributes=attributes, name=f"{self.prefix}/{op_type}_{len(self.nodes)}")
        node.outputs[0].name = node.name
        self.nodes.append(node)
        return node.outputs[0]

    def const(self, array: np.ndarray | float | int, name: str) -> ir.Value:
        return self.op("Constant", value=ir.tensor(np.asarray(array), name=f"{self.prefix}/{name}"))


def scaled_pairs() -> np.ndarray:
    """Every (scale, byte) pair's two float32 values, ``[256·256, 2]`` at ``scale·256 + byte``: the products that
    :func:`gptoss.formats.mxfp4.decode` computes, so one lookup decodes a byte and applies its scale."""
    with np.errstate(over="ignore"):  # 6 · 2^127 is inf, as in the reference decode
        return (mxfp4_format.E8M0_VALUES[:, None, None] * mxfp4_format.FP4_PAIRS[None]).reshape(-1, 2)


def _decoded(b: _Nodes, table: ir.Value, blocks: ir.Value, scales: ir.Value, expert: ir.Value, rows: int,
             cols: int) -> ir.Value:  # fmt: skip
    """Expert ``expert``'s MXFP4 weights ``[rows, cols]`` float32, bit-identical to
    :func:`gptoss.formats.mxfp4.decode`: each byte and its group's scale look up their two values in ``table``
    (:func:`scaled_pairs`)."""
    codes = b.op("Cast", b.op("Gather", blocks, expert, axis=0), to=ir.DataType.INT32)  # [rows, G, 16]
    exponents = b.op("Cast", b.op("Gather", scales, expert, axis=0), to=ir.DataType.INT32)  # [rows, G]
    rows_of_table = b.op("Mul", exponents, b.const(np.int32(256), "row"))
    index = b.op("Add", codes, b.op("Unsqueeze", rows_of_table, b.const(np.array([2], np.int64), "last")))
    values = b.op("Gather", table, index, axis=0)  # [rows, G, 16, 2]
    return b.op("Reshape", values, b.const(np.array([rows, cols], np.int64), "weight_shape"))


def _as_float(b: _Nodes, value: ir.Value, like: ir.Value) -> ir.Value:
    return value if like.dtype == FLOAT else b.op("Cast", value, to=FLOAT)


def _expert_branch(
    math: ExpertMath, arrays: list[ir.Value], kernels: tuple[ir.Value, ir.Value] | ir.Value, expert: int,
    tokens: ir.Value, x: ir.Value, weights: ir.Value, acc: ir.Value, prefix: str,
) -> ir.Graph:  # fmt: skip
    """The ``If`` branch that runs expert ``expert`` on ``x``'s rows ``tokens`` and adds its weighted output
    into ``acc``; ``kernels``: the expert's own (gate_up, down) kernels (views), or for MXFP4 the decoding table."""
    b = _Nodes(prefix)
    e = b.const(np.int64(expert), "expert")
    h, i = math.hidden, math.intermediate
    rows = b.op("Gather", x, tokens, axis=0)  # [P, H]
    if math.mxfp4:
        gu_blocks, gu_scales, gu_bias, down_blocks, down_scales, down_bias = arrays
        gate_up_w = _decoded(b, kernels, gu_blocks, gu_scales, e, 2 * i, h)
        down_w = _decoded(b, kernels, down_blocks, down_scales, e, h, i)
        trans_b = 1  # stored [out, in]
    else:
        _, gu_bias, _, down_bias = arrays
        gate_up_w, down_w = (_as_float(b, kernel, kernel) for kernel in kernels)
        trans_b = 0  # [in, out]
    gate_up_b = _as_float(b, b.op("Gather", gu_bias, e, axis=0), gu_bias)
    down_b = _as_float(b, b.op("Gather", down_bias, e, axis=0), down_bias)
    gate_up = b.op("Gemm", rows, gate_up_w, gate_up_b, transB=trans_b)  # [P, 2I]
    # Trap: gate_up columns are interleaved — even columns gate, odd columns linear.
    axis, end, two = (b.const(np.array([v], np.int64), n) for v, n in ((1, "axis"), (2 * i, "end"), (2, "step")))
    gate = b.op("Slice", gate_up, b.const(np.array([0], np.int64), "even"), end, axis, two)
    linear = b.op("Slice", gate_up, b.const(np.array([1], np.int64), "odd"), end, axis, two)
    # Trap: the gate is clamped from above only, the linear part on both sides; then +1 on linear.
    limit = math.swiglu_limit
    gate = b.op("Min", gate, b.const(np.float32(limit), "limit"))
    linear = b.op("Clip", linear, b.const(np.float32(-limit), "low"), b.const(np.float32(limit), "high"))
    sigmoid = b.op("Sigmoid", b.op("Mul", gate, b.const(np.float32(math.swiglu_alpha), "alpha")))
    act = b.op("Mul", b.op("Mul", gate, sigmoid), b.op("Add", linear, b.const(np.float32(1.0), "one")))
    out = b.op("Gemm", act, down_w, down_b, transB=trans_b)  # [P, H]
    pair_weights = b.op("Unsqueeze", b.op("Gather", weights, tokens, axis=0), axis)  # [P, 1]
    weighted = b.op("Mul", out, pair_weights)
    updated = b.op("ScatterND", acc, b.op("Unsqueeze", tokens, axis), weighted, reduction="add")
    return ir.Graph([], [updated], nodes=b.nodes, name=prefix)


def _views(graph: ir.Graph, weight: ir.Value, experts: int) -> list[ir.Value]:
    """Each expert's part of the weight input ``weight [E, ...]`` as a weight input of its own, the same bytes of
    the weights file (:func:`gptoss.graphs.weights_file.attach_weights`): read in place, never copied per call."""
    shape = ir.Shape(list(weight.shape.dims)[1:])
    views = [ir.Value(name=expert_view(weight.name, e), shape=shape, type=weight.type) for e in range(experts)]
    graph.inputs.extend(views)
    return views


def _routed_nodes(root: ir.Graph, node: ir.Node, prefix: str, table: ir.Value | None) -> tuple[list[ir.Node], ir.Value]:
    """The nodes replacing one placeholder, and the value replacing its output (expert views added to ``root``'s
    inputs; ``table``: :func:`scaled_pairs`, shared)."""
    attrs = {name: attr.value for name, attr in node.attributes.items()}
    math = ExpertMath(**{**attrs, "mxfp4": bool(attrs["mxfp4"])})
    x, top_idx, top_weights, *arrays = node.inputs
    kernels = None if math.mxfp4 else list(zip(*(_views(root, arrays[i], math.experts) for i in (0, 2)), strict=True))
    b = _Nodes(prefix)
    flat_x = b.op("Reshape", x, b.const(np.array([-1, math.hidden], np.int64), "x_shape"))
    k_shape = b.const(np.array([-1, math.top_k], np.int64), "k_shape")
    flat_idx, flat_weights = b.op("Reshape", top_idx, k_shape), b.op("Reshape", top_weights, k_shape)
    acc = b.op("ConstantOfShape", b.op("Shape", flat_x), value=ir.tensor(np.zeros(1, np.float32)))
    one, flat = b.const(np.array([1], np.int64), "axis1"), b.const(np.array([-1], np.int64), "flat")
    zero = b.const(np.int64(0), "zero")
    for expert in range(math.experts):
        index = b.const(np.array(expert, top_idx.dtype.numpy()), f"e{expert}")
        hit = b.op("Cast", b.op("Equal", flat_idx, index), to=FLOAT)  # [N, k]
        weights = b.op("ReduceSum", b.op("Mul", hit, flat_weights), one, keepdims=0)  # [N]: 0 where not selected
        tokens = b.op("Reshape", b.op("NonZero", b.op("ReduceMax", hit, one, keepdims=0)), flat)  # [P] int64
        own = table if kernels is None else kernels[expert]
        then = _expert_branch(math, arrays, own, expert, tokens, flat_x, weights, acc, f"{prefix}/expert{expert}")
        skip = ir.node("Identity", [acc], name=f"{prefix}/expert{expert}/skip")
        skip.outputs[0].name = skip.name
        otherwise = ir.Graph([], [skip.outputs[0]], nodes=[skip], name=f"{prefix}/expert{expert}/none")
        acc = b.op("If", b.op("Greater", b.op("Size", tokens), zero), then_branch=then, else_branch=otherwise)
    out = b.op("Reshape", acc, b.op("Shape", x))
    return b.nodes, out


def expand_routed_experts(graph: ir.Graph) -> int:
    """Replace every ``RoutedExperts`` placeholder (of the main graph and its branches) by its routed nodes;
    returns how many."""
    placeholders = [n for n in ir.traversal.RecursiveGraphIterator(graph) if n.domain == DOMAIN and n.op_type == OP]
    table = None
    if any(n.attributes["mxfp4"].value for n in placeholders):
        table = ir.Value(name="mxfp4_scaled_pairs", const_value=ir.tensor(scaled_pairs(), name="mxfp4_scaled_pairs"))
        graph.register_initializer(table)
    for index, node in enumerate(placeholders):
        nodes, out = _routed_nodes(graph, node, f"routed_experts_{index}", table)
        node.graph.insert_before(node, nodes)
        replace_output(node, out)
    if placeholders and DOMAIN in graph.opset_imports:
        del graph.opset_imports[DOMAIN]
    viewed = {viewed_weight(v.name)[0] for v in graph.inputs if viewed_weight(v.name)}
    graph.inputs[:] = [v for v in graph.inputs if v.name not in viewed or v.uses()]  # wholly replaced by views
    return len(placeholders)
