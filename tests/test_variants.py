"""Quantized variants (gptoss.graphs.variants): the block quantizer against ONNX Runtime's own MatMulNBits, MXFP4
held exactly as int8, and the q4/q8 decoder graphs against the JAX model run on the very weights they hold."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx.helper as oh
import onnxruntime as ort
import pytest
import yaml
from conftest import forward, require_modules

from gptoss.config import params_config_path
from gptoss.errors import GptOssError
from gptoss.formats import mxfp4 as mxfp4_format
from gptoss.formats.params_file import read_params, write_params
from gptoss.formats.synth import synthesize
from gptoss.graphs.export import export, export_variant
from gptoss.graphs.trace import ExportSpec
from gptoss.graphs.variants import dequantize_blocks, mxfp4_as_int8, quantize_blocks, variant
from gptoss.model.convert import convert
from gptoss.model.params import Params, build_model
from gptoss.proof.quality import quality
from gptoss.proof.quality_gate import quality_gate
from gptoss.runtimes.onnx_runtime import empty_past, ort_session

PROMPT_LENGTH = 24
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """A toy checkpoint (MXFP4 experts, bfloat16 elsewhere), its exact decoder and its q4 (float activations) and q8
    variants."""
    root = tmp_path_factory.mktemp("variants")
    synthesize(root / "checkpoint", "toy", 2, seed=0)  # config/toy-mxfp4.yaml's, whose budgets a test applies
    params_path = root / "params.msgpack"
    convert(root / "checkpoint", params_path, 2, weight_format="mxfp4")
    params = Params.open(params_path)
    spec = ExportSpec(32, decoder=True, context_length=64)
    export(params, root / "exact" / "model.onnx", spec)
    export_variant(params, root / "q4" / "model.onnx", spec, variant("q4", accuracy_level=0))
    export_variant(params, root / "q8" / "model.onnx", spec, variant("q8"))
    ids = np.random.default_rng(3).integers(3, params.model_config.vocab_size, (1, PROMPT_LENGTH)).astype(np.int64)
    return {"root": root, "params": params, "ids": ids}


def prefill_logits(model: Path, ids: np.ndarray) -> np.ndarray:
    session = ort_session(model)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), **empty_past(session, 1)}
    return session.run(["logits"], feeds)[0][0]


def ort_matmul_nbits(a: np.ndarray, codes: np.ndarray, scales: np.ndarray, k: int, n: int, bits: int) -> np.ndarray:
    """ONNX Runtime's MatMulNBits (float32 activations) on our codes and scales."""
    node = oh.make_node("MatMulNBits", ["A", "B", "S"], ["Y"], domain="com.microsoft", K=k, N=n, bits=bits,
                        block_size=32, accuracy_level=0)  # fmt: skip
    graph = oh.make_graph(
        [node], "g", [oh.make_tensor_value_info("A", onnx.TensorProto.FLOAT, list(a.shape))],
        [oh.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [a.shape[0], n])],
        [onnx.numpy_helper.from_array(codes, "B"), onnx.numpy_helper.from_array(scales.reshape(-1), "S")],
    )  # fmt: skip
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 21), oh.make_opsetid("com.microsoft", 1)])
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]


