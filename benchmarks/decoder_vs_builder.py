"""Our KV-cache decoder against the onnxruntime-genai model builder's fp32 decoder of the same checkpoint, side by
side in one run; writes a markdown section and a JSON file of the raw numbers.

    .venv/bin/python benchmarks/decoder_vs_builder.py --checkpoint /tmp/bench/toy/ckpt \\
        --output /tmp/bench/toy/decoder_vs_builder.md --json /tmp/bench/toy/decoder_vs_builder.json

What it measures, each build and each runtime in its own fresh subprocess (peak RSS is the kernel's high-water mark
of that process alone, from ``os.wait4``):

* builds: ``python -m onnxruntime_genai.models.builder -i CKPT -o W/builder_fp32 -p fp32 -e cpu -c W/builder_cache``
  (``HF_HUB_OFFLINE=1``), and ours: ``gptoss convert`` (unless ``--params``) then ``gptoss export --stage decoder``
  (unless ``--decoder``): wall time and peak RSS of each;
* per decoder, through onnxruntime-genai (``og.Config`` with ``intra_op_num_threads`` overlaid, greedy, ``min_length
  = max_length`` so end-of-sequence never stops it): prefill = the time of ``append_tokens`` of the prompt (median of
  ``--runs`` fresh generators, after a warm-up), decode = the time of each ``generate_next_token`` that runs the model
  (median over ``--steps``), the greedy tokens, the process's peak RSS; for our graph also the same prefill and
  decode straight in ONNX Runtime (``gptoss.runtime.ort_session``, ``gptoss.generation.ort_step``): genai's overhead;
* ratios ours/builder against the targets (decode ≤ 1.5×, prefill ≤ 1.2×, peak RSS ≤ 1.2×), and the weight bytes a
  decode step reads: the floor from the config, and what each graph's initializers imply (see ``floor_bytes`` and
  ``graph_step_bytes``), with the implied read rate floor bytes ÷ (s/token).

The 2-layer gpt-oss-20b shapes (2.80 B parameters, 11.2 GB in float32) need about 34 GB of disk in the workdir
besides the 3.3 GB checkpoint (the builder's graph, our float32 params and our decoder, 11.2 GB each), about 12 GB
of memory (the builder: 2.2 min and 11.3 GB peak measured; each runtime process holds its 11 GB of weights;
convert about 6.4 GB), and roughly 10-15 minutes on 2 cores:

    .venv/bin/gptoss synth --preset gpt-oss-20b --layers 2 --seed 0 --output /tmp/bench/20b/ckpt
    .venv/bin/python benchmarks/decoder_vs_builder.py --checkpoint /tmp/bench/20b/ckpt --workdir /tmp/bench/20b/work \\
        --output docs/decoder_vs_builder.md --json /tmp/bench/20b/decoder_vs_builder.json

Run it on a quiet machine: the timings are only as good as the machine is idle (``--reuse`` reruns the
measurements on the folders already built). The toy checkpoint runs in well under a minute; its sub-millisecond
steps measure per-node overhead and fit in the CPU caches, not the bandwidth-bound 20b case.
"""

from __future__ import annotations

import argparse
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
from run_dag import read_bandwidth_gbs  # benchmarks/ is on sys.path: this script's own folder

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"prefill_s": 1.2, "decode_s_per_token": 1.5, "peak_rss_bytes": 1.2}
# A fixed text, tokenized with the checkpoint's tokenizer and repeated up to the prompt length.
PROMPT_TEXT = (
    "The quick brown fox jumps over the lazy dog. def forward(self, x): return x @ self.kernel + self.bias. "
    "Large language models predict the next token from the ones before it, one step at a time. "
)
GB = 1e9
# Initializers a decode step reads only in part (names of both graphs): the experts (k of E per layer, chosen by
# the router) and the tables one row of which is gathered per token (embedding; the builder's RoPE caches).
EXPERT_NAMES = re.compile(r"(\.experts\.|\.mlp\.(gate_up|down)_(kernel|bias)$)")
ROW_TABLE_NAMES = re.compile(r"(^|\.)(embed\.embedding|embed_tokens\.weight)$|^(cos|sin)_cache$")


# --- the runtime side, run in a child process -------------------------------------------------------------------


