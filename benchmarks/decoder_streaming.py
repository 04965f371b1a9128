"""The decoder's generation parity on a node smaller than its weights: ONNX Runtime maps the weights file, whose
pages are file-backed, so under a memory limit the kernel drops them and reads them again when they are used.
This measures what that costs: the decoder graph's greedy loop (a prefill, then one token per step) inside a
memory cgroup of each given limit, per step wall time, major page faults (reads from disk) and the cgroup's peak,
then the whole ``gptoss parity --stage decoder`` job under the tightest limit that this loop survived. The weights
file's pages are dropped from the page cache before each run, so that every page is read, and charged, inside.

    python benchmarks/decoder_streaming.py --folder results/NAME/onnx \\
        --params results/NAME/flax_params_24layers.msgpack --limits 16 10 8 --output /tmp/decoder_streaming.md

Needs root (it creates cgroup v1 memory groups under /sys/fs/cgroup/memory). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import peers  # benchmarks/ is on sys.path: this script's own folder

ROOT = Path(__file__).resolve().parent.parent
CGROUP = Path("/sys/fs/cgroup/memory")


def child(folder: Path, steps: int, prompt_length: int, threads: int) -> dict:
    """The greedy loop in this process (already inside its cgroup): per step seconds and major faults."""
    from gptoss.runtimes.generation import choose
    from gptoss.runtimes.onnx_runtime import empty_past, ort_session, ort_step

    start = time.perf_counter()
    session = ort_session(folder / "decoder.onnx", threads)
    load_s = time.perf_counter() - start
    vocab = session.get_outputs()[0].shape[-1]
    ids = np.random.default_rng(0).integers(3, vocab if isinstance(vocab, int) else 1000, (1, prompt_length))
    past, length, record = empty_past(session, 1), 0, []
    for _ in range(steps + 1):  # the prefill, then the steps
        faults = resource.getrusage(resource.RUSAGE_SELF).ru_majflt
        start = time.perf_counter()
        length += ids.shape[1]
        logits, past = ort_step(session, ids.astype(np.int64), np.ones((1, length), np.int64), past)
        record.append(
            {
                "s": time.perf_counter() - start,
                "major_faults": resource.getrusage(resource.RUSAGE_SELF).ru_majflt - faults,
            }
        )
        ids = np.asarray([[choose(logits[0][-1], ())]])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"load_s": load_s, "steps": record, "peak_rss_bytes": peak}


def evict(path: Path) -> None:
    """Drop ``path``'s pages from the page cache: a page is charged to the cgroup that first reads it, so weights
    cached by an earlier run would escape the limit."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def in_cgroup(limit_gb: float, command: list[str], log: Path) -> dict:
    """Run ``command`` in a fresh memory cgroup of ``limit_gb``: its exit status, wall time and the cgroup's peak
    usage (pages of the mapped weights file count while resident) and limit hits."""
    group = CGROUP / f"gptoss_decoder_{int(limit_gb * 1000)}"
    if group.exists():
        group.rmdir()
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(int(limit_gb * 1e9)))
        start = time.perf_counter()
        with open(log, "w") as out:
            proc = subprocess.run(
                command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=os.environ | {"JAX_PLATFORMS": "cpu"},
                preexec_fn=lambda: (group / "cgroup.procs").write_text(str(os.getpid())),
            )  # fmt: skip
        wall = time.perf_counter() - start
        usage = int((group / "memory.max_usage_in_bytes").read_text())
        failcnt = int((group / "memory.failcnt").read_text())
        return {"exit": proc.returncode, "wall_s": wall, "cgroup_peak_bytes": usage, "limit_hits": failcnt}
    finally:
        if (group / "cgroup.procs").read_text().strip() == "":
            group.rmdir()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", type=Path, help="the exported onnx/ folder (decoder.onnx, model.onnx.data)")
    parser.add_argument("--params", type=Path, help="the params, for the whole parity job")
    parser.add_argument("--limits", type=float, nargs="+", default=[16.0], help="memory limits, GB")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--prompt-length", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        args.child.write_text(json.dumps(child(args.folder, args.steps, args.prompt_length, args.threads)))
        return 0

    args.output.parent.mkdir(parents=True, exist_ok=True)
    weights_gb = (args.folder / "model.onnx.data").stat().st_size / 1e9
    rows, survived = [], None
    for limit in sorted(args.limits, reverse=True):
        result = args.output.with_suffix(f".{limit:g}GB.json")
        command = [sys.executable, __file__, "--folder", str(args.folder), "--steps", str(args.steps),
                   "--prompt-length", str(args.prompt_length), "--threads", str(args.threads), "--output",
                   str(args.output), "--child", str(result)]  # fmt: skip
        evict(args.folder / "model.onnx.data")
        outcome = in_cgroup(limit, command, args.output.with_suffix(f".{limit:g}GB.log"))
        if outcome["exit"] or not result.is_file():
            rows.append([f"{limit:g}", "killed" if outcome["exit"] else "failed", "", "", "", "", ""])
            continue
        survived = limit
        measured = json.loads(result.read_text())
        steps = measured["steps"][1:]
        rows.append([
            f"{limit:g}", f"{measured['load_s']:.1f}", f"{measured['steps'][0]['s']:.2f}",
            f"{np.median([s['s'] for s in steps]):.3f}", f"{np.mean([s['major_faults'] for s in steps]):.0f}",
            f"{outcome['cgroup_peak_bytes'] / 1e9:.2f}", f"{outcome['limit_hits']}",
        ])  # fmt: skip
    blocks = [
        peers.table(
            [
                "memory limit GB",
                "load s",
                "prefill s",
                "s/step (median)",
                "major faults/step",
                "cgroup peak GB",
                "limit hits",
            ],
            rows,
        )  # fmt: skip
    ]
    if survived is not None and args.params:
        name = args.folder.parent.name
        log = args.output.with_suffix(".parity.log")
        command = [sys.executable, "-m", "gptoss", "parity", "--stage", "decoder", "--params", str(args.params),
                   "--onnx", str(args.folder / "decoder.onnx"), "--generate-tokens", str(args.steps),
                   "--threads", str(args.threads), "--prompt", "What is the capital of France?", "--csv",
                   str(args.output.with_suffix(".parity.csv"))]  # fmt: skip
        evict(args.folder / "model.onnx.data")
        outcome = in_cgroup(survived, command, log)
        blocks.append(
            f"The whole decoder parity job of {name} (JAX, ONNX Runtime and onnxruntime-genai, {args.steps} greedy "
            f"steps) under {survived:g} GB: exit {outcome['exit']}, {outcome['wall_s']:.0f} s, cgroup peak "
            f"{outcome['cgroup_peak_bytes'] / 1e9:.2f} GB ({outcome['limit_hits']} limit hits)."
        )
    section = peers.section(
        f"Decoder under a memory limit: {args.folder.parent.name}",
        args.threads,
        f"weights file {weights_gb:.1f} GB, prompt {args.prompt_length} tokens, {args.steps} greedy steps",
        *blocks,
    )
    peers.write_outputs(section, args.output, append=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