@pytest.mark.parametrize("bits", [4, 8])
def test_blocks_are_what_onnx_runtime_multiplies(bits):
    rng = np.random.default_rng(bits)
    n, k = 48, 96
    w = rng.standard_normal((n, k)).astype(np.float32)
    w[3, :32] = 0.0  # an all-zero block
    codes, scales = quantize_blocks(w, bits, 32)
    assert codes.shape == (n, k // 32, 32 * bits // 8) and scales.shape == (n, k // 32)
    deq = dequantize_blocks(codes, scales, bits)
    # Round to nearest on the grid (q - zp)·scale, q - zp in [-2^(b-1), 2^(b-1) - 1]: inside it never off by more
    # than half a step; beyond its top end (the side opposite the extreme) clipped, by less than one step.
    step = np.abs(scales)[..., None]
    with np.errstate(invalid="ignore"):  # the zero block's scale is 0
        error, grid = np.abs(deq - w).reshape(n, -1, 32), w.reshape(n, -1, 32) / scales[..., None]
    inside = grid <= (1 << (bits - 1)) - 1
    assert np.all(error[inside] <= np.broadcast_to(step / 2 * (1 + 1e-6), error.shape)[inside])
    assert np.all(error <= step * (1 + 1e-6))
    extreme = np.abs(w.reshape(n, -1, 32)).max(-1)
    assert np.allclose(np.abs(deq.reshape(n, -1, 32)).max(-1), extreme, rtol=1e-6)
    assert np.all(deq[3, :32] == 0)
    a = rng.standard_normal((5, k)).astype(np.float32)
    np.testing.assert_allclose(ort_matmul_nbits(a, codes, scales, k, n, bits), a @ deq.T, rtol=1e-5, atol=1e-5)


def test_four_bit_codes_put_element_2i_in_the_low_nibble():
    w = np.zeros((1, 32), np.float32)
    w[0, 0], w[0, 1] = -8.0, 1.0  # codes 0 and 9 (zero point 8, scale 1)
    codes, scales = quantize_blocks(w, 4, 32)
    assert scales[0, 0] == 1.0 and codes[0, 0, 0] == (9 << 4) | 0


def test_mxfp4_as_int8_is_exact_for_every_byte_and_scale():
    blocks = np.tile(np.arange(256, dtype=np.uint8).reshape(16, 16), (60, 1)).reshape(60, 16, 16)
    scales = np.repeat(np.arange(0, 255, 17, dtype=np.uint8)[:, None], 16, axis=1)[:, :16]
    blocks, scales = blocks[: len(scales)], scales
    codes, factors = mxfp4_as_int8(blocks, scales)
    assert codes.min() >= 128 - 12 and codes.max() <= 128 + 12
    exact = mxfp4_format.decode(blocks, scales)
    held = dequantize_blocks(codes.reshape(len(scales), -1, 32), factors, 8)
    exact = exact.reshape(held.shape)
    np.testing.assert_array_equal(held, exact)  # equal values (E2M1's -0.0 is held as 0: an integer has no -0)
    nonzero = exact != 0
    np.testing.assert_array_equal(held[nonzero].view(np.uint32), exact[nonzero].view(np.uint32))


def held_experts(model: Path, prefix: str) -> tuple[np.ndarray, np.dtype]:
    """The float32 ``[E, N, K]`` a variant graph's ``prefix`` (``layers.0.mlp.gate_up@q8``) experts stand for, and
    the dtype their scales are held in."""
    graph = onnx.load(str(model)).graph
    held = {t.name: onnx.numpy_helper.to_array(t) for t in graph.initializer if t.name.startswith(prefix + ".")}
    codes, scales = held[f"{prefix}.codes"], held[f"{prefix}.scales"]
    experts = [dequantize_blocks(c.reshape(*s.shape, -1), s, 8) for c, s in zip(codes, scales, strict=True)]
    return np.stack(experts), scales.dtype


def test_q8_graph_holds_mxfp4_experts_exactly_in_float16_or_float32_scales(toy, tmp_path):
    """q8's expert scales are float16 where every power of two fits one, float32 for a layer where one does not
    (here 2^-28 planted in layer 1): either way the graph's experts are the MXFP4 values, bit for bit."""
    arrays = read_params(toy["root"] / "params.msgpack")
    arrays["layers.1.mlp.down_scales"][0, 0, 0] = 100  # 2^(100-128): below float16's smallest subnormal
    planted = tmp_path / "params.msgpack"
    write_params(planted, list(arrays), arrays.__getitem__)
    shutil.copy(params_config_path(toy["root"] / "params.msgpack"), params_config_path(planted))
    params = Params.open(planted)
    spec = ExportSpec(32, decoder=True, context_length=64)
    export_variant(params, tmp_path / "q8" / "model.onnx", spec, variant("q8"))
    for layer, dtype in ((0, np.float16), (1, np.float32)):
        for which in ("gate_up", "down"):
            held, scale_dtype = held_experts(tmp_path / "q8" / "model.onnx", f"layers.{layer}.mlp.{which}@q8")
            base = f"layers.{layer}.mlp.{which}"
            exact = mxfp4_format.decode(arrays[f"{base}_blocks"], arrays[f"{base}_scales"])  # [E, out, in]
            assert scale_dtype == dtype
            np.testing.assert_array_equal(held, exact)


def test_mxfp4_nan_scale_is_refused():
    with pytest.raises(GptOssError, match="NaN code 255"):
        mxfp4_as_int8(np.zeros((1, 1, 16), np.uint8), np.full((1, 1), 255, np.uint8))


def test_unknown_variant_and_bad_block_size_are_refused():
    with pytest.raises(GptOssError, match="unknown variant 'q3'"):
        variant("q3")
    with pytest.raises(GptOssError, match="block size 24"):
        variant("q4", block_size=24)


def dequantized_params(params: Params, bits: int) -> dict[str, np.ndarray]:
    """The weights a variant holds, as float32 params of the JAX model: experts decoded, then through the variant's
    blocks with float16 scales (MXFP4 as int8 is exact), dense kernels (not the router's) through the blocks; the
    rest as stored."""
    out: dict[str, np.ndarray] = {}
    for name in params.index:
        value = np.asarray(params.read(name))
        if name.endswith("_scales"):
            continue
        if name.endswith("_blocks"):
            base = name.removesuffix("_blocks")
            decoded = mxfp4_format.decode(value, params.read(f"{base}_scales"))  # [E, out, in]
            held = np.stack([dequantize_blocks(*quantize_blocks(e, bits, 32, np.float16), bits) for e in decoded])
            out[f"{base}_kernel"] = held.transpose(0, 2, 1)
        elif name.endswith("kernel") and ".router." not in name:
            w = value.astype(np.float32)
            out[name] = dequantize_blocks(*quantize_blocks(w.T, bits, 32), bits).T
        else:
            out[name] = value.astype(np.float32)
    return out


def test_q4_graph_computes_the_model_on_its_own_weights(toy):
    """q4 with float activations (accuracy_level 0) against the JAX model holding the same dequantized weights:
    any layout, transpose, nibble-order, routing or swiglu mistake of the rewrite shows as a large difference."""
    params = toy["params"]
    model = build_model(params.model_config, dequantized_params(params, 4))
    expected = forward(model, toy["ids"].astype(np.int32))["logits"][0]
    got = prefill_logits(toy["root"] / "q4" / "model.onnx", toy["ids"])
    scale = max(1.0, float(np.abs(expected).max()))
    assert np.abs(got - expected).max() <= 2e-5 * scale
    exact = prefill_logits(toy["root"] / "exact" / "model.onnx", toy["ids"])
    assert np.abs(exact - expected).max() > 100 * np.abs(got - expected).max()  # the quantization does show


def test_variant_graphs_hold_integer_kernels_and_their_own_weights(toy):
    for name in ("q4", "q8"):
        folder = toy["root"] / name
        graph = onnx.load(str(folder / "model.onnx"), load_external_data=False).graph
        ops = [n.op_type for n in graph.node]
        assert ops.count("QMoE") == 2 and "If" not in ops  # no routed-experts expansion left
        assert ops.count("MatMulNBits") == 2 * 4 + 1  # q, k, v, o per layer and the unembedding
        assert ops.count("MatMul") == 2  # the routers stay float
        assert {p.name for p in folder.iterdir()} >= {"model.onnx", "genai_config.json", "tokenizer.json"}
        assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no staging left behind


def kld(exact: np.ndarray, other: np.ndarray) -> np.ndarray:
    def log_softmax(x: np.ndarray) -> np.ndarray:
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = log_softmax(exact), log_softmax(other)
    return (np.exp(p) * (p - q)).sum(-1)


def test_q8_is_closer_to_the_exact_model_than_q4(toy):
    exact = prefill_logits(toy["root"] / "exact" / "model.onnx", toy["ids"])
    q8 = kld(exact, prefill_logits(toy["root"] / "q8" / "model.onnx", toy["ids"])).mean()
    q4 = kld(exact, prefill_logits(toy["root"] / "q4" / "model.onnx", toy["ids"])).mean()
    assert 0 < q8 < q4 / 10


def tampered_copy(folder: Path, dest: Path, initializer: str, change) -> Path:
    """A copy of a variant folder whose ``initializer`` is replaced by ``change(array)``."""
    shutil.copytree(folder, dest)
    model = onnx.load(str(dest / "model.onnx"))
    (tensor,) = [t for t in model.graph.initializer if t.name == initializer]
    tensor.CopyFrom(onnx.numpy_helper.from_array(change(onnx.numpy_helper.to_array(tensor)), initializer))
    onnx.save(model, str(dest / "model.onnx"), save_as_external_data=True, location="model.onnx.data")
    return dest


def sign_flipped(scales: np.ndarray) -> np.ndarray:
    """The builder's class of bug: one expert's scales lose their sign (here expert 0's)."""
    flipped = scales.copy()
    flipped[0] = -flipped[0]
    return flipped


def transposed_block(codes: np.ndarray) -> np.ndarray:
    """Swapped N and K, which a square matrix does not show in its shape: expert 1's whole weights (4-bit codes, two
    a byte) written as [in, out]."""
    out = codes.copy()
    weights = np.stack([codes[1] & 0x0F, codes[1] >> 4], axis=-1).reshape(codes.shape[1], -1).T
    out[1] = weights[:, 0::2] | (weights[:, 1::2] << 4)
    return out


@pytest.mark.parametrize(
    ("initializer", "change"),
    [("layers.0.mlp.gate_up@q4.scales", sign_flipped), ("layers.1.mlp.down@q4.codes", transposed_block)],
    ids=["sign_flipped_scales", "transposed_block"],
)
def test_configured_budgets_pass_q4_and_fail_an_injected_bug(toy, tmp_path, initializer, change):
    """The toy-mxfp4 config's q4 budgets, applied by the quality gate: the q4 variant passes; the same variant with
    one injected bug of the kind broken quantized exports shipped fails, naming the statistic and its budget."""
    config = yaml.safe_load((REPO / "config/toy-mxfp4.yaml").read_text())
    budgets = {"q4": config["quality_budgets"]["q4"]}
    settings = dict(max_tokens=config["quality"]["max_tokens"], chunk_length=config["quality"]["chunk_length"])
    exact = toy["root"] / "exact"
    quality(exact, toy["root"] / "q4", "q4", tmp_path / "q4.csv", **settings)
    assert quality_gate([tmp_path / "q4.csv"], budgets, tmp_path / "ok.json")["passed"]
    broken = tampered_copy(toy["root"] / "q4", tmp_path / "broken", initializer, change)
    quality(exact, broken, "q4", tmp_path / "broken.csv", **settings)
    with pytest.raises(GptOssError, match=r"quality gate failed: q4 (kld_mean|kld_p99|top1_agreement|greedy_agr)"):
        quality_gate([tmp_path / "broken.csv"], budgets, tmp_path / "broken.json")
    assert not json.loads((tmp_path / "broken.json").read_text())["variants"]["q4"]["passed"]


def test_quality_measures_the_builders_shared_buffer_graphs(toy, tmp_path):
    """The onnxruntime-genai builder's graphs (shared past/present buffers, a sliding-window cache of the window's
    capacity) measured by the quality stage: its fp32 graph of the same checkpoint agrees with our exact decoder
    to float32 noise on chunks 16 times the window, greedy tokens included, so the stage reads such graphs
    right; its int4 graph then has a divergence of its own."""
    require_modules("torch", "transformers", "accelerate")
    for precision in ("fp32", "int4"):
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", toy["root"] / "checkpoint",
               "-o", tmp_path / precision, "-p", precision, "-e", "cpu", "-c", tmp_path / "cache"]  # fmt: skip
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
    settings = dict(max_tokens=1024, chunk_length=128)
    exact = toy["root"] / "exact"

    def statistics(precision: str) -> dict[str, float]:
        rows = quality(exact, tmp_path / precision, precision, tmp_path / f"{precision}.csv", **settings)
        return {r["statistic"]: r["value"] for r in rows}

    fp32 = statistics("fp32")
    assert fp32["kld_max"] < 1e-9 and fp32["top1_agreement"] == 1.0 and fp32["greedy_agreement"] == 1.0
    assert statistics("int4")["kld_mean"] > 1e-3