def rss_now() -> int:
    """This process's resident set size now, in bytes (Linux ``/proc``; 0 elsewhere)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def thread_count() -> int:
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


def child_genai(spec: dict) -> dict:
    """onnxruntime-genai on a decoder folder: load, warm-up, prefills, one measured greedy decode."""
    import onnxruntime_genai as og

    prompt = np.asarray(spec["prompt"], dtype=np.int32)
    # The builder's GroupQueryAttention wants a KV buffer of at least its sliding window (128 at 20b).
    window = json.loads((Path(spec["path"]) / "genai_config.json").read_text())["model"]["decoder"]
    window = window.get("sliding_window", {}).get("window_size", 0)
    steps, length = spec["steps"], max(len(spec["prompt"]) + spec["steps"] + 1, window + 1)
    out: dict = {"rss_before_load_bytes": rss_now(), "threads_before_load": thread_count()}
    start = time.perf_counter()
    config = og.Config(spec["path"])
    # onnxruntime-genai reads the decoder's session options from genai_config.json; overlay the thread count.
    config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": spec["threads"]}}}}))
    model = og.Model(config)
    out["load_s"] = time.perf_counter() - start
    out["threads_after_load"] = thread_count()
    params = og.GeneratorParams(model)
    # max_length >= prompt + steps + 1: the first generate_next_token only picks from the prefill's logits, each
    # later one runs the model on the previous token first; `steps` decode runs are timed.
    params.set_search_options(do_sample=False, max_length=length, min_length=length)

    def prefill() -> tuple[og.Generator, float]:
        generator = og.Generator(model, params)
        start = time.perf_counter()
        generator.append_tokens(prompt)
        return generator, time.perf_counter() - start

    warm, out["warmup_prefill_s"] = prefill()
    for _ in range(3):  # one pick, two decode runs
        warm.generate_next_token()
    del warm
    samples = []
    for _ in range(spec["runs"]):
        generator, seconds = prefill()
        samples.append(seconds)
        del generator
    out["prefill_s"] = samples
    generator, out["decode_run_prefill_s"] = prefill()
    start = time.perf_counter()
    generator.generate_next_token()
    out["first_pick_s"] = time.perf_counter() - start
    decode = []
    for _ in range(steps):
        start = time.perf_counter()
        generator.generate_next_token()
        decode.append(time.perf_counter() - start)
    out["decode_s"] = decode
    out["tokens"] = [int(t) for t in generator.get_sequence(0)[len(prompt) : len(prompt) + steps + 1]]
    return out


def child_ort(spec: dict) -> dict:
    """Our decoder graph straight in ONNX Runtime: the same warm-up, prefills and greedy decode as ``child_genai``."""
    from gptoss.runtimes.generation import choose
    from gptoss.runtimes.onnx_runtime import empty_past, ort_session, ort_step

    prompt = np.asarray([spec["prompt"]], dtype=np.int64)
    suppress, steps = spec["suppress"], spec["steps"]
    out: dict = {"rss_before_load_bytes": rss_now(), "threads_before_load": thread_count()}
    start = time.perf_counter()
    session = ort_session(Path(spec["path"]), spec["threads"])
    out["load_s"] = time.perf_counter() - start
    out["threads_after_load"] = thread_count()

    def prefill() -> tuple[int, dict, float]:
        past = empty_past(session, 1)
        start = time.perf_counter()
        logits, past = ort_step(session, prompt, np.ones_like(prompt), past)
        seconds = time.perf_counter() - start
        return choose(logits[0, -1], suppress), past, seconds

    def step(token: int, past: dict) -> tuple[int, dict]:
        total = next(iter(past.values())).shape[2] + 1
        logits, past = ort_step(session, np.asarray([[token]], np.int64), np.ones((1, total), np.int64), past)
        return choose(logits[0, -1], suppress), past

    token, past, out["warmup_prefill_s"] = prefill()
    for _ in range(2):
        token, past = step(token, past)
    out["prefill_s"] = [prefill()[2] for _ in range(spec["runs"])]
    token, past, out["decode_run_prefill_s"] = prefill()
    tokens, decode = [token], []
    for _ in range(steps):
        start = time.perf_counter()
        token, past = step(token, past)
        decode.append(time.perf_counter() - start)
        tokens.append(token)
    out["decode_s"], out["tokens"] = decode, tokens
    return out


def child_main(spec_path: str) -> int:
    spec = json.loads(Path(spec_path).read_text())
    result = {"genai": child_genai, "ort": child_ort}[spec["runtime"]](spec)
    Path(spec["output"]).write_text(json.dumps(result, indent=1) + "\n")
    return 0


# --- subprocesses, measured --------------------------------------------------------------------------------------


class StepFailed(Exception):
    pass


def run_measured(name: str, cmd: list[str], log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` with its output in ``log``; its wall time and peak RSS (``ru_maxrss`` of this child alone, from
    ``os.wait4``: ``RUSAGE_CHILDREN`` would give the largest child so far, not this one)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    print(f"  $ {' '.join(map(str, cmd))}\n    (log: {log})", flush=True)
    start = time.perf_counter()
    with open(log, "w") as fh:
        proc = subprocess.Popen([str(c) for c in cmd], stdout=fh, stderr=subprocess.STDOUT, env=env)
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        except BaseException:
            proc.kill()
            proc.wait()
            raise
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise StepFailed(f"{name} failed (exit {proc.returncode}) after {wall:.1f} s; last lines of {log}:\n{tail}")
    peak = usage.ru_maxrss * 1024  # KiB on Linux
    print(f"    {name}: {wall:.1f} s, peak RSS {peak / GB:.2f} GB", flush=True)
    return {"wall_s": wall, "peak_rss_bytes": peak, "command": [str(c) for c in cmd]}


def child_env() -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def run_runtime(name: str, runtime: str, path: Path, spec: dict, workdir: Path) -> dict:
    folder = workdir / "runs"
    folder.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = folder / f"{name}.spec.json", folder / f"{name}.json"
    out_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps({**spec, "runtime": runtime, "path": str(path), "output": str(out_path)}))
    measured = run_measured(
        name, [sys.executable, Path(__file__).resolve(), "_child", spec_path], folder / f"{name}.log",
        child_env(),
    )  # fmt: skip
    result = json.loads(out_path.read_text()) | measured
    result["prefill_median_s"] = float(np.median(result["prefill_s"]))
    result["decode_median_s"] = float(np.median(result["decode_s"]))
    print(
        f"    prefill {result['prefill_median_s'] * 1e3:.2f} ms (median of {len(result['prefill_s'])}), decode "
        f"{result['decode_median_s'] * 1e3:.3f} ms/token (median of {len(result['decode_s'])}), "
        f"{result['threads_after_load']} threads after load",
        flush=True,
    )
    return result


# --- bytes a decode step reads -----------------------------------------------------------------------------------


def floor_bytes(cfg, itemsize: int) -> dict:
    """The weights one decode step of one token cannot avoid reading, every weight at ``itemsize`` bytes: per layer
    the k selected experts (gate_up [2I, H] + bias 2I, down [H, I] + bias H), attention (q, k, v, o and their
    biases, sinks), the two norms and the router (weight + bias); then the final norm, the unembedding [V, H] and
    one embedding row."""
    h, i, e, k = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts, cfg.num_experts_per_tok
    nq, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    experts = k * (2 * i * h + 2 * i + h * i + h)
    attention = (h * nq * d + nq * d) + 2 * (h * nkv * d + nkv * d) + (nq * d * h + h) + nq
    per_layer = {"experts (k selected)": experts, "attention": attention, "norms": 2 * h, "router": h * e + e}
    parts = {name: n * cfg.num_hidden_layers * itemsize for name, n in per_layer.items()}
    parts |= {"unembedding": cfg.vocab_size * h * itemsize, "final norm + embedding row": 2 * h * itemsize}
    return {"itemsize": itemsize, "parts": parts, "total": sum(parts.values())}


def _tensor_bytes(tensor) -> int:
    from onnx import helper

    return int(np.prod(tensor.dims, dtype=np.int64)) * helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize


def _initializers(graph):
    """Every initializer and Constant value of a graph and of its subgraphs (our decoder's MoE is an If)."""
    import onnx

    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if node.op_type == "Constant" and attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
            elif attr.type == onnx.AttributeProto.GRAPH:
                yield from _initializers(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    yield from _initializers(sub)


def graph_step_bytes(onnx_path: Path, cfg) -> dict:
    """Weight bytes a decode step of one token touches, from the graph (read without its external data): the sum
    of every initializer's size (dims × element size), with the expert tensors (``EXPERT_NAMES``) counted at k/E of
    their size, since the decode path gathers only the selected experts, and the row tables (``ROW_TABLE_NAMES``:
    embedding, RoPE caches) at one row, since a Gather reads one row per token."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    share = cfg.num_experts_per_tok / cfg.num_local_experts
    sums = {"all initializers": 0, "experts": 0, "row tables": 0, "other": 0, "count": 0}
    touched, largest_other = 0.0, []
    for tensor in _initializers(graph):
        size = _tensor_bytes(tensor)
        sums["all initializers"] += size
        sums["count"] += 1
        if EXPERT_NAMES.search(tensor.name):
            sums["experts"] += size
            touched += size * share
        elif ROW_TABLE_NAMES.search(tensor.name) and tensor.dims:
            sums["row tables"] += size
            touched += size / tensor.dims[0]
        else:
            sums["other"] += size
            touched += size
            largest_other.append((size, tensor.name))
    largest_other.sort(reverse=True)
    return sums | {"touched": int(touched), "largest other": [[n, s] for s, n in largest_other[:5]]}


# --- inputs ------------------------------------------------------------------------------------------------------


def prompt_ids(checkpoint: Path, length: int, vocab: int, special: set[int]) -> tuple[list[int], str]:
    """``length`` token ids: a fixed text with the checkpoint's tokenizer, repeated; random ids without one."""
    tokenizer_file = checkpoint / "tokenizer.json"
    if tokenizer_file.is_file():
        from tokenizers import Tokenizer

        ids = [t for t in Tokenizer.from_file(str(tokenizer_file)).encode(PROMPT_TEXT).ids if t not in special]
        if ids:
            return (ids * (length // len(ids) + 1))[:length], "text from tokenizer.json"
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(0, vocab, 4 * length) if int(t) not in special]
    return ids[:length], "random ids (no tokenizer.json)"


def checkpoint_label(checkpoint: Path) -> str:
    """What the checkpoint is: the synthetic preset and seed, the hub repo, else the folder's name."""
    for name, label in (
        ("synth.json", lambda x: f"synthetic {x['preset']} (seed {x.get('seed')})"),
        ("download.json", lambda x: f"{x['repo_id']}@{x.get('commit', x.get('revision'))}"),
    ):
        try:
            return label(json.loads((checkpoint / name).read_text()))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return checkpoint.resolve().name


def layer_count(params: Path) -> tuple[int, str]:
    from gptoss.config import ParamsConfig, params_config_path

    params_cfg = ParamsConfig.read(params_config_path(params))
    return params_cfg.model.num_hidden_layers, params_cfg.weight_format


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


# --- the report --------------------------------------------------------------------------------------------------


def first_difference(a: list[int], b: list[int]) -> int | None:
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def token_line(name: str, tokens: list[int], reference: list[int]) -> str:
    at = first_difference(reference, tokens)
    if at is None:
        return f"{name}: identical ({len(tokens)} tokens)"
    return f"{name}: **differ from step {at}** (builder {reference[at : at + 4]}…, this {tokens[at : at + 4]}…)"


def markdown(r: dict) -> str:
    b, g, o = r["runtime"]["builder_genai"], r["runtime"]["ours_genai"], r["runtime"]["ours_ort"]
    cfg, ratios = r["config"], r["ratios"]
    ms = 1e3

    def build_row(name: str, step: dict | None) -> str:
        if step is None:
            return f"| {name} | given | | |"
        reused = " (reused)" if step.get("reused") else ""
        return f"| {name}{reused} | {step['wall_s']:.1f} | {step['peak_rss_bytes'] / GB:.2f} | {step['cmd']} |"

    def run_row(name: str, x: dict, floor: int) -> str:
        return (
            f"| {name} | {x['prefill_median_s'] * ms:.2f} ({min(x['prefill_s']) * ms:.2f}) | "
            f"{x['decode_median_s'] * ms:.3f} | {1 / x['decode_median_s']:.1f} | {x['peak_rss_bytes'] / GB:.3f} | "
            f"{x['rss_before_load_bytes'] / GB:.3f} | {x['load_s']:.1f} | {floor / x['decode_median_s'] / GB:.2f} |"
        )

    builds = r["builds"]
    steps, runs = r["settings"]["steps"], r["settings"]["runs"]
    fb, fo = r["bytes"]["floor_builder"], r["bytes"]["floor_ours"]
    gb_, go = r["bytes"]["graph_builder"], r["bytes"]["graph_ours"]
    lines = [
        f"## Decoder vs the onnxruntime-genai model builder: {r['checkpoint_name']}, "
        f"{cfg['num_hidden_layers']} layers, ours {r['dtype']}, builder fp32",
        "",
        f"Measured {r['date']} on {r['machine']}, {r['cpu_count']} cores, {r['settings']['threads']} intra-op "
        f"threads for every runtime; onnxruntime {r['versions']['onnxruntime']}, onnxruntime-genai "
        f"{r['versions']['onnxruntime_genai']}. Prompt: {len(r['prompt'])} tokens ({r['prompt_source']}), batch 1. "
        f"Prefill: `append_tokens` of the prompt (ORT: one run with an empty cache), median (min) of {runs} fresh "
        f"generators after a warm-up. Decode: each `generate_next_token` that runs the model (ORT: one run on one "
        f"token + argmax), median of {steps} steps after the prefill. Each runtime in its own process: peak RSS is "
        f"that process's high-water mark (interpreter and imports included; the ORT process imports JAX through "
        f"`gptoss.runtime`).",
        "",
        "| build | wall s | peak RSS GB | command |",
        "|---|---|---|---|",
        build_row("builder `-p fp32 -e cpu`", builds["builder"]),
        build_row("gptoss convert", builds["convert"]),
        build_row("gptoss export --stage decoder", builds["export"]),
        "",
        "| decoder | prefill ms | decode ms/token | tokens/s | peak RSS GB | RSS before load GB | load s | "
        "floor GB/s implied |",
        "|---|---|---|---|---|---|---|---|",
        run_row("builder fp32, genai", b, fb["total"]),
        run_row("ours, genai", g, fo["total"]),
        run_row("ours, ONNX Runtime direct", o, fo["total"]),
        "",
        "| ours/builder (genai) | ratio | target | met |",
        "|---|---|---|---|",
        *(
            f"| {label} | {ratios[key]:.2f} | ≤ {TARGETS[key]} | {'yes' if ratios[key] <= TARGETS[key] else '**no**'} |"
            for key, label in (
                ("prefill_s", "prefill"),
                ("decode_s_per_token", "decode s/token"),
                ("peak_rss_bytes", "peak RSS"),
            )
        ),
        "",
        f"genai's overhead on our graph (genai / ORT direct): prefill {r['genai_overhead']['prefill']:.2f}×, decode "
        f"{r['genai_overhead']['decode']:.2f}×.",
        "",
        f"Greedy tokens against the builder's ({len(b['tokens'])} each, end-of-sequence held off): "
        f"{token_line('ours, genai', g['tokens'], b['tokens'])}; {token_line('ours, ORT', o['tokens'], b['tokens'])}.",
        "",
        "Weight bytes a decode step of one token reads, GB. Floor, from the config: per layer the k selected "
        "experts (gate_up [2I, H] + bias, down [H, I] + bias), attention (q, k, v, o + biases, sinks), 2 norms and "
        "the router; plus the unembedding [V, H], the final norm and one embedding row; every weight at the graph's "
        "element size (ours " + ", ".join(f"{k} {v / GB:.3g}" for k, v in fo["parts"].items()) + "). Graph: every "
        "initializer (and Constant) of the graph and its subgraphs, dims × element size, read without the external "
        "data; the expert tensors counted at k/E (the decode path gathers only the selected experts), the row "
        "tables (embedding; the builder's cos/sin caches) at one row (a Gather), everything else whole. The KV "
        f"cache is not counted (at the last step {r['bytes']['kv_last_step'] / 1e6:.3g} MB). Memory read bandwidth "
        f"measured here: {r['bandwidth_gbs']:.1f} GB/s (best of 5 sums over 1 GiB).",
        "",
        "| bytes per decode step | ours | builder |",
        "|---|---|---|",
        f"| floor (config) | {fo['total'] / GB:.4g} | {fb['total'] / GB:.4g} |",
        f"| graph: all initializers | {go['all initializers'] / GB:.4g} | {gb_['all initializers'] / GB:.4g} |",
        f"| graph: experts, all E (counted × k/E) | {go['experts'] / GB:.4g} | {gb_['experts'] / GB:.4g} |",
        f"| graph: row tables, whole (counted one row) | {go['row tables'] / GB:.4g} | {gb_['row tables'] / GB:.4g} |",
        f"| graph: other (counted whole) | {go['other'] / GB:.4g} | {gb_['other'] / GB:.4g} |",
        f"| **graph: touched** | {go['touched'] / GB:.4g} | {gb_['touched'] / GB:.4g} |",
        f"| touched / floor | {go['touched'] / fo['total']:.3f} | {gb_['touched'] / fb['total']:.3f} |",
        f"| floor ÷ bandwidth, ms/token | {fo['total'] / GB / r['bandwidth_gbs'] * ms:.3g} | "
        f"{fb['total'] / GB / r['bandwidth_gbs'] * ms:.3g} |",
        f"| measured decode, ms/token (genai) | {g['decode_median_s'] * ms:.3g} | {b['decode_median_s'] * ms:.3g} |",
        f"| implied GB/s = floor ÷ s/token | {fo['total'] / GB / g['decode_median_s']:.2f} | "
        f"{fb['total'] / GB / b['decode_median_s']:.2f} |",
        "",
    ]
    return "\n".join(lines)


# --- main --------------------------------------------------------------------------------------------------------


def reused(previous: dict, step: str) -> dict:
    """A step skipped by ``--reuse``: the numbers its last run recorded in ``builds.json`` (NaN if none)."""
    return (previous.get(step) or {"wall_s": float("nan"), "peak_rss_bytes": 0}) | {"reused": True}


def build(args: argparse.Namespace, workdir: Path, cfg, layers: int) -> tuple[dict, Path, Path, str]:
    """The builder's decoder and ours (built, reused or given): build numbers, both folders, our params dtype."""
    builds: dict = {"builder": None, "convert": None, "export": None}
    records = workdir / "builds.json"
    previous = json.loads(records.read_text()) if records.is_file() else {}
    env = child_env()

    builder_dir = workdir / "builder_fp32"
    print("[1/5] the onnxruntime-genai model builder's fp32 CPU decoder", flush=True)
    if args.reuse and (builder_dir / "genai_config.json").is_file():
        builds["builder"] = reused(previous, "builder")
        print(f"    reusing {builder_dir}", flush=True)
    else:
        remove(builder_dir)
        cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", args.checkpoint.resolve(), "-o",
               builder_dir, "-p", "fp32", "-e", "cpu", "-c", workdir / "builder_cache"]  # fmt: skip
        builds["builder"] = run_measured("builder", cmd, workdir / "logs" / "builder.log", env)
        if not (builder_dir / "genai_config.json").is_file():
            raise StepFailed(f"the builder wrote no {builder_dir / 'genai_config.json'}")
    builds["builder"]["cmd"] = "`python -m onnxruntime_genai.models.builder -i CKPT -p fp32 -e cpu`"

    print("[2/5] our params and decoder", flush=True)
    params = args.params or workdir / "ours" / f"flax_params_{layers}layers.msgpack"
    if args.params is None:
        if args.reuse and params.is_file():
            builds["convert"] = reused(previous, "convert")
            print(f"    reusing {params}", flush=True)
        else:
            cmd = [sys.executable, "-m", "gptoss", "convert", "--checkpoint", args.checkpoint.resolve(),
                   "--output", params, "--layers", layers, "--dtype", args.dtype]  # fmt: skip
            builds["convert"] = run_measured("convert", cmd, workdir / "logs" / "convert.log", env)
        builds["convert"]["cmd"] = f"`gptoss convert --dtype {args.dtype}`"
    elif not params.is_file():
        raise StepFailed(f"--params {params}: file not found")
    params_layers, dtype = layer_count(params)
    if params_layers != layers:
        raise StepFailed(
            f"{params} has {params_layers} layers but {args.checkpoint} has {layers}: the builder converts every "
            "layer of the checkpoint, so both decoders must have the same layers"
        )
    if args.params is not None and dtype != args.dtype:
        print(f"    note: {params} holds {dtype} weights (not --dtype {args.dtype})", flush=True)

    decoder_dir = args.decoder or workdir / "ours" / "decoder"
    if args.decoder is None:
        if args.reuse and (decoder_dir / "genai_config.json").is_file():
            builds["export"] = reused(previous, "export")
            print(f"    reusing {decoder_dir}", flush=True)
        else:
            remove(decoder_dir)
            cmd = [sys.executable, "-m", "gptoss", "export", "--stage", "decoder", "--params", params, "--output",
                   decoder_dir / "model.onnx"]  # fmt: skip
            builds["export"] = run_measured("export", cmd, workdir / "logs" / "export.log", env)
        builds["export"]["cmd"] = "`gptoss export --stage decoder`"
    for folder in (builder_dir, decoder_dir):
        if not (folder / "genai_config.json").is_file():
            raise StepFailed(f"{folder}: no genai_config.json (not a decoder folder)")
    fresh = {k: v for k, v in builds.items() if v is not None and not v.get("reused")}
    records.write_text(json.dumps(previous | fresh, indent=1) + "\n")
    return builds, builder_dir, decoder_dir, dtype


def main() -> int:
    if len(sys.argv) == 3 and sys.argv[1] == "_child":
        return child_main(sys.argv[2])
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="HF-layout checkpoint folder (the builder's -i)")
    parser.add_argument("--params", type=Path, default=None, help="our params msgpack (default: convert)")
    parser.add_argument("--decoder", type=Path, default=None, help="our decoder folder (default: export)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="our params' dtype")
    parser.add_argument("--workdir", type=Path, default=None, help="default: results/decoder_vs_builder/<ckpt name>")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every runtime")
    parser.add_argument("--steps", type=int, default=16, help="decode steps measured (median)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5, help="prefill runs (median), after one warm-up")
    parser.add_argument("--output", type=Path, default=None, help="markdown section to write (default: in workdir)")
    parser.add_argument("--json", type=Path, default=None, help="raw numbers (default: in workdir)")
    parser.add_argument("--reuse", action="store_true", help="keep the builder's folder, params, decoder if present")
    args = parser.parse_args()
    for name in ("threads", "steps", "prompt_tokens", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")

    try:
        from gptoss.config import load_checkpoint_config
        from gptoss.errors import GptOssError
    except ImportError as exc:
        print(f"error: cannot import gptoss ({exc}); run with the project's .venv/bin/python", file=sys.stderr)
        return 1
    try:
        import onnxruntime
        import onnxruntime_genai
    except ImportError as exc:
        print(f"error: {exc}; onnxruntime-genai is a dependency of the project", file=sys.stderr)
        return 1
    try:
        return run(args, load_checkpoint_config, onnxruntime.__version__, onnxruntime_genai.__version__)
    except (StepFailed, GptOssError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


def run(args: argparse.Namespace, load_checkpoint_config, ort_version: str, genai_version: str) -> int:
    from gptoss.files import require_free_space

    if not args.checkpoint.is_dir():
        raise StepFailed(f"--checkpoint {args.checkpoint}: not a folder")
    cfg = load_checkpoint_config(args.checkpoint)
    layers = cfg.num_hidden_layers
    workdir = (args.workdir or ROOT / "results" / "decoder_vs_builder" / args.checkpoint.resolve().name).resolve()
    print(
        f"checkpoint {args.checkpoint}: {layers} layers, hidden {cfg.hidden_size}, {cfg.num_local_experts} experts "
        f"(k={cfg.num_experts_per_tok}), vocab {cfg.vocab_size}; workdir {workdir}",
        flush=True,
    )
    size = cfg.param_count()
    item = 4 if args.dtype == "float32" else 2
    needed = 0 if args.reuse else size * 4 + (0 if args.params else size * item) + (0 if args.decoder else size * item)
    replaced = sum(f.stat().st_size for d in ("builder_fp32", "ours") for f in (workdir / d).rglob("*") if f.is_file())
    workdir.mkdir(parents=True, exist_ok=True)
    require_free_space(workdir, int(needed * 1.05) - (0 if args.reuse else replaced), "the builds")

    builds, builder_dir, decoder_dir, dtype = build(args, workdir, cfg, layers)

    ours_config = json.loads((decoder_dir / "genai_config.json").read_text())
    eos = ours_config["model"].get("eos_token_id") or []
    eos = eos if isinstance(eos, list) else [eos]
    special = set(eos) | {ours_config["model"].get("bos_token_id"), ours_config["model"].get("pad_token_id")}
    prompt, source = prompt_ids(args.checkpoint, args.prompt_tokens, cfg.vocab_size, special)
    spec = {"prompt": prompt, "steps": args.steps, "runs": args.runs, "threads": args.threads, "suppress": eos}
    print(f"prompt: {len(prompt)} tokens ({source}): {prompt[:8]}…", flush=True)

    runtime = {}
    print("[3/5] builder's decoder in onnxruntime-genai", flush=True)
    runtime["builder_genai"] = run_runtime("builder_genai", "genai", builder_dir, spec, workdir)
    print("[4/5] our decoder in onnxruntime-genai", flush=True)
    runtime["ours_genai"] = run_runtime("ours_genai", "genai", decoder_dir, spec, workdir)
    print("      our decoder in ONNX Runtime directly", flush=True)
    onnx_file = decoder_dir / ours_config["model"]["decoder"]["filename"]
    runtime["ours_ort"] = run_runtime("ours_ort", "ort", onnx_file, spec, workdir)

    print("[5/5] bytes a decode step reads, memory bandwidth", flush=True)
    builder_file = (
        builder_dir / json.loads((builder_dir / "genai_config.json").read_text())["model"]["decoder"]["filename"]
    )
    kv_last = 2 * layers * cfg.num_key_value_heads * cfg.head_dim * 4 * (len(prompt) + args.steps)
    nbytes = {
        "floor_ours": floor_bytes(cfg, 4 if dtype == "float32" else 2),
        "floor_builder": floor_bytes(cfg, 4),
        "graph_ours": graph_step_bytes(onnx_file, cfg),
        "graph_builder": graph_step_bytes(builder_file, cfg),
        "kv_last_step": kv_last,
    }
    bandwidth = read_bandwidth_gbs()

    b, g, o = runtime["builder_genai"], runtime["ours_genai"], runtime["ours_ort"]
    ratios = {
        "prefill_s": g["prefill_median_s"] / b["prefill_median_s"],
        "decode_s_per_token": g["decode_median_s"] / b["decode_median_s"],
        "peak_rss_bytes": g["peak_rss_bytes"] / b["peak_rss_bytes"],
    }
    report = {
        "checkpoint": str(args.checkpoint.resolve()),
        "checkpoint_name": checkpoint_label(args.checkpoint),
        "config": {k: getattr(cfg, k) for k in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                                "num_local_experts", "num_experts_per_tok", "vocab_size",
                                                "num_attention_heads", "num_key_value_heads", "head_dim")},
        "dtype": dtype,
        "date": str(datetime.date.today()),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "versions": {"onnxruntime": ort_version, "onnxruntime_genai": genai_version},
        "settings": {"threads": args.threads, "steps": args.steps, "runs": args.runs},
        "prompt": prompt,
        "prompt_source": source,
        "builds": builds,
        "runtime": runtime,
        "ratios": ratios,
        "targets": TARGETS,
        "genai_overhead": {
            "prefill": g["prefill_median_s"] / o["prefill_median_s"],
            "decode": g["decode_median_s"] / o["decode_median_s"],
        },
        "tokens_agree": {
            "ours_genai": first_difference(b["tokens"], g["tokens"]) is None,
            "ours_ort": first_difference(b["tokens"], o["tokens"]) is None,
        },
        "bytes": nbytes,
        "bandwidth_gbs": bandwidth,
    }  # fmt: skip
    section = markdown(report)
    output = args.output or workdir / "decoder_vs_builder.md"
    json_path = args.json or workdir / "decoder_vs_builder.json"
    for path in (output, json_path):
        path.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(section)
    json_path.write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + section)
    print(f"wrote {output} and {json_path}")
    if not all(report["tokens_agree"].values()):
        print("warning: the decoders' greedy tokens differ (see the section)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
