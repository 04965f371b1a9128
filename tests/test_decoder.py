"""The KV-cache decoder: the Flax model with its cache against transformers' generate(), the decoder graph's
onnxruntime-genai contract, generation parity (JAX, ONNX Runtime, onnxruntime-genai), batches with padding,
and the bad inputs of the decoder stage."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_one_clean_error, file_sha256, opened, require_torch, run_cli, streamed

from gptoss.formats.synth import synthesize
from gptoss.graphs.export import export
from gptoss.graphs.names import is_data_input
from gptoss.graphs.trace import ExportSpec
from gptoss.model.convert import convert
from gptoss.model.params import Params
from gptoss.promote import promote
from gptoss.proof.compare import Results
from gptoss.proof.gate import gate
from gptoss.proof.parity import parity_decoder
from gptoss.proof.tolerances import Tolerances
from gptoss.runtimes.genai import genai_generate_all
from gptoss.runtimes.hf_transformers import transformers_generate
from gptoss.runtimes.jax_model import jax_generate
from gptoss.runtimes.onnx_runtime import batched_ort_run, ort_generate, ort_session

STEPS = 24
TOKENIZER = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"}
PROMPT = "What is the capital of France?"
ORACLE_TOL = 2e-5  # the prefill oracle's bound (tests/test_oracle.py), relative to max(1, max|logit|)


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict[str, Path]:
    """A toy checkpoint, its params, its canonical graph and its decoder graph (context 64) sharing one weights
    file, once per module."""
    root = tmp_path_factory.mktemp("decoder")
    synthesize(root / "checkpoint", "toy", 2, seed=0)
    params = root / "flax_params_2layers.msgpack"
    convert(root / "checkpoint", params, 2)
    canonical, decoder = root / "onnx" / "canonical.onnx", root / "onnx" / "decoder.onnx"
    export(Params.open(params), canonical, ExportSpec(32))
    export(Params.open(params), decoder, ExportSpec(32, decoder=True, context_length=64), reuse_weights=True)
    return {"root": root, "params": params, "canonical": canonical, "decoder": decoder}


@pytest.mark.parametrize(
    "case",
    [
        dict(heads=8, kv_heads=2, window=6, seq=9, layers=3),
        dict(heads=4, kv_heads=4, window=4, seq=5, layers=2, layout="original"),
    ],
    ids=["heads8_kv2_window6", "heads4_kv4_window4_original"],
)
def test_cached_generation_matches_transformers_generate(case, tmp_path, oracle_report):
    """Prompt + 24 greedy steps: the window (4-6) slides during decoding, the MoE takes its sparse path for
    single tokens. Every step's logits within the prefill oracle's bound, tokens identical."""
    require_torch()
    from hf_oracle import OracleCase, hf_model, write_case

    oracle = OracleCase(name="kv", **case)
    reference = hf_model(oracle, seed=3)
    folder = write_case(reference, oracle, tmp_path / "ckpt")
    convert(folder.parent if oracle.layout == "original" else folder, tmp_path / "p.msgpack")
    model = streamed(tmp_path / "p.msgpack")
    prompt = list(np.random.default_rng(1).integers(0, oracle.vocab, oracle.seq))
    ours = jax_generate(model, prompt, STEPS, suppress=())
    theirs = transformers_generate(reference, prompt, STEPS, suppress=())
    assert len(prompt) + STEPS > 3 * oracle.window
    assert ours.tokens == theirs.tokens
    worst = 0.0
    for step, (a, b) in enumerate(zip(ours.logits, theirs.logits, strict=True)):
        diff = float(np.abs(a[-1] - b[0]).max())
        assert diff <= ORACLE_TOL * max(1.0, float(np.abs(b).max())), f"step {step}: {diff:.3g}"
        worst = max(worst, diff)
    oracle_report[f"decode_{oracle.layout}_{oracle.heads}h{oracle.kv_heads}kv"] = {"logits": worst}


def test_decoder_graph_follows_the_genai_contract(toy):
    model = onnx.load(str(toy["decoder"]), load_external_data=False)

    def dims(value) -> list:
        return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]

    inputs = {v.name: (v.type.tensor_type.elem_type, dims(v)) for v in model.graph.input if is_data_input(v.name)}
    outputs = {v.name: (v.type.tensor_type.elem_type, dims(v)) for v in model.graph.output}
    i64, f32 = onnx.TensorProto.INT64, onnx.TensorProto.FLOAT
    assert inputs["input_ids"] == (i64, ["batch_size", "sequence_length"])
    assert inputs["attention_mask"] == (i64, ["batch_size", "total_sequence_length"])
    past = (f32, ["batch_size", 2, "past_sequence_length", 16])
    present = (f32, ["batch_size", 2, "total_sequence_length", 16])
    for i in range(2):
        assert inputs[f"past_key_values.{i}.key"] == inputs[f"past_key_values.{i}.value"] == past
        assert outputs[f"present.{i}.key"] == outputs[f"present.{i}.value"] == present
    assert outputs["logits"] == (f32, ["batch_size", "sequence_length", 8192])
    assert len(inputs) == 6 and len(outputs) == 5
    folder = toy["decoder"].parent
    config = json.loads((folder / "genai_config.json").read_text())
    decoder = config["model"]["decoder"]
    assert (decoder["num_hidden_layers"], decoder["num_key_value_heads"], decoder["head_size"]) == (2, 2, 16)
    assert config["model"]["context_length"] == 64 and config["search"]["past_present_share_buffer"] is False
    assert (config["model"]["eos_token_id"], config["model"]["pad_token_id"]) == ([2, 0], 0)
    assert config["model"]["decoder"]["filename"] == "decoder.onnx"
    assert (folder / "tokenizer.json").read_bytes() == (toy["root"] / "checkpoint/tokenizer.json").read_bytes()
    assert sorted(p.name for p in folder.glob("*.onnx.data")) == ["model.onnx.data"], "one weights file, shared"


def test_three_runtimes_generate_the_same_tokens_and_padding_changes_nothing(toy):
    """JAX with its cache, our ONNX Runtime loop and onnxruntime-genai: same tokens; every step's logits agree.
    A left-padded batch gives each row the logits of its prompt alone, in the prefill and the step after."""
    model = streamed(toy["params"])
    prompt = [5, 17, 300, 42, 7, 99, 123, 8, 250]  # 9 + 24 positions: the window of 8 slides
    suppress = [2, 0]
    ours = jax_generate(model, prompt, STEPS, suppress)
    session = ort_session(toy["decoder"])
    got = ort_generate(session, prompt, STEPS, suppress)
    assert got.tokens == ours.tokens and not set(got.tokens) & set(suppress)
    assert max(float(np.abs(a - b).max()) for a, b in zip(ours.logits, got.logits, strict=True)) < 2e-5
    assert genai_generate_all(toy["decoder"].parent, [prompt], STEPS) == [ours.tokens]

    short = prompt[:4]
    ids = np.zeros((2, len(prompt)), np.int64)
    mask = np.zeros_like(ids)
    ids[0], mask[0] = prompt, 1
    ids[1, -len(short) :], mask[1, -len(short) :] = short, 1
    prefill, step = batched_ort_run(session, ids, mask, np.asarray([[ours.tokens[0]], [prompt[4]]], np.int64))
    assert np.abs(prefill[0] - ours.logits[0]).max() < 2e-5
    assert np.abs(prefill[1, -len(short) :] - ours.logits[0][: len(short)]).max() < 2e-5
    assert np.abs(step[0, 0] - ours.logits[1][0]).max() < 2e-5
    assert np.abs(step[1, 0] - ours.logits[0][len(short)]).max() < 2e-5


def test_generation_parity_rows_gate_and_promote(toy, tmp_path):
    csv_path = tmp_path / "decoder.csv"
    params, prompts = opened(toy["params"], [PROMPT], ["1,2,3,4,5,6,7,8,9,10"])
    rows = parity_decoder(params, toy["decoder"], Results(csv_path), prompts, 12)
    groups = {(r["group"], r["tensor"]) for r in rows}
    assert {("greedy_tokens", "tokens_onnxruntime"), ("greedy_tokens", "tokens_genai")} <= groups
    assert ("decode_logits", "logits_batched") in groups
    steps = sorted({r["step"] for r in rows if r["tensor"] == "logits" and r["prompt_id"] == "p0"})
    assert steps == list(range(12)) and all(r["passed"] for r in rows)
    with open(csv_path, newline="") as fh:
        tokens = [r for r in csv.DictReader(fh) if r["group"] == "greedy_tokens"]
    assert all(r["tokens"] == r["ref_tokens"] and len(r["tokens"].split()) == 12 for r in tokens)

    verdict = tmp_path / "verdict.json"
    gate([csv_path], Tolerances(), verdict, expect_stages=["decoder"])
    generation = json.loads(verdict.read_text())["generation"]
    assert generation["genai"] == {"identical": 2, "near_tie": 0, "differ": 0, "steps": 12}

    # Promoting the decoder needs the canonical graph's verification too: gate a canonical CSV with it.
    from gptoss.proof.driver import JaxRequest
    from gptoss.proof.parity import parity

    params, prompts = opened(toy["params"], [PROMPT], length=32)
    parity(params, toy["canonical"], Results(tmp_path / "canonical.csv"), JaxRequest(prompts, 32))
    gate([csv_path, tmp_path / "canonical.csv"], Tolerances(), verdict)
    dest = promote(toy["canonical"], verdict, tmp_path / "promoted", "baseline2", decoder=toy["decoder"])
    manifest = json.loads((dest / "manifest.json").read_text())
    names = {f["name"] for f in manifest["files"]}
    assert names == {"model.onnx", "model.onnx.data", "decoder.onnx", "genai_config.json", *TOKENIZER}
    assert manifest["generation"]["onnxruntime"]["identical"] == 2
    # What a user does with the promoted folder: onnxruntime-genai generates the tokens parity verified.
    t0 = next(r for r in tokens if r["prompt_id"] == "t0")
    assert genai_generate_all(dest, [list(range(1, 11))], 12) == [[int(t) for t in t0["ref_tokens"].split()]]


def test_decoder_bad_inputs(toy, tmp_path):
    # Prompt + generated tokens longer than the exported context (64).
    out = tmp_path / "long"
    ids = ",".join(str(i) for i in range(60))
    proc = run_cli(
        "parity", "--stage", "decoder", "--params", toy["params"], "--onnx", toy["decoder"],
        "--token-ids", ids, "--generate-tokens", "8", "--csv", out / "d.csv",
    )  # fmt: skip
    assert_one_clean_error(proc, out, "68 positions", "context length 64", command="parity")

    # An attention_mask of the wrong length, fed by our runtime loop: named, not an ONNX Runtime shape error.
    from gptoss.errors import GptOssError
    from gptoss.runtimes.onnx_runtime import empty_past, ort_step

    session = ort_session(toy["decoder"])
    with pytest.raises(GptOssError, match="attention_mask has 5 positions; past 0 \\+ new 3 needs 3"):
        ort_step(session, np.ones((1, 3), np.int64), np.ones((1, 5), np.int64), empty_past(session, 1))

    # A genai_config.json whose numbers disagree with the graph: promote refuses and writes nothing.
    bad = tmp_path / "bad_decoder"
    shutil.copytree(toy["decoder"].parent, bad)
    config = json.loads((bad / "genai_config.json").read_text())
    config["model"]["decoder"]["num_key_value_heads"] = 4
    (bad / "genai_config.json").write_text(json.dumps(config))
    verdict = tmp_path / "v.json"
    data = file_sha256(bad / "model.onnx.data")
    graphs = [
        {"stage": stage, "onnx_sha256": file_sha256(bad / f"{stage}.onnx"), "data_sha256": data}
        for stage in ("canonical", "decoder")
    ]
    verdict.write_text(json.dumps({"passed": True, "graphs": graphs}))
    out = tmp_path / "promoted"
    proc = run_cli(
        "promote", "--onnx", bad / "canonical.onnx", "--decoder", bad / "decoder.onnx", "--verdict", verdict,
        "--dest", out, "--tag", "t",
    )  # fmt: skip
    assert_one_clean_error(proc, out, "num_key_value_heads 4 (the graph has 2)", command="promote")
