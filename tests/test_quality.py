"""The quality stage of quantized variants: the llama.cpp-style statistics against an independent computation
(torch, the statistics module), ``gptoss quality`` end to end on a toy decoder graph (against itself, and against
a copy whose unembedding is rounded to a coarse grid), and the budgets of ``gptoss quality-gate``."""

from __future__ import annotations

import csv
import json
import math
import shutil
import statistics
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import assert_one_clean_error, error_lines, file_sha256, require_modules, run_cli

from gptoss.cli import main
from gptoss.errors import GptOssError
from gptoss.formats.synth import synthesize
from gptoss.graphs.export import export
from gptoss.graphs.trace import ExportSpec
from gptoss.model.convert import convert
from gptoss.model.params import Params
from gptoss.proof.quality import (
    COLUMNS,
    EVAL_TEXT,
    greedy_agreement,
    position_measures,
    read_rows,
    read_text,
    text_statistics,
)
from gptoss.proof.quality_gate import DIRECTIONS, evaluate, parse_budgets, quality_gate, summary_markdown
from gptoss.runtimes.generation import Generation

CHUNK, MAX_TOKENS = 128, 600  # 4 chunks of 128 tokens, 64 scored positions each
POSITIONS = 4 * (CHUNK - CHUNK // 2)
TEXT_STATISTICS = (
    "kld_mean kld_mean_stderr kld_median kld_p90 kld_p95 kld_p99 kld_p99_9 kld_max top1_agreement delta_p_mean "
    "delta_p_rms delta_p_p1 delta_p_p5 delta_p_p50 delta_p_p95 delta_p_p99 ppl_exact ppl_variant ppl_ratio"
).split()


def random_logits(positions: int = 50, vocab: int = 300, noise: float = 0.3, seed: int = 0):
    rng = np.random.default_rng(seed)
    exact = (3 * rng.standard_normal((positions, vocab))).astype(np.float32)
    variant = (exact + noise * rng.standard_normal(exact.shape)).astype(np.float32)
    return exact, variant, rng.integers(0, vocab, positions)


def test_statistics_match_an_independent_computation():
    """KLD, Δp, NLL and top-1 per position against torch (float64); the summaries against the statistics module
    (its "inclusive" quantiles are numpy's linear percentiles). 50 positions: two row blocks."""
    (torch,) = require_modules("torch")
    exact, variant, targets = random_logits()
    m = position_measures(exact, variant, targets)
    log_p = torch.log_softmax(torch.from_numpy(exact).double(), -1)
    log_q = torch.log_softmax(torch.from_numpy(variant).double(), -1)
    kld = torch.nn.functional.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1).numpy()
    np.testing.assert_allclose(m["kld"], kld, rtol=1e-10, atol=1e-14)
    assert (m["kld"] > 0).all()
    t = torch.from_numpy(targets)
    np.testing.assert_allclose(m["delta_p"], (log_q.exp() - log_p.exp())[torch.arange(50), t].numpy(), atol=1e-14)
    nll = torch.nn.functional.cross_entropy(torch.from_numpy(exact).double(), t, reduction="none").numpy()
    np.testing.assert_allclose(m["nll_exact"], nll, rtol=1e-12)
    np.testing.assert_array_equal(m["same_top"], exact.argmax(-1) == variant.argmax(-1))

    s, values = text_statistics(m), list(m["kld"])
    quantiles = statistics.quantiles(values, n=1000, method="inclusive")
    assert s["kld_mean"] == pytest.approx(statistics.fmean(values), rel=1e-12)
    assert s["kld_mean_stderr"] == pytest.approx(statistics.stdev(values) / math.sqrt(50), rel=1e-10)
    assert s["kld_median"] == pytest.approx(statistics.median(values), rel=1e-12)
    for name, k in (("kld_p90", 900), ("kld_p95", 950), ("kld_p99", 990), ("kld_p99_9", 999)):
        assert s[name] == pytest.approx(quantiles[k - 1], rel=1e-10), name
    assert s["kld_max"] == max(values)
    delta_p = list(m["delta_p"])
    assert s["delta_p_rms"] == pytest.approx(math.sqrt(statistics.fmean(d * d for d in delta_p)), rel=1e-12)
    assert s["delta_p_p5"] == pytest.approx(statistics.quantiles(delta_p, n=20, method="inclusive")[0], rel=1e-10)
    assert s["top1_agreement"] == pytest.approx(float(np.mean(exact.argmax(-1) == variant.argmax(-1))))
    ppl_exact = math.exp(float(torch.nn.functional.cross_entropy(torch.from_numpy(exact).double(), t)))
    assert s["ppl_exact"] == pytest.approx(ppl_exact, rel=1e-12)
    assert s["ppl_ratio"] == pytest.approx(s["ppl_variant"] / ppl_exact, rel=1e-12)
    assert list(s) == TEXT_STATISTICS


