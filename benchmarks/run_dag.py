"""Benchmark the whole DAG for one config from a clean results folder, and write a performance page.

    python benchmarks/run_dag.py --configfile config/gpt-oss-20b-synthetic.yaml --output docs/performance.md

Records, per rule, Snakemake's benchmark numbers (wall seconds, peak RSS, CPU seconds); then, in the same run,
the forward latency at the configured sequence length of the canonical graph in ONNX Runtime and of the jitted
JAX model (each in a fresh process of its own, ``benchmarks/peers.py``, so their memory never adds up; with its
peak RSS), and the floor set by reading every weight
once (params bytes ÷ measured memory read bandwidth). Not a test: CI runs only the toy DAG.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import peers  # benchmarks/ is on sys.path: this script's own folder
import yaml

ROOT = Path(__file__).resolve().parent.parent
LATENCY_RUNS = 5


def ort_forward(spec: dict) -> dict:
    """The canonical graph's forward pass in ONNX Runtime (run in a process of its own): timings."""
    from gptoss.graphs.names import INPUT_NAME
    from gptoss.runtimes.onnx_runtime import ort_session

    session = ort_session(Path(spec["path"]))
    ids = np.random.default_rng(0).integers(0, spec["vocab"], (1, spec["length"])).astype(np.int32)
    return peers.repeat(lambda: peers.seconds(session.run, ["logits"], {INPUT_NAME: ids}), spec["runs"])


def jax_forward(spec: dict) -> dict:
    """The jitted JAX model's forward pass on the params (run in a process of its own): timings."""
    import jax.numpy as jnp

    from gptoss.model.gpt_oss import forward
    from gptoss.model.params import Params
    from gptoss.runtimes.jax_model import StreamedModel

    model = StreamedModel(Params.open(Path(spec["path"])))
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (1, spec["length"])).astype(np.int32)
    ids = jnp.asarray(ids)
    return peers.repeat(lambda: peers.seconds(lambda: forward(model, ids)["logits"].block_until_ready()), spec["runs"])


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
    parser.add_argument("--config", nargs="*", default=[], metavar="KEY=VALUE", help="snakemake --config overrides")
    parser.add_argument("--skip-latency", action="store_true", help="no forward-pass latency after the DAG")
    args = parser.parse_args()

    config = yaml.safe_load(args.configfile.read_text())
    name = config["baseline"]
    entry = config["checkpoints"][name]
    results = ROOT / "results" / name
    promoted = ROOT / config["promote"]["dir"] / "baseline2"

    from gptoss.formats.synth import preset_config

    cfg = preset_config(entry.get("preset", "gpt-oss-20b"), entry["layers"])
    dtype = entry.get("weight_format", entry.get("dtype", "float32"))
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
    snakemake = [sys.executable, "-m", "snakemake"]
    cmd = [*snakemake, "--cores", args.cores, "promote_baseline2", "--configfile", args.configfile]
    cmd += ["--config", *args.config] if args.config else []
    dag = peers.run_command(cmd, None, cwd=ROOT, check=False)
    if dag["exit_status"]:
        print(f"error: the DAG failed (exit {dag['exit_status']}); see results/{name}/logs/", file=sys.stderr)
        return dag["exit_status"]

    rows = benchmark_rows(results)
    seq = int(config.get("sequence_length", 32))
    canonical = results / "onnx" / "canonical.onnx"
    disk = {"results": tree_bytes(results), "promoted": tree_bytes(promoted)}
    params = next(results.glob("flax_params_*layers.msgpack"))
    spec = {"length": seq, "runs": LATENCY_RUNS}
    latency = ""
    if not args.skip_latency:
        with tempfile.TemporaryDirectory(prefix="run_dag-") as folder:
            ort = peers.run_python(
                ort_forward, spec | {"path": str(canonical), "vocab": cfg.vocab_size}, Path(folder), "ort"
            )
            jax = peers.run_python(jax_forward, spec | {"path": str(params)}, Path(folder), "jax")
        bandwidth = peers.read_bandwidth_gbs()
        floor = params_bytes / 1e9 / bandwidth
        latency = (
            f"Forward pass, batch 1 × {seq} tokens (best / median of {LATENCY_RUNS}, after one warm-up; peak RSS of "
            f"each process): ONNX Runtime {ort['min_s']:.2f} / {ort['median_s']:.2f} s, "
            f"{ort['peak_rss_bytes'] / 1e9:.2f} GB; jitted JAX {jax['min_s']:.2f} / {jax['median_s']:.2f} s, "
            f"{jax['peak_rss_bytes'] / 1e9:.2f} GB (ORT/JAX {ort['median_s'] / jax['median_s']:.2f}). Floor from "
            f"reading every weight once: {params_bytes / 1e9:.1f} GB ÷ {bandwidth:.1f} GB/s = {floor:.2f} s."
        )
    worst = json.loads((results / "gate" / "verdict.json").read_text())["worst"]

    title = args.title or f"{name} ({entry['layers']} layers, {entry.get('dtype', 'float32')})"
    overrides = f" `--config {' '.join(args.config)}`" if args.config else ""
    section = peers.section(
        title,
        args.cores,
        f"`snakemake --cores {args.cores}`{overrides} from an empty results folder: "
        f"**{dag['wall_s'] / 60:.1f} min** in all. "
        f"{cfg.param_count() / 1e9:.2f} B parameters, {params_bytes / 1e9:.1f} GB of {dtype} weights. Disk: "
        f"results/{name} {disk['results'] / 1e9:.1f} GB, promoted {disk['promoted'] / 1e9:.1f} GB.",
        peers.table(
            ["rule", "wall s", "peak RSS GB (kernel)", "max RSS GB (Snakemake, sampled)", "CPU s"],
            [
                [r["rule"], f"{r['wall_s']:.1f}", f"{r['peak_gb']:.2f}", f"{r['max_rss_gb']:.2f}", f"{r['cpu_s']:.1f}"]
                for r in rows
            ],
        ),
        *([latency] if latency else []),
        "Gate: " + ", ".join(f"{k} {w['max_abs_diff']:.3g} (atol {w['atol']:.3g})" for k, w in worst.items()),
    )
    peers.write_outputs(section + "\n", args.output, append=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