def test_quantized_weights_are_the_same_however_often_they_are_read(toy):
    """The lazily computed weights (codes and scales share one computation) give the same bytes when read twice,
    in either order, as a serializer or a checker may read them."""
    import functools

    from gptoss.graphs.trace import build_onnx
    from gptoss.graphs.variants import quantize_graph
    from gptoss.model.params import abstract_model

    params = toy["params"]
    spec = variant("q4")
    model = build_onnx(
        abstract_model(params.model_config, params.config.weight_format),
        ExportSpec(32, decoder=True, context_length=64),
        rewrite=functools.partial(quantize_graph, params=params, spec=spec),
    )
    names = ["layers.0.mlp.gate_up@q4.scales", "layers.0.mlp.gate_up@q4.codes", "unembed.kernel@q4.10.codes"]
    tensors = {n: model.graph.initializers[n].const_value for n in names if n in model.graph.initializers}
    assert len(tensors) >= 2, sorted(model.graph.initializers)[:20]
    first = {n: t.numpy().copy() for n, t in tensors.items()}
    for n, t in reversed(list(tensors.items())):  # each twice in a row, in the other order
        np.testing.assert_array_equal(t.numpy(), first[n])
        np.testing.assert_array_equal(t.numpy(), first[n])


# --- the top-1 agreement per block depth (the variant's probe, the logit lens) ---

