"""dtype mxfp4: the experts stay the checkpoint's MXFP4 blocks and scales through params, graphs and promotion,
decoded exactly where they are used — bit-identically in JAX, in the ONNX graph and in ``gptoss.mxfp4``."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from conftest import assert_one_clean_error, opened, run_cli, streamed
from safetensors.numpy import load_file, save_file

from gptoss.config import WEIGHT_FORMAT_NAMES
from gptoss.formats import mxfp4
from gptoss.formats.params_file import read_params
from gptoss.formats.synth import synthesize
from gptoss.graphs.export import export
from gptoss.graphs.trace import ExportSpec
from gptoss.model.convert import convert
from gptoss.model.experts import decode_mxfp4
from gptoss.model.gpt_oss import forward
from gptoss.model.layers import WEIGHT_FORMATS
from gptoss.model.params import Params
from gptoss.proof.compare import Results
from gptoss.proof.driver import JaxRequest
from gptoss.proof.gate import gate
from gptoss.proof.parity import parity, parity_decoder
from gptoss.proof.tolerances import Tolerances
from gptoss.runtimes.onnx_runtime import ort_session

PROMPT = "What is the capital of France?"
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]  # written here, not imported from the code under test


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    root = tmp_path_factory.mktemp("mxfp4")
    synthesize(root / "checkpoint", "toy", 2, seed=0)
    convert(root / "checkpoint", root / "f32" / "p.msgpack", 2)
    convert(root / "checkpoint", root / "mx" / "p.msgpack", 2, weight_format="mxfp4")
    return root


def reference_decode(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """MXFP4 by the book, element by element: byte b of group g holds elements 32g + 2b (low nibble) and
    32g + 2b + 1 (high nibble); bit 3 is the sign; the group's scale s gives 2^(s-127), 255 NaN."""
    *prefix, groups, width = blocks.shape
    out = np.empty((*prefix, groups * 2 * width), np.float32)
    with np.errstate(over="ignore"):  # 6 * 2^127 is beyond float32: inf, on every side
        for index in np.ndindex(blocks.shape):
            *rows, g, b = index
            for half, code in enumerate((blocks[index] & 0x0F, blocks[index] >> 4)):
                magnitude = np.float32(E2M1[code & 7])
                value = -magnitude if code & 8 else magnitude  # -0.0 for code 8
                scale = scales[(*rows, g)]
                factor = np.float32(np.nan) if scale == 255 else np.float32(2.0 ** (int(scale) - 127))
                out[(*rows, 2 * width * g + 2 * b + half)] = value * factor
    return out


def test_every_weight_format_has_its_dtypes():
    assert tuple(WEIGHT_FORMATS) == WEIGHT_FORMAT_NAMES
    assert WEIGHT_FORMATS["mxfp4"] == (jnp.bfloat16, True)


def test_in_graph_decode_is_bit_identical_to_numpy_and_jax():
    """Every byte in every nibble position under every scale (255 = NaN): the ONNX graph and gptoss.mxfp4 decode
    to the same bits as the by-the-book reference, -0.0 included; JAX too, except for float32 subnormals, which
    XLA on CPU flushes to zero: scale 0's factor 2^-127 is itself one (so every value of that scale), and scale
    1's halves (2^-127). Trained checkpoints' scales are far from those (the synthetic ones are around 120)."""
    from jax2onnx import to_onnx

    blocks = np.tile(np.arange(256, dtype=np.uint8).reshape(16, 16), (256, 1)).reshape(256, 16, 16)
    scales = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 16, axis=1)
    want = reference_decode(blocks, scales)
    specs = [jax.ShapeDtypeStruct(blocks.shape, jnp.uint8), jax.ShapeDtypeStruct(scales.shape, jnp.uint8)]
    (in_graph,) = onnx_runtime_run(to_onnx(decode_mxfp4, specs), blocks, scales)
    for name, got in (("onnx", in_graph), ("numpy", mxfp4.decode(blocks, scales))):
        np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32), err_msg=name)
    assert np.signbit(in_graph[127, 257]) and in_graph[127, 257] == 0  # byte 0x80 (group 8): high nibble 8 is -0.0

    in_jax = np.asarray(jax.jit(decode_mxfp4)(blocks, scales))
    subnormal = (want != 0) & (np.abs(want) < np.finfo(np.float32).tiny)
    assert subnormal[:2].any() and not subnormal[2:].any()
    subnormal[0] = True  # the factor of scale 0
    flushed = np.where(subnormal, np.copysign(np.float32(0), want), want)  # keeps the sign
    np.testing.assert_array_equal(in_jax.view(np.uint32), flushed.view(np.uint32))


def onnx_runtime_run(model: onnx.ModelProto, *inputs: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: x for i, x in zip(session.get_inputs(), inputs, strict=True)})