def test_identical_logits_give_zero_divergence():
    exact, _, targets = random_logits()
    s = text_statistics(position_measures(exact, exact.copy(), targets))
    assert all(s[k] == 0.0 for k in TEXT_STATISTICS if k.startswith(("kld", "delta_p")))
    assert (s["top1_agreement"], s["ppl_ratio"]) == (1.0, 1.0)


def test_greedy_agreement_and_the_near_tie_rule():
    logits = [np.array([[0.0, 5.0, 1.0, 0.0]]) for _ in range(4)]
    logits[2] = np.array([[0.0, 3.0, 3.0 - 1e-6, 0.0]])  # step 2: a near tie of tokens 1 and 2
    exact = Generation([1, 1, 1, 1], logits)
    assert greedy_agreement(exact, [1, 1, 1, 1], (), 1e-4) == (1.0, False)
    assert greedy_agreement(exact, [1, 2, 1, 1], (), 1e-4) == (0.25, False)  # differs at step 1: one step agrees
    assert greedy_agreement(exact, [1, 1, 2, 0], (), 1e-4) == (1.0, True)  # differs at the near tie: agreement
    assert greedy_agreement(exact, [1, 1, 2, 0], (), 1e-7) == (0.5, False)


def test_the_evaluation_text_ships_with_its_sources_stripped():
    raw = EVAL_TEXT.read_text()
    assert raw.startswith("# Sources") and "Declaration of Independence" in raw.splitlines()[0]
    text = read_text(EVAL_TEXT)
    assert text.startswith("The unanimous Declaration") and 2500 <= len(text.split()) <= 3500


# --- end to end on a toy decoder graph ---


