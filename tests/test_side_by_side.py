"""benchmarks/side_by_side.py's pure parts, without llama.cpp, onnxruntime-genai or a model: llama-bench's JSON as
our measures, logits against the reference's, the ratios, rounds pooled, the special ids of a checkpoint, the
converter's pre-tokenizer answer, and the section with a peer's numbers not measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import decoders  # noqa: E402
import peers  # noqa: E402
import side_by_side  # noqa: E402

# Trimmed from a real `llama-bench -p 32,512 -n 16 -r 2 -o json` run: two pp tests and one tg test.
BENCH_ROWS = [
    {"n_prompt": 32, "n_gen": 0, "n_depth": 0, "avg_ns": 20_000_000, "samples_ns": [19_000_000, 21_000_000],
     "samples_ts": [1684.2, 1523.8], "build_commit": "0c1e570", "build_number": 1},
    {"n_prompt": 512, "n_gen": 0, "n_depth": 0, "avg_ns": 300_000_000, "samples_ns": [290_000_000, 310_000_000],
     "samples_ts": [1765.5, 1651.6]},
    {"n_prompt": 0, "n_gen": 16, "n_depth": 0, "avg_ns": 80_000_000, "samples_ns": [64_000_000, 96_000_000],
     "samples_ts": [250.0, 166.66666666666666]},
]  # fmt: skip


def test_llama_bench_json_becomes_prefill_seconds_and_decode_seconds_per_token():
    numbers = side_by_side.llama_bench_numbers(BENCH_ROWS)
    assert sorted(numbers["prefill"]) == ["32", "512"]
    assert numbers["prefill"]["32"]["samples"] == pytest.approx([0.019, 0.021])
    assert numbers["prefill"]["512"]["median_s"] == pytest.approx(0.3)
    assert numbers["decode"]["samples"] == pytest.approx([0.004, 0.006])  # 1 / tokens per second
    assert numbers["decode"]["min_s"] == pytest.approx(0.004)


def test_llama_bench_json_without_a_test_is_an_error():
    with pytest.raises(peers.PeerError, match="no tg test"):
        side_by_side.llama_bench_numbers(BENCH_ROWS[:2])
    with pytest.raises(peers.PeerError, match="no pp test"):
        side_by_side.llama_bench_numbers(BENCH_ROWS[2:])
    with pytest.raises(peers.PeerError, match="neither"):
        side_by_side.llama_bench_numbers([BENCH_ROWS[0] | {"n_gen": 4}])


def test_logits_against_the_reference_leave_out_the_held_off_ids():
    reference = np.array([0.5, 3.0, -1.0, 2.0, 9.0], np.float32)  # id 4 (end of sequence) would be the top
    same = side_by_side.compare_logits(reference, reference, leave_out=[4])
    assert same == {"max_abs_diff": 0.0, "top1": 1, "reference_top1": 1, "top1_agree": True}

    held_off = reference.copy()
    held_off[4] = -np.inf  # as a runtime holding end-of-sequence off may leave it
    held_off[3] += 0.25
    out = side_by_side.compare_logits(reference, held_off, leave_out=[4])
    assert out["max_abs_diff"] == pytest.approx(0.25) and out["top1_agree"]

    swapped = reference.copy()
    swapped[3] = 3.5  # id 3 now above id 1
    out = side_by_side.compare_logits(reference, swapped, leave_out=[4])
    assert (out["top1"], out["reference_top1"], out["top1_agree"]) == (3, 1, False)
    assert out["max_abs_diff"] == pytest.approx(1.5)
    assert side_by_side.compare_logits(reference, reference, leave_out=[])["top1"] == 4

    with pytest.raises(peers.PeerError, match="4 ids"):
        side_by_side.compare_logits(reference, reference[:4], leave_out=[])


def test_ratios_are_over_the_anchor_and_none_where_a_side_has_no_number():
    def result(prefill: float, decode: float, rss: int) -> dict:
        return {"prefill": {"32": {"median_s": prefill}}, "decode": {"median_s": decode}, "peak_rss_bytes": rss}

    runtime = {"llama_cpp": result(0.1, 0.01, 1000), "ours": result(0.2, 0.015, 1500), "half": {"peak_rss_bytes": 1}}
    out = side_by_side.ratios(runtime, "llama_cpp", ["32"])
    assert out["llama_cpp"] == {"prefill_32": 1.0, "decode": 1.0, "peak_rss": 1.0}
    assert out["ours"] == pytest.approx({"prefill_32": 2.0, "decode": 1.5, "peak_rss": 1.5})
    assert out["half"] == {"prefill_32": None, "decode": None, "peak_rss": 0.001}


def test_rounds_pool_their_samples():
    def one(samples: list[float], rss: int, tokens: list[int]) -> dict:
        return {"prefill": {"8": peers.summary(samples)}, "decode": peers.summary(samples), "load_s": rss / 10,
                "peak_rss_bytes": rss, "tokens": tokens}  # fmt: skip

    pooled = peers.pool([one([3.0, 1.0], 10, [1, 2]), one([2.0], 30, [1, 2]), one([5.0], 20, [1, 2])])
    assert pooled["prefill"]["8"]["samples"] == [3.0, 1.0, 2.0, 5.0] and pooled["decode"]["median_s"] == 2.5
    assert (pooled["peak_rss_bytes"], pooled["load_s"], pooled["tokens_stable"]) == (30, 2.0, True)
    assert len(pooled["rounds"]) == 3
    assert not peers.pool([one([1.0], 1, [1, 2]), one([1.0], 1, [1, 3])])["tokens_stable"]


def test_the_disk_estimate_counts_what_the_workdir_holds_already(tmp_path):
    from gptoss.formats.synth import preset_config

    cfg = preset_config("gpt-oss-20b", 2)
    fresh = side_by_side.estimated_bytes(cfg, ["ours_float32", "llama_cpp"], "float32", tmp_path)
    assert fresh == {"ours_float32": 2 * cfg.weight_bytes("float32"), "llama_cpp": cfg.weight_bytes("mxfp4")}
    assert 22e9 < fresh["ours_float32"] < 23e9  # params and decoder, 11.2 GB each
    (tmp_path / "llama_cpp").mkdir()
    (tmp_path / "llama_cpp" / "model.gguf").write_bytes(b"\0" * 1000)
    again = side_by_side.estimated_bytes(cfg, ["llama_cpp"], "mxfp4", tmp_path)
    assert again == {"llama_cpp": cfg.weight_bytes("mxfp4") - 1000, "reference": cfg.weight_bytes("mxfp4")}


def test_special_ids_of_a_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2, "pad_token_id": 0}))
    assert decoders.checkpoint_special_ids(tmp_path) == ([2], {2, 0, None})
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0], "bos_token_id": 1}))
    assert decoders.checkpoint_special_ids(tmp_path) == ([2, 0], {0, 1, 2})


def test_the_converter_declares_an_unknown_pre_tokenizer_gpt_4o(tmp_path):
    """CONVERT on a stand-in of llama.cpp's converter whose pre-tokenizer check raises as the real one does."""
    (tmp_path / "conversion").mkdir()
    (tmp_path / "conversion" / "__init__.py").write_text("")
    (tmp_path / "conversion" / "gpt_oss.py").write_text(
        "class GptOssModel:\n"
        "    def get_vocab_base_pre(self, tokenizer):\n"
        "        if tokenizer == 'known':\n"
        "            return 'llama-bpe'\n"
        "        raise NotImplementedError('BPE pre-tokenizer was not recognized')\n"
    )
    (tmp_path / "convert_hf_to_gguf.py").write_text(
        "import sys\n"
        "def main():\n"
        "    from conversion.gpt_oss import GptOssModel\n"
        "    print('answers', GptOssModel().get_vocab_base_pre(sys.argv[1]), sys.argv[1:])\n"
    )
    for tokenizer, answer in (("synthetic", "gpt-4o"), ("known", "llama-bpe")):
        cmd = [sys.executable, "-c", side_by_side.CONVERT, str(tmp_path), tokenizer, "--outtype", "bf16"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        assert f"answers {answer} ['{tokenizer}', '--outtype', 'bf16']" in out


def test_run_command_can_keep_stdout_apart_from_the_log(tmp_path):
    code = "import sys; print('[1, 2]'); print('progress', file=sys.stderr)"
    out, log = tmp_path / "out.json", tmp_path / "cmd.log"
    peers.run_command([sys.executable, "-c", code], log, output=out)
    assert json.loads(out.read_text()) == [1, 2]
    assert log.read_text().strip() == "progress"


def report(binding: bool) -> dict:
    def x(prefill: float, decode: float, **more) -> dict:
        lengths = {"32": peers.summary([prefill]), "512": peers.summary([16 * prefill])}
        return {"prefill": lengths, "decode": peers.summary([decode]), "peak_rss_bytes": 2e9, **more}

    llama = x(0.01, 0.002, build={"build_commit": "abc", "build_number": 7})
    ours = x(0.02, 0.003, load_s=1.5, tokens=[5, 6], tokens_stable=True)
    if binding:
        llama |= {"load_s": 0.5, "tokens": [5, 7]}
    runtime = {"ours_mxfp4": ours, "llama_cpp": llama}
    logits = {"max_abs_diff": 0.125, "top1": 5, "reference_top1": 5, "top1_agree": True}
    return {
        "checkpoint_name": "synthetic toy (seed 0)",
        "layers": 2,
        "versions": {"onnxruntime": "1", "onnxruntime_genai": "2", "jax": "3", "llama_cpp_python_sdist": "0.3.36"},
        "settings": {
            "threads": 2,
            "steps": 16,
            "runs": 5,
            "rounds": 1,
            "tokens": 2,
            "prefill": [32, 512],
            "peers": list(runtime),
        },
        "prompt_source": "text",
        "eos": [2, 0],
        "builds": {"gguf": {"wall_s": 1.0, "peak_rss_bytes": 1e9, "label": "`convert`", "reused": True}},
        "reference": {"format": "mxfp4", "tokens": [5, 6], "wall_s": 3.0, "peak_rss_bytes": 1e9},
        "runtime": runtime,
        "anchor": "llama_cpp",
        "ratios": side_by_side.ratios(runtime, "llama_cpp", ["32", "512"]),
        "agreement": {
            "ours_mxfp4": {"logits": logits, "first_token_difference": None, "tokens_measured": True},
            "llama_cpp": {
                "logits": logits if binding else None,
                "first_token_difference": 1 if binding else None,
                "tokens_measured": binding,
            },
        },
        "llama_binding": binding,
    }


def test_the_section_says_what_was_not_measured():
    text = side_by_side.markdown(report(binding=False))
    assert text.startswith("## Side by side: synthetic toy (seed 0), 2 layers\n\nMeasured ")
    rows = [line for line in text.splitlines() if line.startswith("| llama.cpp")]
    assert rows[0].endswith("| not measured |")  # load time
    assert "| not measured | not measured | not measured |" in rows[1]  # logits max |diff|, top-1, greedy tokens
    assert "**not measured**: the `llama_cpp` binding is not installed" in text
    assert "| ours mxfp4, genai | 2.00 | 2.00 | 1.50 | 1.00 |" in text  # ratios over llama.cpp
    assert "| gguf (reused, verified by hash) |" in text

    measured = side_by_side.markdown(report(binding=True))
    assert "not installed" not in measured
    assert "**differ from step 1**" in measured
    assert "| ours mxfp4, genai | 0.125 | yes | identical (2) | yes |" in measured