CHUNK, MAX_TOKENS = 128, 1024  # config/toy-mxfp4.yaml's quality settings: 7 chunks, 448 scored positions


@pytest.fixture(scope="module")
def lens(toy) -> dict:
    """q4's probe (float activations, as the fixture's q4 decoder) for chunks of CHUNK tokens; the evaluation text's
    tokens; the exact model's lens argmax on them [depths, positions]."""
    from gptoss.proof.depth import exact_top1
    from gptoss.proof.quality import evaluation_tokens, open_decoder

    params = toy["params"]
    probe = toy["root"] / "q4.probe"
    export_variant(
        params, probe / "model.onnx", ExportSpec(CHUNK, emit_hidden_states=True), variant("q4", accuracy_level=0)
    )
    tokens, _, _ = evaluation_tokens(open_decoder(toy["root"] / "exact", "--exact"), None, MAX_TOKENS)
    return {"probe": probe, "tokens": tokens, "exact": exact_top1(params, tokens, CHUNK)}


def probe_argmax(params: Params, probe: Path, tokens: np.ndarray) -> np.ndarray:
    from gptoss.proof.depth import probe_top1, read_head

    session = ort_session(probe / "model.onnx")
    return probe_top1(session, probe, read_head(params), tokens, CHUNK, params.model_config.num_hidden_layers)