def _edit_tensor(folder: Path, name: str, edit) -> None:
    """Rewrite one external-data tensor of ``folder``'s model.onnx.data in place (the graph is unchanged)."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == name)
    info = {e.key: e.value for e in tensor.external_data}
    assert tensor.data_type == onnx.TensorProto.FLOAT and info["location"] == "model.onnx.data"
    with open(folder / "model.onnx.data", "r+b") as fh:
        fh.seek(int(info["offset"]))
        data = np.frombuffer(fh.read(int(info["length"])), np.float32).copy()
        fh.seek(int(info["offset"]))
        fh.write(edit(data).astype(np.float32).tobytes())


@pytest.fixture(scope="module")
def decoders(tmp_path_factory) -> dict[str, Path]:
    """The toy's exact decoder folder; a copy with the unembedding rounded to 15 levels (a crude 4-bit
    quantization); a copy with NaN in the unembedding."""
    root = tmp_path_factory.mktemp("quality")
    synthesize(root / "checkpoint", "toy", 2, seed=0)
    convert(root / "checkpoint", root / "p.msgpack", 2)
    export(Params.open(root / "p.msgpack"), root / "exact/model.onnx", ExportSpec(32, decoder=True, context_length=256))
    folders = {"root": root, "exact": root / "exact"}
    for name, edit in (("q4", lambda w: np.round(w / (s := np.abs(w).max() / 7)) * s), ("nan", lambda w: w * np.nan)):
        folders[name] = Path(shutil.copytree(root / "exact", root / name))
        _edit_tensor(folders[name], "unembed.kernel", edit)
    return folders


def run_quality(decoders, variant: str, out: Path, *extra: str) -> list[dict]:
    argv = ["quality", "--exact", decoders["exact"], "--variant", decoders[variant], "--variant-name", variant]
    argv += ["--csv", out / f"{variant}.csv", "--max-tokens", MAX_TOKENS, "--chunk-length", CHUNK, *extra]
    assert main([str(a) for a in argv]) == 0
    with open(out / f"{variant}.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        assert reader.fieldnames == COLUMNS
        return list(reader)


def test_the_exact_graph_against_itself_is_exact(decoders, tmp_path):
    rows = run_quality(decoders, "exact", tmp_path, "--kld-values", tmp_path / "kld.npy", "--prompt", "Paris")
    values = {(r["prompt_id"], r["statistic"]): float(r["value"]) for r in rows}
    assert [s for p, s in values if p == "eval_text"] == TEXT_STATISTICS
    assert all(v == 0.0 for (_, s), v in values.items() if s.startswith(("kld", "delta_p")))
    assert values["eval_text", "top1_agreement"] == values["eval_text", "ppl_ratio"] == 1.0
    assert values["p0", "greedy_agreement"] == 1.0 and values["p0", "greedy_near_tie"] == 0.0
    sha, data = (file_sha256(decoders["exact"] / name) for name in ("model.onnx", "model.onnx.data"))
    provenance = ["stage", "variant", "exact_onnx_sha256", "variant_onnx_sha256", "exact_data_sha256"]
    provenance += ["variant_data_sha256", "text_sha256", "tokens", "chunk_length"]
    expected = ["quality", "exact", sha, sha, data, data, file_sha256(EVAL_TEXT), str(MAX_TOKENS), str(CHUNK)]
    for r in rows:
        assert [r[k] for k in provenance] == expected
        assert r["positions"] == ("8" if r["prompt_id"] == "p0" else str(POSITIONS))
    kld = np.load(tmp_path / "kld.npy")
    assert kld.dtype == np.float32 and kld.shape == (POSITIONS,) and not kld.any()


def test_a_perturbed_variant_diverges_and_the_gate_judges_it(decoders, tmp_path):
    rows = run_quality(decoders, "q4", tmp_path, "--kld-values", tmp_path / "q4.npy")
    values = {(r["prompt_id"], r["statistic"]): float(r["value"]) for r in rows}
    kld_mean, kld_p99 = values["eval_text", "kld_mean"], values["eval_text", "kld_p99"]
    assert 0 < values["eval_text", "kld_median"] <= kld_p99 <= values["eval_text", "kld_max"]
    assert 0 < values["eval_text", "kld_mean_stderr"] < kld_mean
    assert values["eval_text", "top1_agreement"] <= 1.0 and values["eval_text", "ppl_ratio"] != 1.0
    assert rows[0]["variant_onnx_sha256"] == rows[0]["exact_onnx_sha256"]  # the same graph, other weights
    assert (
        rows[0]["variant_data_sha256"]
        == file_sha256(decoders["q4"] / "model.onnx.data")
        != rows[0]["exact_data_sha256"]
    )
    kld = np.load(tmp_path / "q4.npy")
    assert kld.mean() == pytest.approx(kld_mean, rel=1e-5)

    loose = ["--budget", f"q4:kld_mean={2 * kld_mean}", "--budget", f"q4:kld_p99={2 * kld_p99}"]
    loose += ["--budget", "q4:top1_agreement=0", "--budget", "q4:greedy_agreement=0"]
    ok = run_cli("quality-gate", "--csv", tmp_path / "q4.csv", *loose, "--verdict", tmp_path / "ok.json",
                 "--plot", tmp_path / "kld.png", "--kld-values", f"q4={tmp_path / 'q4.npy'}")  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    verdict = json.loads((tmp_path / "ok.json").read_text())
    assert verdict["passed"] and verdict["variants"]["q4"]["statistics"]["kld_mean"]["value"] == kld_mean
    assert verdict["csv_files"][0]["sha256"] == file_sha256(tmp_path / "q4.csv")
    assert (tmp_path / "kld.png").read_bytes().startswith(b"\x89PNG") and (tmp_path / "ok.md").is_file()

    tight = run_cli("quality-gate", "--csv", tmp_path / "q4.csv", "--budget", f"q4:kld_mean={kld_mean / 2}",
                    "--verdict", tmp_path / "tight.json")  # fmt: skip
    assert tight.returncode == 1 and "Traceback" not in tight.stderr
    assert error_lines(tight.stderr) == [
        f"gptoss quality-gate: error: quality gate failed: q4 kld_mean {kld_mean:.3g} > budget {kld_mean / 2:g} "
        f"(eval_text, {POSITIONS} positions)"
    ]
    assert not json.loads((tmp_path / "tight.json").read_text())["passed"]


def _vocab_100_graph(folder: Path) -> None:
    """A graph with the decoder's inputs and outputs and a vocabulary of 100 (logits: a table lookup)."""
    h = onnx.helper
    f32, i64 = onnx.TensorProto.FLOAT, onnx.TensorProto.INT64
    past = [h.make_tensor_value_info(f"past_key_values.0.{k}", f32, ["b", 2, "p", 16]) for k in ("key", "value")]
    present = [h.make_tensor_value_info(f"present.0.{k}", f32, ["b", 2, "p", 16]) for k in ("key", "value")]
    inputs = [
        h.make_tensor_value_info("input_ids", i64, ["b", "s"]),
        h.make_tensor_value_info("attention_mask", i64, ["b", "t"]),
    ]
    table = onnx.numpy_helper.from_array(np.zeros((100, 100), np.float32), "table")
    nodes = [h.make_node("Gather", ["table", "input_ids"], ["logits"])]
    nodes += [h.make_node("Identity", [p.name], [q.name]) for p, q in zip(past, present, strict=True)]
    outputs = [h.make_tensor_value_info("logits", f32, ["b", "s", 100]), *present]
    graph = h.make_graph(nodes, "vocab100", inputs + past, outputs, [table])
    folder.mkdir()
    onnx.save(h.make_model(graph, opset_imports=[h.make_opsetid("", 17)], ir_version=9), str(folder / "model.onnx"))


