"""Export → parity → gate → promote on the synthetic toy checkpoint (issue 3)."""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import pytest
from conftest import assert_one_clean_error, file_sha256, opened, require_torch, run_cli, streamed
from flax import nnx

from gptoss.errors import GptOssError
from gptoss.formats.params_file import read_params, write_params
from gptoss.formats.synth import preset_config, synthesize
from gptoss.graphs.export import export
from gptoss.graphs.names import data_path, is_data_input
from gptoss.graphs.trace import ExportSpec
from gptoss.model import experts, gpt_oss
from gptoss.model.convert import convert
from gptoss.model.experts import cast_slices
from gptoss.model.gpt_oss import forward
from gptoss.model.outputs import BLOCK_TAPS
from gptoss.model.params import Params, abstract_model
from gptoss.promote import promote
from gptoss.proof.compare import COLUMNS, Results
from gptoss.proof.driver import JaxRequest
from gptoss.proof.export_check import check_export
from gptoss.proof.gate import gate
from gptoss.proof.parity import parity
from gptoss.proof.tolerances import Tolerances
from gptoss.runtimes.onnx_runtime import ort_session

SEQ = 32
PROMPTS = ["What is the capital of France?", "Sliding window attention looks at the most recent tokens only."]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    """A toy checkpoint converted to params, with both graphs exported (once per module)."""
    root = tmp_path_factory.mktemp("toy")
    synthesize(root / "checkpoint", "toy", 2, seed=0)
    params = root / "flax_params_2layers.msgpack"
    convert(root / "checkpoint", params, 2)
    canonical = root / "canonical" / "model.onnx"
    debug = root / "debug" / "model.onnx"
    opened_params = Params.open(params)
    for graph, spec in ((canonical, ExportSpec(SEQ)), (debug, ExportSpec(SEQ, True, True))):
        export(opened_params, graph, spec)
        assert check_export(opened_params, graph, SEQ) <= 1e-4  # what `gptoss export` checks before it returns
    return {"root": root, "params": params, "canonical": canonical, "debug": debug}


@pytest.fixture(scope="module")
def parity_csvs(toy) -> dict[str, Path]:
    out = {}
    for stage, graph, flags in (("debug", toy["debug"], True), ("canonical", toy["canonical"], False)):
        out[stage] = toy["root"] / f"{stage}.csv"
        parity_of(toy["params"], graph, out[stage], debug=flags)
    return out


