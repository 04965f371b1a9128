"""benchmarks/peers.py, the machinery the benchmarks share, on tiny child programs (the module-level functions
below, which each measured child loads from this file): peak RSS per process, timings, verified build reuse, the
dated markdown."""

from __future__ import annotations

import datetime
import re
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import peers  # noqa: E402

MB = 10**6


# --- the child programs ------------------------------------------------------------------------------------------


def allocate(spec: dict) -> dict:
    data = b"\x01" * spec["bytes"]  # written, so every page is resident
    return {"held": len(data)}


def nothing(spec: dict) -> dict:
    return {}


def sleeper(spec: dict) -> dict:
    calls = []

    def call() -> None:
        time.sleep(spec["warmup_s"] if not calls else spec["sleep_s"])
        calls.append(1)

    return peers.repeat(lambda: peers.seconds(call), spec["runs"])


COPY = "import sys; open(sys.argv[2], 'w').write(open(sys.argv[1]).read()); open(sys.argv[3], 'a').write('x')"


# --- the tests ---------------------------------------------------------------------------------------------------


def test_peak_rss_is_each_childs_own(tmp_path):
    big = peers.run_python(allocate, {"bytes": 200 * MB}, tmp_path, "big")
    ballast = b"\x01" * (300 * MB)  # this process's peak must not show in the next child's
    small = peers.run_python(nothing, {}, tmp_path, "small")
    assert len(ballast) == 300 * MB
    assert big["held"] == 200 * MB and big["exit_status"] == 0
    assert big["peak_rss_bytes"] >= 200 * MB
    assert small["peak_rss_bytes"] < 80 * MB
    assert small["peak_rss_bytes"] * 3 < big["peak_rss_bytes"]
    assert Path(big["log"]).is_file() and big["wall_s"] > 0


def test_repeat_reports_median_and_min_without_the_warmup(tmp_path):
    result = peers.run_python(sleeper, {"runs": 5, "sleep_s": 0.05, "warmup_s": 0.5}, tmp_path, "sleeper")
    assert len(result["samples"]) == 5
    assert result["min_s"] == min(result["samples"]) >= 0.05
    assert result["min_s"] <= result["median_s"] < 0.4  # the 0.5 s warm-up is not a sample
    assert result["wall_s"] >= 0.5 + 5 * 0.05
    assert peers.summary([3.0, 1.0, 2.0]) == {"samples": [3.0, 1.0, 2.0], "median_s": 2.0, "min_s": 1.0}


def test_a_failing_child_raises_with_its_log(tmp_path):
    with pytest.raises(peers.PeerError, match=r"(?s)exit 3.*boom"):
        peers.run_command([sys.executable, "-c", "print('boom'); raise SystemExit(3)"], tmp_path / "fail.log")
    assert peers.run_command([sys.executable, "-c", "raise SystemExit(3)"], None, check=False)["exit_status"] == 3


def test_a_peer_must_report_what_it_declares(tmp_path):
    peer = peers.Peer("quiet", "quiet", tmp_path, nothing, measures=("load",))
    with pytest.raises(peers.PeerError, match="declares"):
        peers.measure(peer, peers.Request([1, 2], steps=1, runs=1, threads=1), tmp_path)


def test_a_build_is_reused_only_when_its_hashes_match(tmp_path):
    source, output, counter, records = tmp_path / "in.txt", tmp_path / "out.txt", tmp_path / "runs", tmp_path / "b"
    source.write_text("a")
    step = peers.Build("copy", (sys.executable, "-c", COPY, source, output, counter), (source,), (output,), "copy")

    def runs() -> int:
        return len(counter.read_text())

    first = peers.build(step, records, reuse=True)
    assert (first["reused"], runs(), output.read_text(), first["exit_status"]) == (False, 1, "a", 0)
    assert Path(first["log"]).is_file() and first["peak_rss_bytes"] > 0
    again = peers.build(step, records, reuse=True)
    assert (again["reused"], runs()) == (True, 1)
    assert again["input_sha256"] == first["input_sha256"] and again["wall_s"] == first["wall_s"]

    source.write_text("b")  # other inputs: refused, built again
    changed = peers.build(step, records, reuse=True)
    assert (changed["reused"], runs(), output.read_text()) == (False, 2, "b")
    assert changed["input_sha256"] != first["input_sha256"]

    output.write_text("tampered")  # outputs changed since: refused
    assert (peers.build(step, records, reuse=True)["reused"], runs(), output.read_text()) == (False, 3, "b")
    assert (peers.build(step, records, reuse=False)["reused"], runs()) == (False, 4)


def test_a_failed_build_leaves_no_record(tmp_path):
    step = peers.Build("bad", (sys.executable, "-c", "raise SystemExit(2)"), (), (tmp_path / "out",))
    with pytest.raises(peers.PeerError, match="exit 2"):
        peers.build(step, tmp_path / "b", reuse=True)
    assert not (tmp_path / "b" / "bad.json").exists()


class CountingDecoder(peers.Decoder):
    def load(self, spec: dict) -> None:
        self.loaded = spec["path"]

    def prefill(self, ids: list[int]) -> float:
        self.generated = [len(ids)]
        return 0.001 * len(ids)

    def step(self) -> None:
        self.generated.append(self.generated[-1] + 1)

    def tokens(self) -> list[int]:
        return list(self.generated)


def test_measure_decoder_times_each_prefill_length_and_the_decode_steps():
    spec = peers.Request(list(range(8)), steps=3, runs=4, threads=1, prefill_lengths=(2, 8)).spec()
    out = peers.measure_decoder(CountingDecoder(), spec | {"path": "x"})
    assert sorted(out["prefill"]) == ["2", "8"]
    assert out["prefill"]["2"]["samples"] == [0.002] * 4 and out["prefill"]["8"]["median_s"] == 0.008
    assert len(out["decode"]["samples"]) == 3
    assert out["tokens"] == list(range(8, 8 + 1 + peers.DECODE_WARMUP + 3))
    assert out["load_s"] >= 0


def test_sections_are_dated():
    text = peers.section("Title", 3, "details", peers.table(["a", "b"], [[1, "x"]]))
    today = datetime.date.today().isoformat()
    assert re.search(rf"^Measured {today} on .+ \(\d+ cores\), 3 threads; details$", text, re.M)
    assert text.startswith("## Title\n\nMeasured ")
    assert "| a | b |\n| --- | --- |\n| 1 | x |" in text
    assert peers.section("T", 1, "").splitlines()[-1].endswith("1 threads.")