def test_params_and_graphs_keep_the_checkpoint_bytes(toy, tmp_path):
    """The params hold the checkpoint's blocks and scales (uint8), about a third of the float32 params here;
    every graph's expert initializers are those bytes; the forward pass equals float32 params' (the synthetic
    dense weights are bf16, so nothing is lost); the three graphs share one weights file."""
    params = read_params(toy / "mx" / "p.msgpack")
    stored = load_file(str(toy / "checkpoint" / "model.safetensors"))
    for ours, theirs in (("gate_up_blocks", "gate_up_proj_blocks"), ("down_scales", "down_proj_scales")):
        np.testing.assert_array_equal(params[f"layers.1.mlp.{ours}"], stored[f"model.layers.1.mlp.experts.{theirs}"])
    assert not any(name.endswith("_kernel") and "mlp." in name for name in params)
    assert (toy / "mx" / "p.msgpack").stat().st_size < 0.5 * (toy / "f32" / "p.msgpack").stat().st_size

    graphs = {}
    for stage in ("canonical", "debug", "decoder"):
        graphs[stage] = tmp_path / f"{stage}.onnx"
        spec = ExportSpec(32, *(True, True) if stage == "debug" else (False, False), decoder=stage == "decoder")
        params = Params.open(toy / "mx" / "p.msgpack")
        export(params, graphs[stage], spec, reuse_weights=stage != "canonical")
        initializers = {t.name: t for t in onnx.load(str(graphs[stage]), load_external_data=False).graph.initializer}
        assert initializers["layers.0.mlp.gate_up_blocks"].data_type == onnx.TensorProto.UINT8
        assert not any(name.endswith(("gate_up_kernel", "down_kernel")) for name in initializers)
    assert [p.name for p in tmp_path.glob("*.data")] == ["model.onnx.data"], "one weights file for the three graphs"

    mx, f32 = streamed(toy / "mx" / "p.msgpack"), streamed(toy / "f32" / "p.msgpack")
    ids = jnp.asarray(np.random.default_rng(0).integers(0, 8192, (2, 17)), jnp.int32)
    assert np.array_equal(np.asarray(forward(mx, ids)["logits"]), np.asarray(forward(f32, ids)["logits"]))
    (got,) = ort_session(graphs["canonical"]).run(["logits"], {"input_ids": np.asarray(ids)})
    assert np.abs(got - np.asarray(forward(mx, ids)["logits"])).max() < 2e-5


def test_mxfp4_parity_passes_at_the_default_tolerances(toy, tmp_path):
    params, prompts = opened(toy / "mx" / "p.msgpack", [PROMPT], length=32)
    graphs = {s: tmp_path / f"{s}.onnx" for s in ("canonical", "debug", "decoder")}
    export(params, graphs["canonical"], ExportSpec(32))
    export(params, graphs["debug"], ExportSpec(32, True, True), reuse_weights=True)
    export(params, graphs["decoder"], ExportSpec(32, decoder=True), reuse_weights=True)
    csvs = [tmp_path / f"{s}.csv" for s in graphs]
    parity(params, graphs["canonical"], Results(csvs[0]), JaxRequest(prompts, 32))
    parity(params, graphs["debug"], Results(csvs[1]), JaxRequest(prompts, 32, hidden_states=True, block_debug=True))
    parity_decoder(params, graphs["decoder"], Results(csvs[2]), prompts, 8)
    verdict = tmp_path / "verdict.json"
    gate(csvs, Tolerances(), verdict, expect_stages=["canonical", "debug", "decoder"])
    result = json.loads(verdict.read_text())
    assert result["passed"] and result["generation"]["genai"]["identical"] == 1


def test_mxfp4_bad_inputs(toy, tmp_path):
    # dtype mxfp4 on a checkpoint whose experts are dequantized.
    dense = tmp_path / "dense"
    dense.mkdir()
    tensors = load_file(str(toy / "checkpoint" / "model.safetensors"))
    for layer in range(2):
        for proj in ("gate_up_proj", "down_proj"):
            name = f"model.layers.{layer}.mlp.experts.{proj}"
            decoded = mxfp4.decode(tensors.pop(f"{name}_blocks"), tensors.pop(f"{name}_scales"))
            tensors[name] = np.ascontiguousarray(decoded.transpose(0, 2, 1))  # HF stores them input-major
    save_file(tensors, str(dense / "model.safetensors"))
    (dense / "config.json").write_bytes((toy / "checkpoint" / "config.json").read_bytes())
    out = tmp_path / "out1"
    proc = run_cli("convert", "--checkpoint", dense, "--output", out / "p.msgpack", "--weight-format", "mxfp4")
    assert_one_clean_error(proc, out, "weight format mxfp4", "dequantized 'model.layers.0.mlp.experts.")

    # A scale of 0xFF (NaN in E8M0).
    nan = tmp_path / "nan"
    nan.mkdir()
    tensors = load_file(str(toy / "checkpoint" / "model.safetensors"))
    tensors["model.layers.1.mlp.experts.down_proj_scales"][3, 7, 0] = 255
    save_file(tensors, str(nan / "model.safetensors"))
    (nan / "config.json").write_bytes((toy / "checkpoint" / "config.json").read_bytes())
    for dtype, message in (("mxfp4", "1 NaN scales (0xFF)"), ("float32", "NaN/Inf values")):
        out = tmp_path / f"out_{dtype}"
        proc = run_cli("convert", "--checkpoint", nan, "--output", out / "p.msgpack", "--weight-format", dtype)
        assert_one_clean_error(proc, out, "layers.1.mlp.down", message)

    # Scales of the wrong shape.
    bad = tmp_path / "shape"
    bad.mkdir()
    tensors = load_file(str(toy / "checkpoint" / "model.safetensors"))
    tensors["model.layers.0.mlp.experts.gate_up_proj_scales"] = tensors[
        "model.layers.0.mlp.experts.gate_up_proj_scales"
    ][:, :, :1].copy()
    save_file(tensors, str(bad / "model.safetensors"))
    (bad / "config.json").write_bytes((toy / "checkpoint" / "config.json").read_bytes())
    out = tmp_path / "out_shape"
    proc = run_cli("convert", "--checkpoint", bad, "--output", out / "p.msgpack", "--weight-format", "mxfp4")
    assert_one_clean_error(proc, out, "layers.0.mlp.gate_up_scales", "expected [8, 128, 2]")