def test_q4_probe_computes_the_model_on_its_own_weights_at_every_depth(toy, lens):
    """The probe (whole sequence, hidden-state outputs, no genai files) against the JAX model holding q4's
    dequantized weights, per hidden state; its logits are the q4 decoder's on the same tokens."""
    params = toy["params"]
    ids = np.random.default_rng(4).integers(3, params.model_config.vocab_size, (1, CHUNK))
    model = build_model(params.model_config, dequantized_params(params, 4))
    expected = forward(model, ids.astype(np.int32), emit_hidden_states=True)
    exact = forward(build_model(params.model_config, read_params(toy["root"] / "params.msgpack")),
                    ids.astype(np.int32), emit_hidden_states=True)  # fmt: skip
    session = ort_session(lens["probe"] / "model.onnx")
    names = ["hidden_state_0", "hidden_state_1", "logits"]
    got = dict(zip(names, session.run(names, {"input_ids": ids.astype(np.int32)}), strict=True))
    for name in names:
        diff = np.abs(got[name] - expected[name]).max()
        assert diff <= 2e-5 * max(1.0, float(np.abs(expected[name]).max())), name
        assert np.abs(exact[name] - expected[name]).max() > 100 * diff, name  # the quantization does show
    np.testing.assert_allclose(got["logits"][0], prefill_logits(toy["root"] / "q4" / "model.onnx", ids), atol=1e-4)
    graph = onnx.load(str(lens["probe"] / "model.onnx"), load_external_data=False).graph
    assert [n.op_type for n in graph.node].count("QMoE") == 2
    assert {p.name for p in lens["probe"].iterdir()} == {"model.onnx", "model.onnx.data"}