def test_bad_input_is_one_clear_error(decoders, tmp_path):
    exact = decoders["exact"]
    one_token = tmp_path / "one.txt"
    one_token.write_text("# sources\nA")
    no_graph = Path(shutil.copytree(exact, tmp_path / "no_graph", ignore=shutil.ignore_patterns("model.onnx")))
    (no_graph / "genai_config.json").unlink()
    _vocab_100_graph(tmp_path / "vocab100")
    cases = [
        (["--variant", tmp_path / "missing"], [str(tmp_path / "missing"), "--variant"]),
        (["--variant", no_graph], [str(no_graph / "model.onnx")]),
        (["--variant", exact, "--text", one_token], [str(one_token), "1 token"]),
        (["--variant", tmp_path / "vocab100"], [str(tmp_path / "vocab100" / "model.onnx"), "100", "8192"]),
        (["--variant", decoders["nan"]], [str(decoders["nan"] / "model.onnx"), "NaN/Inf", "chunk 0"]),
    ]
    for args, names in cases:
        out = tmp_path / "out"
        proc = run_cli("quality", "--exact", exact, *args, "--variant-name", "v", "--csv", out / "q.csv",
                       "--max-tokens", 300, "--chunk-length", 128)  # fmt: skip
        assert_one_clean_error(proc, out, *names, command="quality")
    exact_no_tokenizer = Path(
        shutil.copytree(exact, tmp_path / "no_tok", ignore=shutil.ignore_patterns("tokenizer.json"))
    )
    proc = run_cli(
        "quality",
        "--exact",
        exact_no_tokenizer,
        "--variant",
        exact,
        "--variant-name",
        "v",
        "--csv",
        tmp_path / "out/q.csv",
    )
    assert_one_clean_error(proc, tmp_path / "out", str(exact_no_tokenizer / "tokenizer.json"), command="quality")


