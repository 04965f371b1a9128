"""Our KV-cache decoder against the onnxruntime-genai model builder's fp32 decoder of the same checkpoint, side by
side in one run; writes a markdown section and a JSON file of the raw numbers.

    .venv/bin/python benchmarks/decoder_vs_builder.py --checkpoint /tmp/bench/toy/ckpt \\
        --output /tmp/bench/toy/decoder_vs_builder.md --json /tmp/bench/toy/decoder_vs_builder.json

Three peers (``peers.Peer``), each build and each runtime in its own fresh process (``benchmarks/peers.py``: peak
RSS is the kernel's high-water mark of that process alone):

* builder fp32, in onnxruntime-genai: built by ``python -m onnxruntime_genai.models.builder -i CKPT -o
  W/builder_fp32 -p fp32 -e cpu -c W/builder_cache`` (``HF_HUB_OFFLINE=1``);
* ours, in onnxruntime-genai: built by ``gptoss convert`` (unless ``--params``) then ``gptoss export --stage
  decoder`` (unless ``--decoder``);
* ours, straight in ONNX Runtime (``ort_session``, ``ort_step``): what genai adds on our graph.

Builds: wall time, peak RSS, and the sha256 of their inputs and outputs (``--reuse`` keeps a build only if both
match the record). Runtimes, greedy with end-of-sequence held off (genai: ``og.Config`` with
``intra_op_num_threads`` overlaid, ``min_length = max_length``): prefill = the run of the prompt alone (genai
``append_tokens``), median of ``--runs`` fresh sequences after a warm-up; decode = each step that runs the model on
one token, median of ``--steps`` after two warm-up steps; the greedy tokens; load time; peak RSS. Then the ratios
ours/builder against the targets (decode ≤ 1.5×, prefill ≤ 1.2×, peak RSS ≤ 1.2×), and the weight bytes a decode
step reads: the floor from the config, and what each graph's initializers imply (see ``floor_bytes`` and
``graph_step_bytes``), with the implied read rate floor bytes ÷ (s/token).

The 2-layer gpt-oss-20b shapes (2.80 B parameters, 11.2 GB in float32) need about 34 GB of disk in the workdir
besides the 3.3 GB checkpoint (the builder's graph, our float32 params and our decoder, 11.2 GB each), about 12 GB
of memory (the builder: 2.2 min and 11.3 GB peak measured; each runtime process holds its 11 GB of weights;
convert about 6.4 GB), and roughly 10-15 minutes on 2 cores:

    .venv/bin/gptoss synth --preset gpt-oss-20b --layers 2 --seed 0 --output /tmp/bench/20b/ckpt
    .venv/bin/python benchmarks/decoder_vs_builder.py --checkpoint /tmp/bench/20b/ckpt --workdir /tmp/bench/20b/work \\
        --output docs/decoder_vs_builder.md --json /tmp/bench/20b/decoder_vs_builder.json

Run it on a quiet machine: the timings are only as good as the machine is idle (``--reuse`` reruns the
measurements on the builds already done). The toy checkpoint runs in well under a minute; its sub-millisecond
steps measure per-node overhead and fit in the CPU caches, not the bandwidth-bound 20b case.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import peers  # benchmarks/ is on sys.path: this script's own folder
from decoders import (
    builder_peer,
    checkpoint_label,
    convert_step,
    decoder_file,
    export_step,
    first_difference,
    floor_bytes,
    graph_step_bytes,
    measure_genai,
    measure_ort,
    prompt_ids,
    run_checked,
    special_ids,
    token_line,
)
from peers import GB, Peer, PeerError, Request

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"prefill_s": 1.2, "decode_s_per_token": 1.5, "peak_rss_bytes": 1.2}


def our_peer(args: argparse.Namespace, checkpoint: Path, workdir: Path, layers: int) -> tuple[Peer, Path]:
    """Ours in genai, with the builds it needs (convert unless ``--params``, export unless ``--decoder``)."""
    params = args.params or workdir / "ours" / f"flax_params_{layers}layers.msgpack"
    folder = args.decoder or workdir / "ours" / "decoder"
    steps = [convert_step(checkpoint, params, layers, args.weight_format)] if args.params is None else []
    steps += [export_step(params, folder)] if args.decoder is None else []
    return Peer("ours_genai", "ours, genai", folder, measure_genai, builds=tuple(steps)), params


def markdown(r: dict) -> str:
    b, g, o = r["runtime"]["builder_fp32"], r["runtime"]["ours_genai"], r["runtime"]["ours_ort"]
    cfg, ratios, ms, n = r["config"], r["ratios"], 1e3, str(len(r["prompt"]))
    steps, runs = r["settings"]["steps"], r["settings"]["runs"]
    fb, fo = r["bytes"]["floor_builder"], r["bytes"]["floor_ours"]
    gb_, go = r["bytes"]["graph_builder"], r["bytes"]["graph_ours"]

    def build_row(name: str, step: dict | None) -> list:
        if step is None:
            return [name, "given", "", ""]
        reused = " (reused, verified by hash)" if step.get("reused") else ""
        return [name + reused, f"{step['wall_s']:.1f}", f"{step['peak_rss_bytes'] / GB:.2f}", step["label"]]

    def run_row(name: str, x: dict, floor: int) -> list:
        p, d = x["prefill"][n], x["decode"]["median_s"]
        return [name, f"{p['median_s'] * ms:.2f} ({p['min_s'] * ms:.2f})", f"{d * ms:.3f}", f"{1 / d:.1f}",
                f"{x['peak_rss_bytes'] / GB:.3f}", f"{x['rss_before_load_bytes'] / GB:.3f}", f"{x['load_s']:.1f}",
                f"{floor / d / GB:.2f}"]  # fmt: skip

    sides = ((fo, go, g["decode"]["median_s"]), (fb, gb_, b["decode"]["median_s"]))  # floor, graph, s/token

    def bytes_row(name: str, of, spec: str = ".4g") -> list:
        return [name, *(format(of(*side), spec) for side in sides)]

    met = {key: "yes" if ratios[key] <= TARGETS[key] else "**no**" for key in TARGETS}
    labels = {"prefill_s": "prefill", "decode_s_per_token": "decode s/token", "peak_rss_bytes": "peak RSS"}
    bandwidth, overhead = r["bandwidth_gbs"], r["genai_overhead"]
    return peers.section(
        f"Decoder vs the onnxruntime-genai model builder: {r['checkpoint_name']}, {cfg['num_hidden_layers']} "
        f"layers, ours {r['weight_format']}, builder fp32",
        r["settings"]["threads"],
        f"as the intra-op threads of every runtime; onnxruntime {r['versions']['onnxruntime']}, onnxruntime-genai "
        f"{r['versions']['onnxruntime_genai']}. Prompt: {n} tokens ({r['prompt_source']}), batch 1. Prefill: the "
        f"run of the prompt alone (genai `append_tokens`; ORT one run with an empty cache), median (min) of {runs} "
        f"fresh sequences after a warm-up. Decode: each step that runs the model on one token (genai "
        f"`generate_next_token`; ORT one run + argmax), median of {steps} steps after the prefill and "
        f"{peers.DECODE_WARMUP} warm-up steps. Each build and each runtime in its own process: peak RSS is the "
        f"kernel's high-water mark of that process (interpreter and imports included).",
        peers.table(["build", "wall s", "peak RSS GB", "command"], [
            build_row("builder `-p fp32 -e cpu`", r["builds"]["builder_fp32"]),
            build_row("gptoss convert", r["builds"]["convert"]),
            build_row("gptoss export --stage decoder", r["builds"]["export"]),
        ]),
        peers.table(["decoder", "prefill ms", "decode ms/token", "tokens/s", "peak RSS GB", "RSS before load GB",
                     "load s", "floor GB/s implied"], [
            run_row("builder fp32, genai", b, fb["total"]),
            run_row("ours, genai", g, fo["total"]),
            run_row("ours, ONNX Runtime direct", o, fo["total"]),
        ]),
        peers.table(["ours/builder (genai)", "ratio", "target", "met"],
                    [[labels[k], f"{ratios[k]:.2f}", f"≤ {TARGETS[k]}", met[k]] for k in TARGETS]),
        f"genai's overhead on our graph (genai / ORT direct): prefill {overhead['prefill']:.2f}×, decode "
        f"{overhead['decode']:.2f}×.",
        f"Greedy tokens against the builder's ({len(b['tokens'])} each, end-of-sequence held off): "
        f"{token_line('ours, genai', g['tokens'], b['tokens'])}; {token_line('ours, ORT', o['tokens'], b['tokens'])}.",
        "Weight bytes a decode step of one token reads, GB. Floor, from the config: per layer the k selected "
        "experts (gate_up [2I, H] + bias, down [H, I] + bias), attention (q, k, v, o + biases, sinks), 2 norms and "
        "the router; plus the unembedding [V, H], the final norm and one embedding row; every weight at the graph's "
        "element size (ours " + ", ".join(f"{k} {v / GB:.3g}" for k, v in fo["parts"].items()) + "). Graph: every "
        "initializer (and Constant) of the graph and its subgraphs, dims × element size, read without the external "
        "data; the expert tensors counted at k/E (the decode path gathers only the selected experts), the row "
        "tables (embedding; the builder's cos/sin caches) at one row (a Gather), everything else whole. The KV "
        f"cache is not counted (at the last step {r['bytes']['kv_last_step'] / 1e6:.3g} MB). Memory read bandwidth "
        f"measured here: {bandwidth:.1f} GB/s (best of 5 sums over 1 GiB).",
        peers.table(["bytes per decode step", "ours", "builder"], [
            bytes_row("floor (config)", lambda f, x, t: f["total"] / GB),
            *(bytes_row(label, lambda f, x, t, k=k: x[k] / GB) for k, label in (
                ("all initializers", "graph: all initializers"),
                ("experts", "graph: experts, all E (counted × k/E)"),
                ("row tables", "graph: row tables, whole (counted one row)"),
                ("other", "graph: other (counted whole)"),
                ("touched", "**graph: touched**"),
            )),
            bytes_row("touched / floor", lambda f, x, t: x["touched"] / f["total"], ".3f"),
            bytes_row("floor ÷ bandwidth, ms/token", lambda f, x, t: f["total"] / GB / bandwidth * ms, ".3g"),
            bytes_row("measured decode, ms/token (genai)", lambda f, x, t: t * ms, ".3g"),
            bytes_row("implied GB/s = floor ÷ s/token", lambda f, x, t: f["total"] / GB / t, ".2f"),
        ]),
    )  # fmt: skip


# --- main --------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="HF-layout checkpoint folder (the builder's -i)")
    parser.add_argument("--params", type=Path, default=None, help="our params msgpack (default: convert)")
    parser.add_argument("--decoder", type=Path, default=None, help="our decoder folder (default: export)")
    parser.add_argument("--weight-format", default="float32", choices=["float32", "bfloat16"], help="our params")
    parser.add_argument("--workdir", type=Path, default=None, help="default: results/decoder_vs_builder/<ckpt name>")
    parser.add_argument("--threads", type=int, default=2, help="intra-op threads of every runtime")
    parser.add_argument("--steps", type=int, default=16, help="decode steps measured (median)")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5, help="prefill runs (median), after one warm-up")
    parser.add_argument("--output", type=Path, default=None, help="markdown section to write (default: in workdir)")
    parser.add_argument("--json", type=Path, default=None, help="raw numbers (default: in workdir)")
    parser.add_argument(
        "--reuse", action="store_true", help="keep the builder's folder, params, decoder if their recorded sha256 match"
    )
    args = parser.parse_args()
    for name in ("threads", "steps", "prompt_tokens", "runs"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")

    return run_checked(run, args)


def run(args: argparse.Namespace, versions: dict) -> int:
    from gptoss.config import load_checkpoint_config
    from gptoss.files import require_free_space
    from gptoss.model.params import Params

    if not args.checkpoint.is_dir():
        raise PeerError(f"--checkpoint {args.checkpoint}: not a folder")
    checkpoint = args.checkpoint.resolve()
    cfg = load_checkpoint_config(checkpoint)
    layers = cfg.num_hidden_layers
    workdir = (args.workdir or ROOT / "results" / "decoder_vs_builder" / checkpoint.name).resolve()
    print(
        f"checkpoint {args.checkpoint}: {layers} layers, hidden {cfg.hidden_size}, {cfg.num_local_experts} experts "
        f"(k={cfg.num_experts_per_tok}), vocab {cfg.vocab_size}; workdir {workdir}",
        flush=True,
    )
    if args.params is not None and Params.open(args.params).config.model.num_hidden_layers != layers:
        raise PeerError(
            f"{args.params} has not the {layers} layers of {args.checkpoint}: the builder converts every layer of "
            "the checkpoint, so both decoders must have the same layers"
        )
    size, item = cfg.param_count(), 4 if args.weight_format == "float32" else 2
    needed = 0 if args.reuse else size * 4 + (0 if args.params else size * item) + (0 if args.decoder else size * item)
    replaced = sum(f.stat().st_size for d in ("builder_fp32", "ours") for f in (workdir / d).rglob("*") if f.is_file())
    workdir.mkdir(parents=True, exist_ok=True)
    require_free_space(workdir, int(needed * 1.05) - (0 if args.reuse else replaced), "the builds")

    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    builder = builder_peer(checkpoint, workdir)
    ours, params = our_peer(args, checkpoint, workdir, layers)
    builds: dict = {"builder_fp32": None, "convert": None, "export": None}
    print("[1/4] builds: the onnxruntime-genai model builder's fp32 CPU decoder, our params and decoder", flush=True)
    for step in builder.builds + ours.builds:
        builds[step.name] = peers.build(step, workdir / "builds", args.reuse, env)
    weight_format = Params.open(params).config.weight_format
    if args.params is not None and weight_format != args.weight_format:
        print(f"    note: {params} holds {weight_format} weights, not {args.weight_format}", flush=True)
    builder_file, onnx_file = decoder_file(builder.artifact), decoder_file(ours.artifact)
    ort = Peer("ours_ort", "ours, ONNX Runtime direct", onnx_file, measure_ort)

    eos, special = special_ids(ours.artifact)
    prompt, source = prompt_ids(checkpoint, args.prompt_tokens, cfg.vocab_size, special)
    request = Request(prompt, args.steps, args.runs, args.threads, suppress=eos)
    print(f"prompt: {len(prompt)} tokens ({source}): {prompt[:8]}…", flush=True)

    runtime = {}
    for i, peer in enumerate((builder, ours, ort)):
        print(f"[2/4] {peer.label} ({i + 1} of 3)", flush=True)
        runtime[peer.name] = result = peers.measure(peer, request, workdir / "runs", env)
        prefill, decode = result["prefill"][str(len(prompt))], result["decode"]
        print(
            f"    prefill {prefill['median_s'] * 1e3:.2f} ms (median of {len(prefill['samples'])}), decode "
            f"{decode['median_s'] * 1e3:.3f} ms/token (median of {len(decode['samples'])}), "
            f"{result['threads_after_load']} threads after load",
            flush=True,
        )

    print("[3/4] bytes a decode step reads, memory bandwidth", flush=True)
    kv_last = 2 * layers * cfg.num_key_value_heads * cfg.head_dim * 4 * (len(prompt) + args.steps)
    nbytes = {
        "floor_ours": floor_bytes(cfg, 4 if weight_format == "float32" else 2),
        "floor_builder": floor_bytes(cfg, 4),
        "graph_ours": graph_step_bytes(onnx_file, cfg),
        "graph_builder": graph_step_bytes(builder_file, cfg),
        "kv_last_step": kv_last,
    }
    bandwidth = peers.read_bandwidth_gbs()

    print("[4/4] the report", flush=True)
    b, g, o = (runtime[name] for name in ("builder_fp32", "ours_genai", "ours_ort"))
    prefill = {name: x["prefill"][str(len(prompt))]["median_s"] for name, x in runtime.items()}
    decode = {name: x["decode"]["median_s"] for name, x in runtime.items()}
    config_keys = (
        "num_hidden_layers",
        "hidden_size",
        "intermediate_size",
        "num_local_experts",
        "num_experts_per_tok",
        "vocab_size",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
    )
    report = {
        "checkpoint": str(checkpoint),
        "checkpoint_name": checkpoint_label(checkpoint),
        "config": {k: getattr(cfg, k) for k in config_keys},
        "weight_format": weight_format,
        **peers.machine(),
        "versions": versions,
        "settings": {"threads": args.threads, "steps": args.steps, "runs": args.runs},
        "prompt": prompt,
        "prompt_source": source,
        "builds": builds,
        "runtime": runtime,
        "ratios": {
            "prefill_s": prefill["ours_genai"] / prefill["builder_fp32"],
            "decode_s_per_token": decode["ours_genai"] / decode["builder_fp32"],
            "peak_rss_bytes": g["peak_rss_bytes"] / b["peak_rss_bytes"],
        },
        "targets": TARGETS,
        "genai_overhead": {
            "prefill": prefill["ours_genai"] / prefill["ours_ort"],
            "decode": decode["ours_genai"] / decode["ours_ort"],
        },
        "tokens_agree": {
            "ours_genai": first_difference(b["tokens"], g["tokens"]) is None,
            "ours_ort": first_difference(b["tokens"], o["tokens"]) is None,
        },
        "bytes": nbytes,
        "bandwidth_gbs": bandwidth,
    }
    output = args.output or workdir / "decoder_vs_builder.md"
    peers.write_outputs(markdown(report), output, report, args.json or workdir / "decoder_vs_builder.json")
    if not all(report["tokens_agree"].values()):
        print("warning: the decoders' greedy tokens differ (see the section)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