def test_the_exact_lens_at_the_last_depth_is_the_exact_models_own_top1(toy, lens):
    """The lens applies the exact head (final norm, unembedding) to the last hidden state: the exact model's own
    next-token argmax, at every scored position."""
    from gptoss.model.gpt_oss import forward as streamed_forward
    from gptoss.proof.quality import text_chunks
    from gptoss.runtimes.jax_model import StreamedModel

    model = StreamedModel(toy["params"])
    own = [
        np.asarray(streamed_forward(model, ids.astype(np.int32))["logits"])[0, CHUNK // 2 :].argmax(-1)
        for ids in text_chunks(lens["tokens"], CHUNK)
    ]
    assert lens["exact"].shape == (2, 7 * CHUNK // 2)
    np.testing.assert_array_equal(lens["exact"][-1], np.concatenate(own))
    assert (lens["exact"][0] != lens["exact"][-1]).mean() > 0.5  # depth 0 predicts otherwise: not the same rows


@pytest.mark.parametrize("layer", [0, 1])
def test_an_injected_bug_shows_from_its_own_depth_on(toy, lens, tmp_path, layer):
    """Expert 0's scales sign-flipped in one layer of the probe: the depths before it agree as before (identical
    argmaxes), its own depth and the later ones drop well below the untouched probe's."""
    params = toy["params"]
    clean = probe_argmax(params, lens["probe"], lens["tokens"])
    initializer = f"layers.{layer}.mlp.gate_up@q4.scales"
    broken = probe_argmax(params, tampered_copy(lens["probe"], tmp_path / "broken", initializer, sign_flipped),
                          lens["tokens"])  # fmt: skip
    before, after = ((lens["exact"] == x).mean(axis=1) for x in (clean, broken))
    np.testing.assert_array_equal(broken[:layer], clean[:layer])
    assert np.all(after[layer:] < before[layer:] - 0.05), (before, after)


def test_quality_reports_the_top1_agreement_per_block_depth(toy, lens, tmp_path):
    """`gptoss quality --probe --params`: one row per depth with the share of positions whose lens argmax agrees
    and the probe's provenance; `gptoss quality-gate --depth-plot`: the verdict lists them, the summary has the
    table and links the figure."""
    from conftest import file_sha256

    from gptoss.cli import main

    root, probe = toy["root"], lens["probe"]
    argv = ["quality", "--exact", root / "exact", "--variant", root / "q4", "--variant-name", "q4", "--csv",
            tmp_path / "q4.csv", "--max-tokens", MAX_TOKENS, "--chunk-length", CHUNK, "--probe", probe,
            "--params", root / "params.msgpack"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0
    with open(tmp_path / "q4.csv", newline="") as fh:
        rows = [r for r in csv.DictReader(fh) if r["statistic"] == "top1_agreement_depth"]
    expected = (lens["exact"] == probe_argmax(toy["params"], probe, lens["tokens"])).mean(axis=1)
    assert [(r["block"], float(r["value"]), r["positions"]) for r in rows] == [
        ("0", expected[0], "448"), ("1", expected[1], "448")
    ]  # fmt: skip
    assert {(r["probe_onnx_sha256"], r["probe_data_sha256"]) for r in rows} == {
        (file_sha256(probe / "model.onnx"), file_sha256(probe / "model.onnx.data"))
    }
    gate = ["quality-gate", "--csv", tmp_path / "q4.csv", "--budget", "q4:kld_mean=1", "--verdict",
            tmp_path / "gate" / "q4.json", "--depth-plot", tmp_path / "gate" / "q4_depth.png"]  # fmt: skip
    assert main([str(a) for a in gate]) == 0
    verdict = json.loads((tmp_path / "gate" / "q4.json").read_text())["variants"]["q4"]
    assert [d["value"] for d in verdict["top1_agreement_by_depth"]] == list(expected)
    assert "top1_agreement_depth" not in verdict["measured"]
    summary = (tmp_path / "gate" / "q4.md").read_text()
    assert (
        f"| 1 | {expected[1]:.4f} | 448 |" in summary and "![top-1 agreement per block depth](q4_depth.png)" in summary
    )
    assert (tmp_path / "gate" / "q4_depth.png").read_bytes().startswith(b"\x89PNG")


def test_a_probe_that_does_not_fit_is_refused_before_anything_runs(toy, lens, tmp_path, capsys):
    """A probe for other chunks, a probe of another variant, a probe without params: one clear error, no CSV."""
    from gptoss.cli import main

    root, probe = toy["root"], lens["probe"]
    base = ["quality", "--exact", root / "exact", "--variant-name", "v", "--csv", tmp_path / "q.csv"]
    base += ["--max-tokens", MAX_TOKENS, "--probe", probe]
    params = ["--params", root / "params.msgpack"]
    cases = [
        (["--variant", root / "q4", "--chunk-length", 64, *params], "export it with --sequence-length 64"),
        (
            ["--variant", root / "q8", "--chunk-length", CHUNK, *params],
            f"{probe / 'model.onnx'}: its quantized kernels are not those of",
        ),
        (["--variant", root / "q4"], "--probe and --params go together"),
    ]
    for args, message in cases:
        assert main([str(a) for a in [*base, *args]]) == 1
        assert message in capsys.readouterr().err
    assert not (tmp_path / "q.csv").exists()
    with pytest.raises(GptOssError, match="no block taps"):  # taps expand the experts: no QMoE to put there
        export_variant(toy["params"], tmp_path / "taps" / "model.onnx", ExportSpec(32, True, True), variant("q4"))