def parity_of(params_path: Path, graph: Path, csv_path: Path, debug: bool = False) -> list[dict]:
    """``gptoss parity`` on PROMPTS: stage debug (every hidden state and tap) or canonical."""
    params, prompts = opened(params_path, PROMPTS, length=SEQ)
    return parity(params, graph, Results(csv_path), JaxRequest(prompts, SEQ, hidden_states=debug, block_debug=debug))


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_canonical_graph_has_symbolic_axes_and_external_weights(toy):
    model = onnx.load(str(toy["canonical"]), load_external_data=False)
    (inp,) = [v for v in model.graph.input if is_data_input(v.name)]  # the others: overridable expert weights
    (out,) = model.graph.output
    assert inp.name == "input_ids" and out.name == "logits"
    assert [d.dim_param for d in inp.type.tensor_type.shape.dim] == ["batch", "sequence"]
    dims = out.type.tensor_type.shape.dim
    assert [dims[0].dim_param, dims[1].dim_param, dims[2].dim_value] == ["batch", "sequence", 8192]
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    external = [t.name for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external, "weights over 1 MB must live in the .onnx.data file"
    assert data_path(toy["canonical"]).stat().st_size >= 4 * 1024 * 1024  # embedding + unembedding
    onnx.checker.check_model(str(toy["canonical"]))


@pytest.mark.parametrize("shape", [(1, 7), (3, 19)])
def test_canonical_logits_match_jax_for_several_shapes(toy, shape):
    model = streamed(toy["params"])
    session = ort_session(toy["canonical"])
    ids = np.random.default_rng(sum(shape)).integers(0, model.cfg.vocab_size, size=shape).astype(np.int32)
    (got,) = session.run(["logits"], {"input_ids": ids})
    expected = np.asarray(forward(model, jnp.asarray(ids))["logits"])
    assert got.shape == (*shape, model.cfg.vocab_size)
    assert np.abs(got - expected).max() <= 1e-5
    assert np.abs(expected).max() > 1.0  # real prompts give non-trivial logits


def test_canonical_graph_is_causal(toy):
    session = ort_session(toy["canonical"])
    rng = np.random.default_rng(3)
    ids = rng.integers(0, 8192, size=(1, 24)).astype(np.int32)
    changed = ids.copy()
    changed[0, 15:] = rng.integers(0, 8192, size=9)
    (a,) = session.run(["logits"], {"input_ids": ids})
    (b,) = session.run(["logits"], {"input_ids": changed})
    np.testing.assert_array_equal(a[:, :15], b[:, :15])
    assert np.abs(a[:, 15:] - b[:, 15:]).max() > 1e-3


def test_debug_graph_has_every_tap(toy):
    names = [o.name for o in onnx.load(str(toy["debug"]), load_external_data=False).graph.output]
    expected = ["logits"] + [f"hidden_state_{i}" for i in range(2)]
    expected += [f"block_{i}_{tap}" for i in range(2) for tap in BLOCK_TAPS]
    assert sorted(names) == sorted(expected)


def test_parity_csv_contract_and_quality_bars(parity_csvs):
    rows = read_csv(parity_csvs["debug"]) + read_csv(parity_csvs["canonical"])
    with open(parity_csvs["debug"], newline="") as fh:
        assert set(COLUMNS) <= set(csv.DictReader(fh).fieldnames)
    assert {r["stage"] for r in rows} == {"debug", "canonical"}
    assert {r["prompt_id"] for r in rows} == {"p0", "p1"}
    n_tokens = {int(r["positions"]) for r in rows}
    assert len(n_tokens) == 2 and max(n_tokens) < SEQ, "only real (non-padding) positions count"

    def worst(group: str) -> float:
        return max(float(r["max_abs_diff"]) for r in rows if r["group"] == group)

    assert worst("logits") <= 1e-5
    assert worst("hidden_states") <= 5e-5
    assert worst("block_taps") <= 1e-4
    assert worst("routing") == 0
    for r in rows:
        assert r["passed"] == "True" and int(r["nonfinite"]) == 0
        assert r["onnx_sha256"] and r["data_sha256"]
        if r["group"] == "logits":
            assert float(r["argmax_agreement"]) == 1.0 and float(r["topk_overlap"]) == 1.0
        if r["group"] == "routing":
            assert float(r["expert_agreement"]) == 1.0 and r["near_ties"] != ""


def test_gate_passes_then_fails_on_tight_tolerance_and_nan(parity_csvs, tmp_path):
    csvs = [parity_csvs["debug"], parity_csvs["canonical"]]
    assert gate(csvs, Tolerances(), tmp_path / "ok.json", expect_stages=["debug", "canonical"]) == 0
    verdict = json.loads((tmp_path / "ok.json").read_text())
    assert verdict["passed"] and (tmp_path / "ok.md").read_text().startswith("# Parity gate: PASSED")

    with pytest.raises(GptOssError, match=r"max \|diff\| .* > atol 1e-09"):
        gate(csvs, Tolerances(logits=1e-9, hidden_states=1e-9, block_taps=1e-9), tmp_path / "tight.json")
    assert json.loads((tmp_path / "tight.json").read_text())["passed"] is False

    rows = read_csv(parity_csvs["canonical"])
    rows[0]["max_abs_diff"], rows[0]["nonfinite"] = "nan", "3"
    poisoned = tmp_path / "nan.csv"
    with open(poisoned, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(GptOssError, match="NaN/Inf"):
        gate([poisoned], Tolerances(), tmp_path / "nan.json")

    with pytest.raises(GptOssError, match="expected stage 'reference' has no rows"):
        gate(csvs, Tolerances(), tmp_path / "stage.json", expect_stages=["reference"])


def test_corrupted_weights_are_caught_and_localised(toy, tmp_path):
    """Perturb one expert of block 1 in the exported graph: parity + gate fail and name block 1's expert taps."""
    graph_dir = tmp_path / "corrupt"
    graph_dir.mkdir()
    corrupt = graph_dir / "model.onnx"
    shutil.copy(toy["debug"], corrupt)
    shutil.copy(data_path(toy["debug"]), data_path(corrupt))
    model = onnx.load(str(corrupt))
    flax_model = streamed(toy["params"])
    target = np.asarray(flax_model.layers[1].mlp.down_kernel[...])
    for init in model.graph.initializer:
        arr = onnx.numpy_helper.to_array(init)
        if arr.shape == target.shape and np.array_equal(arr, target):
            arr = arr.copy()
            arr[:, :, :] *= 1.5  # every expert of block 1's down projection
            init.CopyFrom(onnx.numpy_helper.from_array(arr, init.name))
            break
    else:
        pytest.fail("block 1 down projection not found among the initializers")
    onnx.save(model, str(corrupt), save_as_external_data=True, location=data_path(corrupt).name)

    csv_path = tmp_path / "debug.csv"
    parity_of(toy["params"], corrupt, csv_path, debug=True)
    with pytest.raises(GptOssError, match="first failing tap in forward order: block 1 expert_out"):
        gate([csv_path], Tolerances(), tmp_path / "verdict.json")
    first = json.loads((tmp_path / "verdict.json").read_text())["first_failure"]
    assert (first["block"], first["tap"]) == (1, "expert_out")
    assert first["previous_tensor"] == "block_1_expert_act" and first["previous_max_abs_diff"] <= 1e-4


def test_promote_copies_verified_files_with_manifest(toy, parity_csvs, tmp_path):
    verdict = tmp_path / "verdict.json"
    gate([parity_csvs["debug"], parity_csvs["canonical"]], Tolerances(), verdict)
    dest = tmp_path / "promoted" / "baseline2"
    config = toy["params"].with_name("flax_params_2layers.config.json")
    promote(toy["canonical"], verdict, dest, "baseline2", config, SEQ)
    manifest = json.loads((dest / "manifest.json").read_text())
    files = {f["name"]: f for f in manifest["files"]}
    assert set(files) == {"model.onnx", "model.onnx.data"}
    assert files["model.onnx"]["sha256"] == file_sha256(toy["canonical"]) == file_sha256(dest / "model.onnx")
    assert files["model.onnx.data"]["sha256"] == file_sha256(data_path(toy["canonical"]))
    assert manifest["verified_by_stage"] == "canonical" and manifest["tag"] == "baseline2"
    assert manifest["model"]["layers"] == 2 and manifest["model"]["weight_format"] == "float32"
    assert manifest["opset"] and manifest["sequence_length"] == SEQ
    assert {"jax", "flax", "jax2onnx", "onnx", "onnxruntime", "python"} <= set(manifest["versions"])
    assert manifest["worst_differences"]["canonical/logits"]["max_abs_diff"] <= 1e-5
    # The promoted graph runs from its new home (external data found next to it).
    (logits,) = ort_session(dest / "model.onnx").run(["logits"], {"input_ids": np.ones((1, 4), np.int32)})
    assert logits.shape == (1, 4, 8192)


def test_promote_refuses_failed_verdict_and_unverified_files(toy, parity_csvs, tmp_path):
    failed = tmp_path / "failed.json"
    with pytest.raises(GptOssError):
        gate([parity_csvs["canonical"]], Tolerances(logits=1e-12), failed)
    dest = tmp_path / "dest"
    with pytest.raises(GptOssError, match="did not pass"):
        promote(toy["canonical"], failed, dest, "baseline2")
    assert not dest.exists()

    passed = tmp_path / "passed.json"
    gate([parity_csvs["canonical"]], Tolerances(), passed)
    other = tmp_path / "other" / "model.onnx"
    other.parent.mkdir()
    shutil.copy(toy["canonical"], other)
    data = bytearray(data_path(toy["canonical"]).read_bytes())
    data[100] ^= 0xFF
    data_path(other).write_bytes(bytes(data))
    with pytest.raises(GptOssError, match="not the ones the parity run verified"):
        promote(other, passed, dest, "baseline2")
    assert not dest.exists() and not list(tmp_path.glob(".dest*"))


def test_cli_bad_inputs_give_one_clear_line(toy, tmp_path):
    config = toy["params"].with_name("flax_params_2layers.config.json")
    # A prompt longer than the sequence length is an error, never a silent truncation.
    out = tmp_path / "long"
    proc = run_cli(
        "parity",
        "--params",
        toy["params"],
        "--onnx",
        toy["canonical"],
        "--sequence-length",
        "4",
        "--prompt",
        "What is the capital of France? " * 3,
        "--csv",
        out / "x.csv",
    )
    assert_one_clean_error(proc, out, "more than --sequence-length 4", command="parity")

    # Compare flags the graph cannot serve name the export flags needed.
    out = tmp_path / "flags"
    proc = run_cli(
        "parity",
        "--params",
        toy["params"],
        "--onnx",
        toy["canonical"],
        "--token-ids",
        "1,2,3",
        "--compare-block-debug",
        "--csv",
        out / "y.csv",
    )
    assert_one_clean_error(proc, out, "--emit-block-debug", command="parity")

    # A missing params file.
    out = tmp_path / "missing"
    proc = run_cli("export", "--params", tmp_path / "nope.msgpack", "--config", config, "--output", out / "m.onnx")
    assert_one_clean_error(proc, out, "nope.msgpack", command="export")

    # Params that do not match their config (a 1-layer model under a 2-layer config).
    other = tmp_path / "other"
    convert(toy["root"] / "checkpoint", other / "p.msgpack", 1)
    out = tmp_path / "mismatch"
    proc = run_cli("export", "--params", other / "p.msgpack", "--config", config, "--output", out / "m.onnx")
    assert_one_clean_error(proc, out, "does not match", command="export")


def test_two_clean_runs_give_byte_identical_graphs(toy, tmp_path):
    """Reproducibility: synth → convert → export again in another folder gives the same sha256 for both files."""
    synthesize(tmp_path / "checkpoint", "toy", 2, seed=0)
    params = tmp_path / "elsewhere" / "flax_params_2layers.msgpack"
    convert(tmp_path / "checkpoint", params, 2)
    again = tmp_path / "graph" / "model.onnx"
    export(Params.open(params), again, ExportSpec(SEQ))
    assert file_sha256(again) == file_sha256(toy["canonical"])
    assert file_sha256(data_path(again)) == file_sha256(data_path(toy["canonical"]))


def test_bfloat16_params_store_bf16_weights_and_compute_in_float32(toy, tmp_path):
    params = tmp_path / "flax_params_2layers.msgpack"
    convert(toy["root"] / "checkpoint", params, 2, weight_format="bfloat16")
    assert params.stat().st_size < 0.6 * toy["params"].stat().st_size
    graph = tmp_path / "model.onnx"
    export(Params.open(params), graph, ExportSpec(SEQ))
    initializers = onnx.load(str(graph), load_external_data=False).graph.initializer
    kinds = {t.name: t.data_type for t in initializers}
    assert kinds["unembed.kernel"] == onnx.TensorProto.BFLOAT16
    assert kinds["layers.0.attn_norm.scale"] == onnx.TensorProto.FLOAT  # norms stay float32
    rows = parity_of(params, graph, tmp_path / "bf16.csv")
    assert all(r["passed"] for r in rows) and max(r["max_abs_diff"] for r in rows) <= 1e-5


def test_bfloat16_weights_cast_in_slices_give_the_same_outputs(toy, tmp_path, monkeypatch):
    """Large bf16 weights are cast and used a slice at a time (at 20b a block's expert casts would be 3.2 GB at
    once): experts in uneven groups, the unembedding and projections by columns. Same outputs as whole casts, in
    JAX and in ONNX Runtime."""
    params = tmp_path / "flax_params_2layers.msgpack"
    convert(toy["root"] / "checkpoint", params, 2, weight_format="bfloat16")
    model = streamed(params)
    ids = jnp.asarray(np.arange(1, SEQ + 1, dtype=np.int32)[None] * 37 % 8192)
    whole = forward(model, ids, True, True)

    gate_up = model.layers[0].mlp.gate_up_kernel
    monkeypatch.setattr(experts, "CAST_SLICE_BYTES", gate_up.size * 4 // 3 + 1)
    jax.clear_caches()  # the jitted blocks were traced with whole casts
    assert [(s.start, s.stop) for s in cast_slices(gate_up.shape, gate_up.dtype, 0)] == [(0, 3), (3, 6), (6, 8)]
    assert len(cast_slices(model.unembed.kernel.shape, model.unembed.kernel.dtype, 1)) > 1
    sliced = forward(model, ids, True, True)
    jax.clear_caches()
    assert set(sliced) == set(whole)
    for name, value in whole.items():
        np.testing.assert_allclose(np.asarray(sliced[name]), np.asarray(value), atol=1e-5, rtol=1e-5, err_msg=name)

    graph = tmp_path / "model.onnx"
    export(Params.open(params), graph, ExportSpec(SEQ, True, True))
    nodes = onnx.load(str(graph), load_external_data=False).graph.node
    # the export defers weight reads through a copy-free Reshape of the weight: follow it back to the weight
    reshaped = {n.output[0]: n.input[0] for n in nodes if n.op_type == "Reshape"}
    expert_slices = [
        n
        for n in nodes
        if n.op_type == "Slice" and reshaped.get(n.input[0], n.input[0]) == "layers.0.mlp.gate_up_kernel"
    ]
    assert len(expert_slices) == 3
    rows = parity_of(params, graph, tmp_path / "sliced.csv", debug=True)
    jax.clear_caches()
    assert rows and all(r["passed"] for r in rows)
    assert max(r["max_abs_diff"] for r in rows if r["group"] == "logits") <= 1e-5


def test_xla_keeps_one_cast_slice_alive_at_a_time(monkeypatch):
    """bf16 block compiled by XLA: its temporaries hold about one slice's float32 casts, not the whole block's
    (XLA's default concurrency-optimised scheduler casts every slice first; `gptoss` selects the other one)."""
    cfg = dataclasses.replace(preset_config("toy", 1), intermediate_size=512)
    block = abstract_model(cfg, "bfloat16").layers[0]
    whole_casts = 4 * (block.mlp.gate_up_kernel.size + block.mlp.down_kernel.size)  # 3 MiB of float32
    monkeypatch.setattr(experts, "CAST_SLICE_BYTES", whole_casts // 12)  # one expert's casts per slice
    graphdef, state = nnx.split(block)
    x = jax.ShapeDtypeStruct((1, 2, cfg.hidden_size), jnp.float32)
    positions = jax.ShapeDtypeStruct((1, 2), jnp.int32)
    step, static = gpt_oss.block_outputs, (False,)
    temp = gpt_oss._jitted.lower(step, static, graphdef, state, x, positions).compile().memory_analysis()
    jax.clear_caches()
    assert temp.temp_size_in_bytes < whole_casts / 3


def test_transformers_reference_rows_agree_and_catch_a_wrong_conversion(toy, tmp_path):
    require_torch()  # skipped on a developer machine without torch; a failure in CI
    from gptoss.proof.reference import reference

    params, prompts = opened(toy["params"], PROMPTS, length=SEQ)
    rows = reference(toy["root"] / "checkpoint", params, Results(tmp_path / "ref.csv"), prompts, SEQ)
    assert {r["stage"] for r in rows} == {"reference"} and {r["group"] for r in rows} == {"logits", "hidden_states"}
    assert all(r["passed"] for r in rows)
    assert max(r["max_abs_diff"] for r in rows if r["group"] == "logits") <= 2e-5

    # Params whose block-1 down projection is transposed (the classic port bug, invisible in square shapes).
    arrays = read_params(toy["params"])
    arrays["layers.1.mlp.down_kernel"] = np.ascontiguousarray(arrays["layers.1.mlp.down_kernel"].transpose(0, 2, 1))
    wrong = tmp_path / "flax_params_2layers.msgpack"
    write_params(wrong, list(arrays), arrays.__getitem__)
    shutil.copy(toy["params"].with_name("flax_params_2layers.config.json"), tmp_path)
    params, prompts = opened(wrong, PROMPTS, length=SEQ)
    rows = reference(toy["root"] / "checkpoint", params, Results(tmp_path / "wrong.csv"), prompts, SEQ)
    failed = {r["tensor"] for r in rows if not r["passed"]}
    assert "hidden_state_1" in failed and "hidden_state_0" not in failed


def test_tolerances_file_and_flags(tmp_path):
    from gptoss.cli import build_parser

    tol_file = tmp_path / "tolerances.yaml"
    tol_file.write_text("logits: 1.0e-3\nhidden_states: 2.0e-5\n")
    args = build_parser().parse_args(
        ["gate", "--csv", "x.csv", "--verdict", "v.json", "--tolerances", str(tol_file), "--atol-logits", "5e-4"]
    )
    tol = Tolerances.from_args(args)
    assert (tol.logits, tol.hidden_states, tol.block_taps) == (5e-4, 2e-5, Tolerances().block_taps)
    tol_file.write_text("logit: 1.0e-3\n")
    with pytest.raises(GptOssError, match="tolerances.yaml: expected a mapping with keys among"):
        Tolerances.from_args(args)
