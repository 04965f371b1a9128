"""The graph rewrite passes on tiny hand-built graphs, without JAX: each changes the structure it targets, leaves
the rest alone, and ONNX Runtime computes the same outputs before and after."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from gptoss.graphs.passes import defer_weight_reads, drop_expands, einsums_to_matmul, genai_interface

RNG = np.random.default_rng(0)


def graph_model(nodes, inputs, outputs, initializers=()) -> onnx.ModelProto:
    """A model of ``nodes`` with shape-inferred intermediate values (the passes read their shapes)."""
    graph = helper.make_graph(nodes, "g", inputs, outputs, [numpy_helper.from_array(a, n) for n, a in initializers])
    return onnx.shape_inference.infer_shapes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))


def run(model: onnx.ModelProto | ir.Model, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    proto = model if isinstance(model, onnx.ModelProto) else ir.to_proto(model)
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def rewritten(proto: onnx.ModelProto, rewrite, feeds, after_feeds=None) -> tuple[ir.Model, object]:
    """Apply ``rewrite`` to the model and check ONNX Runtime's outputs are identical before and after."""
    model = ir.from_proto(proto)
    result = rewrite(model.graph)
    for before, after in zip(run(proto, feeds), run(model, after_feeds or feeds), strict=True):
        np.testing.assert_array_equal(after, before)
    return model, result


def op_types(model: ir.Model) -> list[str]:
    return [node.op_type for node in model.graph]


def floats(*shape: int) -> np.ndarray:
    return (RNG.uniform(0.5, 2.0, shape) * RNG.choice([-1, 1], shape)).astype(np.float32)


def test_passes_import_without_jax():
    code = "import sys, gptoss.graphs.passes; assert 'jax' not in sys.modules and 'flax' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_einsums_to_matmul_rewrites_only_matmul_shaped_equations():
    f = TensorProto.FLOAT
    proto = graph_model(
        [
            helper.make_node("Einsum", ["x", "w"], ["y"], equation="abc,cd->abd"),
            helper.make_node("Einsum", ["q", "k"], ["s"], equation="bqngd,bnsd->bngqs"),
        ],
        [helper.make_tensor_value_info(n, f, s) for n, s in [("x", [2, 3, 4]), ("w", [4, 5]), ("q", [1, 3, 2, 2, 4])]]
        + [helper.make_tensor_value_info("k", f, [1, 2, 5, 4])],
        [helper.make_tensor_value_info("y", f, None), helper.make_tensor_value_info("s", f, None)],
    )
    feeds = {"x": floats(2, 3, 4), "w": floats(4, 5), "q": floats(1, 3, 2, 2, 4), "k": floats(1, 2, 5, 4)}
    model, count = rewritten(proto, einsums_to_matmul, feeds)
    assert count == 1
    assert sorted(op_types(model)) == ["Einsum", "MatMul"]
    assert model.graph.outputs[0].producer().op_type == "MatMul"


def test_drop_expands_keeps_only_broadcasts_an_op_needs():
    f = TensorProto.FLOAT
    proto = graph_model(
        [
            helper.make_node("Expand", ["x", "shape"], ["wide"]),
            helper.make_node("Add", ["wide", "y"], ["sum"]),
            helper.make_node("Expand", ["x", "shape"], ["wide2"]),
            helper.make_node("Relu", ["wide2"], ["relu"]),
        ],
        [helper.make_tensor_value_info("x", f, [2, 1, 4]), helper.make_tensor_value_info("y", f, [2, 3, 4])],
        [helper.make_tensor_value_info("sum", f, None), helper.make_tensor_value_info("relu", f, None)],
        [("shape", np.array([2, 3, 4], np.int64))],
    )
    model, count = rewritten(proto, drop_expands, {"x": floats(2, 1, 4), "y": floats(2, 3, 4)})
    assert count == 1
    assert op_types(model) == ["Add", "Expand", "Relu"]
    assert model.graph.outputs[0].producer().inputs[0].name == "x"


def test_defer_weight_reads_makes_a_weight_cast_wait_for_its_activation():
    proto = graph_model(
        [
            helper.make_node("Cast", ["embedding"], ["table"], to=TensorProto.FLOAT),
            helper.make_node("Gather", ["table", "input_ids"], ["hidden"]),
        ],
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, [2, 3]),
            helper.make_tensor_value_info("embedding", TensorProto.FLOAT16, [8, 4]),
        ],
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, None)],
    )
    feeds = {"input_ids": RNG.integers(0, 8, (2, 3)), "embedding": floats(8, 4).astype(np.float16)}
    model, count = rewritten(proto, defer_weight_reads, feeds)
    assert count == 1
    cast = next(node for node in model.graph if node.op_type == "Cast")
    reshape = cast.inputs[0].producer()
    assert reshape.op_type == "Reshape" and reshape.inputs[0].name == "embedding"
    shape_of = next(node for node in model.graph if node.op_type == "Shape")
    assert shape_of.inputs[0].name == "input_ids"


def test_genai_interface_takes_int64_ids_and_names_the_total_length():
    i32 = TensorProto.INT32
    proto = graph_model(
        [
            helper.make_node("ReduceSum", ["attention_mask", "axes"], ["seen"], keepdims=1),
            helper.make_node("Add", ["input_ids", "seen"], ["out"]),
        ],
        [
            helper.make_tensor_value_info("input_ids", i32, ["batch", "sequence"]),
            helper.make_tensor_value_info("attention_mask", i32, ["batch", "past + sequence"]),
        ],
        [helper.make_tensor_value_info("out", i32, None)],
        [("axes", np.array([-1], np.int64))],
    )
    feeds = {"input_ids": RNG.integers(1, 100, (2, 3)).astype(np.int32), "attention_mask": np.ones((2, 5), np.int32)}
    wide = {name: value.astype(np.int64) for name, value in feeds.items()}
    model, _ = rewritten(proto, genai_interface, feeds, wide)
    inputs = {value.name: value for value in model.graph.inputs}
    assert {value.dtype for value in inputs.values()} == {ir.DataType.INT64}
    assert str(inputs["attention_mask"].shape[1]) == "total_sequence_length"
    for value in inputs.values():
        ((user, _),) = value.uses()
        assert user.op_type == "Cast" and user.attributes["to"].as_int() == ir.DataType.INT32
