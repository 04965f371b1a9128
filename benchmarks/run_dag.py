"""Benchmark the whole DAG for one config from a clean results folder, and write a performance page.

    python benchmarks/run_dag.py --configfile config/gpt-oss-20b-synthetic.yaml --output docs/performance.md

Records, per rule, Snakemake's benchmark numbers (wall seconds, peak RSS, CPU seconds); then, in the same run,
the forward latency at the configured sequence length of the canonical graph in ONNX Runtime and of the jitted
JAX model (each in its own process, so their memory never adds up), and the floor set by reading every weight
once (params bytes ÷ measured memory read bandwidth). Not a test: CI runs only the toy DAG.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

ROOT = Path(__file__).resolve().parent.parent
LATENCY_RUNS = 5

ORT_LATENCY = """
import sys, time, numpy as np
from gptoss.runtimes.onnx_runtime import ort_session
session = ort_session(sys.argv[1])
ids = np.random.default_rng(0).integers(0, int(sys.argv[3]), (1, int(sys.argv[2]))).astype(np.int32)
session.run(["logits"], {"input_ids": ids})
times = []
for _ in range(int(sys.argv[4])):
    t = time.perf_counter(); session.run(["logits"], {"input_ids": ids}); times.append(time.perf_counter() - t)
print(min(times), float(np.median(times)))
"""

JAX_LATENCY = """
import sys, time, numpy as np, jax.numpy as jnp
from pathlib import Path
from gptoss.model.gpt_oss import forward
from gptoss.model.params import Params
from gptoss.runtimes.jax_model import StreamedModel
model = StreamedModel(Params.open(Path(sys.argv[1])))
ids = jnp.asarray(np.random.default_rng(0).integers(0, model.cfg.vocab_size, (1, int(sys.argv[2]))).astype(np.int32))
forward(model, ids)["logits"].block_until_ready()
times = []
for _ in range(int(sys.argv[3])):
    t = time.perf_counter(); forward(model, ids)["logits"].block_until_ready(); times.append(time.perf_counter() - t)
