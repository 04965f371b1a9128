"""Where a KV-cache decoder graph spends its time in ONNX Runtime: time per operator type for a prefill of each
given length and for one decode step, from ONNX Runtime's own profiler; writes a markdown section and a JSON file.

    .venv/bin/python benchmarks/profile_decoder.py --decoder results/promoted/<name>/decoder \\
        --prefill 32 512 --steps 4 --output /tmp/profile.md --json /tmp/profile.json

Each run is one ``session.run`` of the graph, as onnxruntime-genai makes it: a prefill of N prompt tokens on an
empty cache, then decode steps of one token on the cache it left. A warm-up prefill of the first length is run and
dropped first (ONNX Runtime allocates its arena then). A decode step's numbers are the median step of ``--steps``.
Per operator type: the summed kernel time of its nodes (control flow such as ``If`` left out: its branches'
nodes are counted themselves), their share of the run's kernel time, the node count and
the bytes of the outputs they write (what a decomposed computation moves through memory).
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import peers  # benchmarks/ is on sys.path: this script's own folder

CONTROL_FLOW = {"If", "Loop", "Scan"}  # their time includes their branches' nodes, which the profiler lists too
BYTES = {"float": 4, "int64": 8, "int32": 4, "uint8": 1, "bool": 1, "bfloat16": 2, "float16": 2, "uint32": 4}


def _output_bytes(args: dict) -> int:
    total = 0
    for output in args.get("output_type_shape", []):
        for dtype, shape in output.items():
            total += BYTES.get(dtype, 4) * int(np.prod(shape)) if shape else 0
    return total


def runs_by_op(trace: list[dict]) -> list[dict]:
    """The profiler's events grouped by ``model_run``: per run, its wall time and per op type (time, nodes, bytes)."""
    runs = [e for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run"]
    runs.sort(key=lambda e: e["ts"])
    grouped = [{"wall_us": r["dur"], "ops": collections.defaultdict(lambda: [0, 0, 0])} for r in runs]
    for event in trace:
        if event.get("cat") != "Node" or not event.get("name", "").endswith("_kernel_time"):
            continue
        if event["args"]["op_name"] in CONTROL_FLOW:
            continue
        for run, r in zip(grouped, runs, strict=True):
            if r["ts"] <= event["ts"] <= r["ts"] + r["dur"]:
                entry = run["ops"][event["args"]["op_name"]]
                entry[0] += event["dur"]
                entry[1] += 1
                entry[2] += _output_bytes(event["args"])
                break
    return grouped


def profile(decoder: Path, prefill: list[int], steps: int, threads: int) -> dict:
    import onnxruntime as ort

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from gptoss.runtimes.onnx_runtime import empty_past, ort_step

    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.log_severity_level = 3
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "ort")
        session = ort.InferenceSession(str(decoder), options, providers=["CPUExecutionProvider"])
        rng = np.random.default_rng(0)
        vocab = session.get_outputs()[0].shape[-1]
        vocab = vocab if isinstance(vocab, int) else 1000
        labels = ["warm-up"]

        def run(ids: np.ndarray, past: dict) -> dict:
            mask = np.ones((1, next(iter(past.values())).shape[2] + ids.shape[1]), np.int64)
            return ort_step(session, ids, mask, past)[1]

        run(rng.integers(0, vocab, (1, prefill[0])), empty_past(session, 1))
        past = {}
        for length in prefill:
            past = run(rng.integers(0, vocab, (1, length)), empty_past(session, 1))
            labels.append(f"prefill {length}")
        for step in range(steps):
            past = run(rng.integers(0, vocab, (1, 1)), past)
            labels.append(f"decode {step}")
        trace = json.loads(Path(session.end_profiling()).read_text())
    grouped = runs_by_op(trace)
    result = {}
    for label, run in zip(labels, grouped, strict=True):
        result[label] = {"wall_s": run["wall_us"] / 1e6, "ops": {k: v for k, v in run["ops"].items()}}
    decode = [label for label in labels if label.startswith("decode")]
    median = sorted(decode, key=lambda label: result[label]["wall_s"])[len(decode) // 2]
    phases = {label: result[label] for label in labels if label.startswith("prefill")}
    phases["decode step"] = result[median]
    return phases


def markdown(phases: dict, decoder: Path, threads: int) -> str:
    blocks = []
    for label, phase in phases.items():
        kernel = sum(v[0] for v in phase["ops"].values())
        rows = []
        for op, (us, count, nbytes) in sorted(phase["ops"].items(), key=lambda kv: -kv[1][0]):
            if us < 0.005 * kernel:
                continue
            rows.append([op, f"{us / 1e6:.3f}", f"{100 * us / kernel:.1f} %", count, f"{nbytes / 1e9:.2f}"])
        title = f"**{label}**: {phase['wall_s']:.3f} s wall, {kernel / 1e6:.3f} s in kernels"
        blocks.append(title + "\n\n" + peers.table(["op type", "s", "share", "nodes", "GB written"], rows))
    return peers.section(f"Profile of {decoder}", threads, "ONNX Runtime's profiler, ops under 0.5 % left out", *blocks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--decoder", type=Path, required=True, help="decoder folder or its .onnx file")
    parser.add_argument("--prefill", type=int, nargs="+", default=[32, 512], help="prompt lengths")
    parser.add_argument("--steps", type=int, default=4, help="decode steps (the median is reported)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None, help="markdown section")
    parser.add_argument("--json", type=Path, default=None, help="raw numbers")
    args = parser.parse_args()
    onnx = args.decoder / "model.onnx" if args.decoder.is_dir() else args.decoder
    if not onnx.is_file():
        parser.error(f"--decoder {args.decoder}: no model.onnx there")
    if args.steps < 1 or min(args.prefill) < 1:
        parser.error("--steps and --prefill lengths must be at least 1")
    phases = profile(onnx, args.prefill, args.steps, args.threads)
    text = markdown(phases, onnx, args.threads)
    if args.output:
        peers.write_outputs(text, args.output, phases, args.json)
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
