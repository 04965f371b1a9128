"""Rewrite passes over a traced graph: pure ``onnx_ir`` functions, free of JAX, that keep the arithmetic and change
how ONNX Runtime runs it. Each edits the graph in place, If branches included, and returns what it changed."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from gptoss.graphs.genai import TOTAL_LENGTH
from gptoss.graphs.names import INPUT_NAME, MASK_NAME, is_data_input

BROADCASTING_OPS = {"Add", "Sub", "Mul", "Div"}


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
    """Rewrite matmul-shaped Einsum nodes (jax2onnx's form of ``dot_general``) as MatMul: same arithmetic, but ONNX
    Runtime's MatMul reads weights in place (pre-packed once) where its Einsum transposes operands per call."""
    rewritten = 0
    for node in list(ir.traversal.RecursiveGraphIterator(graph)):  # If branches (the decoder's MoE) too
        equation = node.attributes.get("equation")
        if node.op_type != "Einsum" or equation is None or not is_matmul_equation(equation.as_string()):
            continue
        matmul = ir.node("MatMul", inputs=list(node.inputs), name=node.name)
        ir.convenience.replace_nodes_and_values(node.graph, node, [node], [matmul], node.outputs, matmul.outputs)
        rewritten += 1
    return rewritten


def drop_expands(graph: ir.Graph) -> int:
    """Remove Expand nodes (JAX's explicit broadcasts) whose every consumer is an elementwise op that broadcasts
    by itself and whose other operand already has the expanded shape: same arithmetic, without materialising the
    broadcast (such as the MXFP4 scale factors expanded over their 32 values)."""
    dropped = 0
    for node in list(ir.traversal.RecursiveGraphIterator(graph)):
        if node.op_type != "Expand":
            continue
        source, out = node.inputs[0], node.outputs[0]
        uses = list(out.uses())
        if not uses or out in node.graph.outputs or source.shape is None or out.shape is None:
            continue
        dims, source_dims = tuple(out.shape.dims), tuple(source.shape.dims)
        if len(source_dims) != len(dims) or any(s != o and s != 1 for s, o in zip(source_dims, dims, strict=True)):
            continue
        if any(user.op_type not in BROADCASTING_OPS for user, _ in uses):
            continue
        others = [user.inputs[1 - index] for user, index in uses]
        if any(other is None or other.shape is None or tuple(other.shape.dims) != dims for other in others):
            continue
        for user, index in uses:
            user.replace_input_with(index, source)
        node.graph.remove(node, safe=True)
        dropped += 1
    return dropped


def defer_weight_reads(graph: ir.Graph) -> int:
    """Make every node that reads only weights (a bfloat16 Cast, a Slice of MXFP4 blocks) wait for the activation
    its result is combined with; left free, ONNX Runtime runs them all first and keeps every layer's result until
    its layer comes. The weight goes through a Reshape to its own shape computed from the activation's
    (``shape + 0·dim``): nothing is copied, and the read waits. Returns the number of deferred reads."""
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
            for i, made in enumerate(nodes if sub is not graph else []):  # a branch's own counter repeats others'
                made.name = made.outputs[0].name = f"defer_{deferred}_{i}"
            sub.insert_before(node, nodes)
            node.replace_input_with(0, reshaped.outputs[0])
            deferred += 1
        sub.sort()  # the anchors come later in the node list than some of the reads waiting for them
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


def replace_output(node: ir.Node, out: ir.Value) -> None:
    """``out`` (made by nodes already inserted before ``node``) takes the place of ``node``'s single output
    everywhere, under its name, type and shape (a graph output keeps its name); ``node`` is removed."""
    old = node.outputs[0]
    out.type, out.shape = old.type, old.shape
    name = old.name
    old.replace_all_uses_with(out, replace_graph_outputs=True)
    node.graph.remove(node, safe=True)
    out.name = name
