"""The routed experts graph (gptoss.graphs.routed_experts) against the JAX experts (gptoss.model.experts): the same
outputs for every weight format, with an expert no token selected, with the swiglu clamps active, for a prefill and
for one token; and ONNX Runtime runs only the selected experts' matmuls."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import pytest
from jax2onnx import to_onnx

from gptoss.graphs.names import expert_view, viewed_weight
from gptoss.graphs.routed_experts import DOMAIN, expand_routed_experts
from gptoss.model.experts import ExpertMath, dense, expert_outputs, expert_weights, routed, selected

HIDDEN, INTER, EXPERTS, TOP_K = 64, 32, 4, 2


def arrays_for(math: ExpertMath, rng: np.random.Generator, dtype=np.float32) -> tuple[np.ndarray, ...]:
    """Random expert arrays in gptoss.model.experts' order; large enough that the swiglu clamps bite."""
    e, h, i = math.experts, math.hidden, math.intermediate
    if math.mxfp4:
        return (
            rng.integers(0, 256, (e, 2 * i, h // 32, 16), dtype=np.uint8),
            rng.integers(120, 128, (e, 2 * i, h // 32), dtype=np.uint8),
            rng.standard_normal((e, 2 * i)).astype(jnp.bfloat16),
            rng.integers(0, 256, (e, h, i // 32, 16), dtype=np.uint8),
            rng.integers(120, 128, (e, h, i // 32), dtype=np.uint8),
            rng.standard_normal((e, h)).astype(jnp.bfloat16),
        )
    return tuple(
        (rng.standard_normal(shape) * scale).astype(dtype)
        for shape, scale in (((e, h, 2 * i), 0.6), ((e, 2 * i), 1.0), ((e, i, h), 0.2), ((e, h), 1.0))
    )


def routing(rng: np.random.Generator, tokens: int, unused: int) -> tuple[np.ndarray, np.ndarray]:
    """Distinct experts per token, never ``unused``; softmax weights."""
    choices = [e for e in range(EXPERTS) if e != unused]
    idx = np.stack([rng.choice(choices, TOP_K, replace=False) for _ in range(tokens)]).astype(np.int32)
    logits = rng.standard_normal((tokens, TOP_K)).astype(np.float32)
    weights = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    return idx[None], weights[None].astype(np.float32)


def routed_graph(math: ExpertMath, arrays: tuple[np.ndarray, ...]) -> ir.Model:
    seq = jax.export.symbolic_shape("seq")[0]
    specs = [
        jax.ShapeDtypeStruct((1, seq, math.hidden), jnp.float32),
        jax.ShapeDtypeStruct((1, seq, math.top_k), jnp.int32),
        jax.ShapeDtypeStruct((1, seq, math.top_k), jnp.float32),
        *(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in arrays),
    ]
    names = ["x", "top_idx", "top_weights", *(f"w{j}" for j in range(len(arrays)))]

    def fn(x, top_idx, top_weights, *weights):
        return routed(math, weights, x, top_idx, top_weights)

    model = to_onnx(fn, specs, input_names=names, opset=21, return_mode="ir")
    assert any(n.domain == DOMAIN for n in model.graph)
    assert expand_routed_experts(model.graph) == 1
    assert not any(n.domain == DOMAIN for n in ir.traversal.RecursiveGraphIterator(model.graph))
    return model


def run_graph(model: ir.Model, feeds: dict[str, np.ndarray], profile: str | None = None) -> np.ndarray:
    """Run ``model``: the weights as initializers (as the export attaches them; bfloat16 cannot be fed)."""
    for value in model.graph.inputs:
        if value.name not in ("x", "top_idx", "top_weights"):
            value.const_value = ir.Tensor(np.ascontiguousarray(feeds.pop(value.name)), name=value.name)
            model.graph.register_initializer(value)
    options = ort.SessionOptions()
    if profile:
        options.enable_profiling, options.profile_file_prefix = True, profile
    session = ort.InferenceSession(ir.to_proto(model).SerializeToString(), options, providers=["CPUExecutionProvider"])
    (out,) = session.run(None, feeds)
    return (out, session.end_profiling()) if profile else out


def feeds_for(model: ir.Model, arrays, x, idx, weights) -> dict[str, np.ndarray]:
    feeds = {"x": x, "top_idx": idx, "top_weights": weights}
    by_name = {f"w{j}": a for j, a in enumerate(arrays)}
    for value in model.graph.inputs:
        view = viewed_weight(value.name)
        if value.name in by_name:
            feeds[value.name] = by_name[value.name]
        elif view:
            feeds[value.name] = by_name[view[0]][view[1]]
    return feeds


@pytest.mark.parametrize("weight_format", ["float32", "bfloat16", "mxfp4"])
@pytest.mark.parametrize("tokens", [1, 7])
def test_routed_graph_computes_the_dense_experts(weight_format, tokens):
    rng = np.random.default_rng(tokens)
    math = ExpertMath(EXPERTS, TOP_K, HIDDEN, INTER, 7.0, 1.702, weight_format == "mxfp4")
    arrays = arrays_for(math, rng, jnp.bfloat16 if weight_format == "bfloat16" else np.float32)
    x = (rng.standard_normal((1, tokens, HIDDEN)) * 2).astype(np.float32)
    idx, weights = routing(rng, tokens, unused=3)  # expert 3's branch never runs

    want, _ = dense(math, tuple(map(jnp.asarray, arrays)), jnp.asarray(x), jnp.asarray(idx), jnp.asarray(weights))
    every = jnp.broadcast_to(jnp.asarray(x.reshape(1, -1, HIDDEN)), (EXPERTS, tokens, HIDDEN))
    preact, _, _ = expert_outputs(math, every, expert_weights(math, tuple(map(jnp.asarray, arrays)), slice(0, EXPERTS)))
    assert float(jnp.abs(preact).max()) > 7.0, "the clamps must bite somewhere"

    model = routed_graph(math, arrays)
    got = run_graph(model, feeds_for(model, arrays, x, idx, weights))
    scale = float(jnp.abs(want).max())
    np.testing.assert_allclose(got, np.asarray(want), atol=2e-6 * scale, rtol=0)
    # the primitive itself, eager and jitted, runs the JAX experts (the selected ones for few tokens)
    eager = routed(math, tuple(map(jnp.asarray, arrays)), jnp.asarray(x), jnp.asarray(idx), jnp.asarray(weights))
    np.testing.assert_allclose(np.asarray(eager), np.asarray(want), atol=2e-6 * scale, rtol=0)
    jitted = jax.jit(lambda *a: routed(math, a[3:], *a[:3]))(x, idx, weights, *arrays)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(want), atol=2e-6 * scale, rtol=0)


def test_float_experts_are_read_through_views_of_their_own():
    """Float kernels: one weight input per expert (the same bytes of the weights file), the whole one gone."""
    math = ExpertMath(EXPERTS, TOP_K, HIDDEN, INTER, 7.0, 1.702, False)
    model = routed_graph(math, arrays_for(math, np.random.default_rng(0)))
    names = [v.name for v in model.graph.inputs]
    assert "w0" not in names and "w2" not in names  # the gate_up and down kernels, replaced
    assert {expert_view("w0", e) for e in range(EXPERTS)} <= set(names)
    assert "w1" in names and "w3" in names  # the biases: small, gathered


def test_one_token_runs_only_its_selected_experts(tmp_path):
    """A decoding step (one token) multiplies by its k experts only: 2·k Gemm runs, not 2·E."""
    rng = np.random.default_rng(5)
    math = ExpertMath(EXPERTS, TOP_K, HIDDEN, INTER, 7.0, 1.702, True)
    arrays = arrays_for(math, rng)
    x = rng.standard_normal((1, 1, HIDDEN)).astype(np.float32)
    idx, weights = routing(rng, 1, unused=0)
    model = routed_graph(math, arrays)
    _, trace = run_graph(model, feeds_for(model, arrays, x, idx, weights), profile=str(tmp_path / "p"))
    events = json.loads(open(trace).read())
    gemms = [e for e in events if e.get("cat") == "Node" and e["args"].get("op_name") == "Gemm"]
    gemms = [e for e in gemms if e["name"].endswith("_kernel_time")]
    assert len(gemms) == 2 * TOP_K


def test_selected_and_dense_experts_agree():
    """The JAX decoding path (only the selected experts, gathered) computes what the dense path does."""
    rng = np.random.default_rng(2)
    math = ExpertMath(EXPERTS, TOP_K, HIDDEN, INTER, 7.0, 1.702, True)
    arrays = tuple(map(jnp.asarray, arrays_for(math, rng)))
    x = jnp.asarray(rng.standard_normal((2, 3, HIDDEN)), jnp.float32)
    idx, weights = routing(rng, 6, unused=1)
    idx, weights = jnp.asarray(idx.reshape(2, 3, TOP_K)), jnp.asarray(weights.reshape(2, 3, TOP_K))
    want, _ = dense(math, arrays, x, idx, weights)
    got = selected(math, arrays, x, idx, weights)
    assert float(jnp.abs(want - got).max()) <= 1e-5 * float(jnp.abs(want).max())


def test_routed_decode_is_bit_identical_to_the_reference():
    """Every byte under every scale (255 = NaN), as the routed graph decodes an expert: the same bits as
    gptoss.formats.mxfp4.decode, -0.0 and subnormals included."""
    from gptoss.formats import mxfp4
    from gptoss.graphs.routed_experts import _decoded, _Nodes, scaled_pairs

    blocks = np.tile(np.arange(256, dtype=np.uint8).reshape(16, 16), (256, 1)).reshape(1, 256, 16, 16)
    scales = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 16, axis=1)[None]
    inputs = [ir.Value(name=n, shape=ir.Shape(a.shape), type=ir.TensorType(ir.DataType.UINT8))
              for n, a in (("blocks", blocks), ("scales", scales))]  # fmt: skip
    table = ir.Value(name="table", const_value=ir.tensor(scaled_pairs(), name="table"))
    b = _Nodes("decode")
    out = _decoded(b, table, *inputs, b.const(np.int64(0), "expert"), 256, 512)
    graph = ir.Graph(inputs, [out], nodes=b.nodes, initializers=[table], opset_imports={"": 21})
    session = ort.InferenceSession(ir.to_proto(ir.Model(graph, ir_version=10)).SerializeToString())
    (got,) = session.run(None, {"blocks": blocks, "scales": scales})
    want = mxfp4.decode(blocks[0], scales[0])
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    assert np.isnan(got[255]).all() and np.signbit(got[127, 257]) and got[127, 257] == 0