print(min(times), float(np.median(times)))
"""


def read_bandwidth_gbs(size_bytes: int = 1 << 30) -> float:
    """Memory read bandwidth: best of 5 sums over a 1 GiB array."""
    data = np.ones(size_bytes // 8, dtype=np.float64)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - start)
    return size_bytes / best / 1e9


def python_snippet(code: str, *args: str) -> list[float]:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, check=True, cwd=ROOT)
    return [float(x) for x in out.stdout.split()]


PEAK = re.compile(r"finished in [0-9.]+ s, peak RSS ([0-9.]+) GB")


def benchmark_rows(results: Path) -> list[dict]:
    """Snakemake's benchmark numbers per rule, plus the kernel's peak RSS that ``gptoss`` logs at exit
    (Snakemake samples RSS now and then and can miss a short peak)."""
    rows = []
    promotion = results.parent / "benchmarks" / "promote_baseline2.tsv"  # per tag, beside every checkpoint's
    tables = [*(results / "benchmarks").glob("*.tsv"), *([promotion] if promotion.is_file() else [])]
    for tsv in sorted(tables, key=lambda p: p.stat().st_mtime):
        with open(tsv) as fh:
            row = next(csv.DictReader(fh, delimiter="\t"))
        rss = float(row["max_rss"]) if row.get("max_rss") not in (None, "", "-", "NA") else float("nan")
        log = tsv.parent.parent / "logs" / f"{tsv.stem}.log"
        peaks = PEAK.findall(log.read_text()) if log.is_file() else []
        rows.append(
            {
                "rule": tsv.stem,
                "wall_s": float(row["s"]),
                "max_rss_gb": rss * 2**20 / 1e9,  # Snakemake's max_rss is in MiB
                "peak_gb": float(peaks[-1]) if peaks else float("nan"),
                "cpu_s": float(row["cpu_time"]),
            }
        )
    return rows


def tree_bytes(folder: Path) -> int:
    """Bytes of the files under ``folder`` (each counted once)."""
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configfile", type=Path, required=True)
    parser.add_argument("--output", type=Path, required=True, help="Markdown file to append the results to")
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 2)
    parser.add_argument("--title", default=None)
    args = parser.parse_args()

    config = yaml.safe_load(args.configfile.read_text())
    name = config["baseline"]
    entry = config["checkpoints"][name]
    results = ROOT / "results" / name
    promoted = ROOT / config["promote"]["dir"] / "baseline2"

    from gptoss.formats.synth import preset_config

    cfg = preset_config(entry.get("preset", "gpt-oss-20b"), entry["layers"])
    dtype = entry.get("dtype", "float32")
    params_bytes = cfg.weight_bytes(dtype)
    needed = cfg.weight_bytes("mxfp4") + 3 * params_bytes  # checkpoint, params, the graphs' one weights file, promoted
    reclaimed = sum(tree_bytes(folder) for folder in (results, promoted) if folder.is_dir())  # deleted below
    free = shutil.disk_usage(ROOT).free + reclaimed
    if free < needed:
        print(
            f"error: {ROOT} has {free / 1e9:.1f} GB free; this DAG needs about {needed / 1e9:.1f} GB", file=sys.stderr
        )
        return 1

    shutil.rmtree(results, ignore_errors=True)
    shutil.rmtree(promoted, ignore_errors=True)
    start = time.perf_counter()
    snakemake = [sys.executable, "-m", "snakemake"]
    cmd = [*snakemake, "--cores", str(args.cores), "promote_baseline2", "--configfile", str(args.configfile)]
    print("running:", " ".join(cmd), flush=True)
    status = subprocess.run(cmd, cwd=ROOT).returncode
    total = time.perf_counter() - start
    if status:
        print(f"error: the DAG failed (exit {status}); see results/{name}/logs/", file=sys.stderr)
        return status

    rows = benchmark_rows(results)
    seq = int(config.get("sequence_length", 32))
    canonical = results / "onnx" / "canonical.onnx"
    disk = {"results": tree_bytes(results), "promoted": tree_bytes(promoted)}
    params = next(results.glob("flax_params_*layers.msgpack"))
    ort_min, ort_med = python_snippet(ORT_LATENCY, str(canonical), str(seq), str(cfg.vocab_size), str(LATENCY_RUNS))
    jax_min, jax_med = python_snippet(JAX_LATENCY, str(params), str(seq), str(LATENCY_RUNS))
    bandwidth = read_bandwidth_gbs()
    floor = params_bytes / 1e9 / bandwidth
    worst = json.loads((results / "gate" / "verdict.json").read_text())["worst"]

    title = args.title or f"{name} ({entry['layers']} layers, {entry.get('dtype', 'float32')})"
    lines = [
        f"## {title}",
        "",
        f"Measured {datetime.date.today()} on {platform.machine()}, {os.cpu_count()} cores, "
        f"`snakemake --cores {args.cores}` from an empty results folder: **{total / 60:.1f} min** in all. "
        f"{cfg.param_count() / 1e9:.2f} B parameters, {params_bytes / 1e9:.1f} GB of {dtype} weights. Disk: "
        f"results/{name} {disk['results'] / 1e9:.1f} GB, promoted {disk['promoted'] / 1e9:.1f} GB.",
        "",
        "| rule | wall s | peak RSS GB (kernel) | max RSS GB (Snakemake, sampled) | CPU s |",
        "|---|---|---|---|---|",
        *(
            f"| {r['rule']} | {r['wall_s']:.1f} | {r['peak_gb']:.2f} | {r['max_rss_gb']:.2f} | {r['cpu_s']:.1f} |"
            for r in rows
        ),
        "",
        f"Forward pass, batch 1 × {seq} tokens (best / median of {LATENCY_RUNS}, after one warm-up): "
        f"ONNX Runtime {ort_min:.2f} / {ort_med:.2f} s, jitted JAX {jax_min:.2f} / {jax_med:.2f} s "
        f"(ORT/JAX {ort_med / jax_med:.2f}). Floor from reading every weight once: "
        f"{params_bytes / 1e9:.1f} GB ÷ {bandwidth:.1f} GB/s = {floor:.2f} s.",
        "",
        "Gate: " + ", ".join(f"{k} {w['max_abs_diff']:.3g} (atol {w['atol']:.3g})" for k, w in worst.items()),
        "",
    ]
    with open(args.output, "a") as fh:
        fh.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