# --- the gate ---


def rows_of(variant: str, **values: float) -> list[dict]:
    """Quality rows: ``greedy_agreement_pN`` keys give greedy rows of prompt pN."""
    rows = []
    for key, value in values.items():
        statistic, _, prompt = key.partition("_p") if key.startswith("greedy") else (key, "", "")
        prompt_id, positions = (f"p{prompt}", 8) if prompt else ("eval_text", 1024)
        rows.append(dict(variant=variant, prompt_id=prompt_id, statistic=statistic, value=value, positions=positions))
    return [r | {"source": "q.csv"} for r in rows]


@pytest.fixture
def no_csv_hash(monkeypatch):
    monkeypatch.setattr("gptoss.proof.quality_gate.sha256", lambda path: "0" * 64)


def test_budget_directions(no_csv_hash):
    assert DIRECTIONS == {"kld_mean": "max", "kld_p99": "max", "top1_agreement": "min", "greedy_agreement": "min"}
    rows = rows_of("q8", kld_mean=0.01, kld_p99=0.1, top1_agreement=0.95)
    rows += rows_of("q8", greedy_agreement_p0=1.0, greedy_agreement_p1=0.5)
    exactly = {"kld_mean": 0.01, "kld_p99": 0.1, "top1_agreement": 0.95, "greedy_agreement": 0.5}
    assert evaluate(rows, {"q8": exactly})["passed"]  # a value at its budget keeps to it
    for statistic, budget in (("kld_mean", 0.009), ("kld_p99", 0.09), ("top1_agreement", 0.96)):
        verdict = evaluate(rows, {"q8": exactly | {statistic: budget}})
        assert not verdict["passed"] and verdict["variants"]["q8"]["statistics"][statistic]["passed"] is False
        sign = ">" if statistic.startswith("kld") else "<"
        assert verdict["problems"] == [
            f"q8 {statistic} {exactly[statistic]:.3g} {sign} budget {budget:g} (eval_text, 1024 positions)"
        ]
    verdict = evaluate(rows, {"q8": {"greedy_agreement": 0.75}})  # every prompt's row: p1 breaches
    assert verdict["problems"] == ["q8 greedy_agreement 0.5 < budget 0.75 (p1, 8 steps)"]
    assert verdict["variants"]["q8"]["statistics"]["greedy_agreement"] | {"budget": 0} == {
        "value": 0.5, "prompt_id": "p1", "positions": 8, "rows": 2, "budget": 0, "direction": "min", "passed": False
    }  # fmt: skip


def test_a_missing_statistic_or_variant_and_nan_fail(no_csv_hash):
    rows = rows_of("q4", kld_mean=0.01, kld_p99=math.nan)
    verdict = evaluate(rows, {"q4": {"kld_mean": 1, "kld_p99": 1, "top1_agreement": 0.9}, "q2": {"kld_mean": 1}})
    assert verdict["problems"] == [
        "q2 has no kld_mean rows (budget 1)",
        "q4 kld_p99 is NaN, budget 1 (eval_text, 1024 positions)",
        "q4 has no top1_agreement rows (budget 0.9)",
    ]
    assert verdict["variants"]["q4"]["statistics"]["kld_p99"]["value"] is None
    assert json.dumps(verdict, allow_nan=False)


def test_budgets_parse_and_the_gate_writes_before_it_fails(tmp_path):
    assert parse_budgets(["q4:kld_p99=0.5", "q4:top1_agreement=0.9", "q8:kld_mean=1e-3"]) == {
        "q4": {"kld_p99": 0.5, "top1_agreement": 0.9}, "q8": {"kld_mean": 1e-3}
    }  # fmt: skip
    for bad, words in (("q4-kld_p99=0.5", "VARIANT:STATISTIC=VALUE"), ("q4:ppl=1", "ppl"), ("q4:kld_p99=x", "'x'")):
        with pytest.raises(GptOssError, match=words):
            parse_budgets([bad])
    csv_path = tmp_path / "q.csv"
    csv_path.write_text("stage,variant,prompt_id,statistic,value,positions\nquality,q4,eval_text,kld_p99,0.83,1024\n")
    with pytest.raises(GptOssError) as err:
        quality_gate([csv_path], {"q4": {"kld_p99": 0.5}}, tmp_path / "v.json")
    assert str(err.value) == "quality gate failed: q4 kld_p99 0.83 > budget 0.5 (eval_text, 1024 positions)"
    first = (tmp_path / "v.json").read_bytes()
    assert "**NO**" in (tmp_path / "v.md").read_text()
    with pytest.raises(GptOssError):
        quality_gate([csv_path], {"q4": {"kld_p99": 0.5}}, tmp_path / "v.json")
    assert (tmp_path / "v.json").read_bytes() == first  # deterministic
    with pytest.raises(GptOssError, match="not a quality CSV"):
        quality_gate([EVAL_TEXT], {"q4": {"kld_p99": 0.5}}, tmp_path / "w.json")


# --- the top-1 agreement per block depth ---


def test_the_lens_in_column_blocks_is_the_argmax_of_the_whole_head(monkeypatch):
    """The lens's running argmax over blocks of columns (uneven, with a tie across two blocks, where the lower id
    wins as in np.argmax) against the head computed whole in float64."""
    from gptoss.proof import depth

    rng = np.random.default_rng(5)
    hidden = (3 * rng.standard_normal((40, 16))).astype(np.float32)
    kernel = rng.standard_normal((16, 250)).astype(np.float32)
    kernel[:, 230] = kernel[:, 7] = 5 * np.abs(kernel[:, 0])  # the same column in the first and the last block
    head = depth.Head(rng.uniform(0.5, 1.5, 16).astype(np.float32), kernel, 1e-5)
    monkeypatch.setattr(depth, "COLUMN_BLOCK", 96)
    x = hidden.astype(np.float64)
    expected = (x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * head.scale) @ kernel
    got = depth.lens_top1(hidden, head)
    np.testing.assert_array_equal(got, expected.argmax(-1))
    assert 7 in got and 230 not in got


def test_depth_rows_are_reported_not_budgeted_and_old_csvs_still_read(no_csv_hash, tmp_path):
    rows = rows_of("q4", kld_mean=0.01, top1_agreement=0.5)
    depth_rows = rows_of("q4", top1_agreement_depth=0.7) + rows_of("q4", top1_agreement_depth=math.nan)
    for block, row in zip((1, 0), depth_rows, strict=True):
        row["block"] = block
    verdict = evaluate(rows + depth_rows, {"q4": {"kld_mean": 0.1}})
    entry = verdict["variants"]["q4"]
    assert verdict["passed"] and entry["measured"] == {"kld_mean": 0.01, "top1_agreement": 0.5}
    assert entry["top1_agreement_by_depth"] == [
        {"block": 0, "value": None, "positions": 1024}, {"block": 1, "value": 0.7, "positions": 1024}
    ]  # fmt: skip
    summary = summary_markdown(verdict, "q4_depth.png")
    assert "| 0 | NaN | 1024 |\n| 1 | 0.7000 | 1024 |\n| head (`top1_agreement`) | 0.5000 | |" in summary
    assert summary.count("## Top-1 agreement per block depth") == 1 and "](q4_depth.png)" in summary
    assert "per block depth" not in summary_markdown(evaluate(rows, {"q4": {"kld_mean": 0.1}}))
    with pytest.raises(GptOssError, match="top1_agreement_depth"):
        parse_budgets(["q4:top1_agreement_depth=0.5"])

    old = tmp_path / "old.csv"  # written before the block column
    old.write_text("stage,variant,prompt_id,statistic,value,positions\nquality,q4,eval_text,kld_p99,0.83,1024\n")
    assert read_rows([old])[0]["block"] is None
    bad = tmp_path / "bad.csv"
    bad.write_text("variant,prompt_id,statistic,block,value,positions\nq4,eval_text,top1_agreement_depth,x,1,8\n")
    with pytest.raises(GptOssError, match="line 2: block 'x' is not a block depth"):
        read_rows([bad])
