"""Every peer of our decoder measured side by side in one run on one checkpoint (an HF-layout folder, e.g. written
by ``gptoss synth``); writes a dated markdown section and a JSON file of the raw numbers.

    .venv/bin/python benchmarks/side_by_side.py --checkpoint /tmp/bench/toy/ckpt --workdir /tmp/bench/toy/sbs \\
        --llama-cache /tmp/peers --llama-binding

The peers (``--peers``, default all), each built in this run (or reused, see below) and each measured in fresh
processes of its own (``benchmarks/peers.py``: peak RSS is the kernel's high-water mark of that process alone):

* ``ours_float32``, ``ours_mxfp4``: ours in onnxruntime-genai, built by ``gptoss convert --weight-format F`` into
  ``W/ours_F/params.msgpack`` then ``gptoss export --stage decoder`` into ``W/ours_F/decoder``;
* ``ours_q8``, ``ours_q4``: our quantized variants of the mxfp4 decoder (``gptoss export --stage decoder --variant
  q8|q4`` of ``W/ours_mxfp4/params.msgpack`` into ``W/ours_qN/decoder``: QMoE experts, MatMulNBits dense layers);
* ``builder_fp32``, ``builder_int4``: the onnxruntime-genai model builder's CPU decoders, in onnxruntime-genai
  (``python -m onnxruntime_genai.models.builder -i CKPT -o W/builder_P -p P -e cpu -c W/builder_cache``);
* ``llama_cpp``: llama.cpp, the CPU anchor, from the ``llama-cpp-python==0.3.36`` sdist (it vendors llama.cpp and
  its ``convert_hf_to_gguf.py``). The GGUF is converted from the same checkpoint (``--outtype bf16``: the experts
  stay MXFP4; a tokenizer whose pre-tokenizer llama.cpp does not know, as a synthetic one, is declared ``gpt-4o``,
  as gpt-oss's is). Speed and peak RSS: ``llama-bench -p 32,512 -n STEPS -r RUNS -o json``. Load time, logits and
  greedy tokens: the ``llama_cpp`` Python binding (``Llama(..., logits_all=True)``), an optional extra
  (``--llama-binding`` installs it); without it they are reported as not measured.

And the reference: our exact JAX model (``StreamedModel`` on our params, ``--reference-format``): the last
position's logits of the prompt and its greedy tokens, against which each peer's are compared (max |diff| and
top-1 over the ids every runtime may choose, end-of-sequence ids left out; the greedy tokens' first difference).

The prompt is real text tokenized with the checkpoint's tokenizer (``--prefill``: 32 and 512 tokens). Prefill: the
run of a prompt of each length alone on an empty cache, median of ``--runs`` (genai ``append_tokens``; llama-bench
``pp``). Decode: s/token of the steps after the prefill of the whole prompt (genai: median of ``--steps`` steps
after two warm-up steps; llama-bench: 1 / ``tg`` tokens per second of ``-n STEPS`` tokens, which llama-bench
decodes from an empty cache). With ``--rounds N`` every peer is measured N times, the peers alternating (the order
rotated each round) and the samples pooled. Every ratio in the section comes from this one run.

Builds: wall time, peak RSS and sha256 of inputs and outputs recorded (``peers.build``). The workdir's builds are
reused with ``--reuse`` only if both hashes match the record; the llama.cpp cache's (``--llama-cache``: the sdist,
fetched by ``pip download llama-cpp-python==0.3.36 --no-deps --no-binary :all:`` and checked against its sha256,
its unpacked source, the llama-bench build, the converter's venv, the binding's venv) whenever they match, which is
why no bytecode is written while they run. ``--builds-only`` builds (or verifies) and stops. Measured on 2 busy
cores: llama-bench builds in 10 minutes (592 s; ``cmake -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DBUILD_SHARED_LIBS=OFF
-DCMAKE_BUILD_TYPE=Release``, target llama-bench), the converter's venv (``torch==2.13.0`` CPU, ``transformers<4.58``,
sentencepiece, ``protobuf<5``, the vendored gguf-py) in under a minute (47 s), the binding (``pip install`` of the
sdist with ``CMAKE_ARGS=-DGGML_NATIVE=ON``, its own shared llama.cpp) in 10 minutes (623 s). The cache takes 1.8 GB
of disk: the sdist 77 MB, its source 0.22 GB, the build 0.08 GB, the converter's venv 1.2 GB, the binding's 0.16 GB.

The workdir at the 2-layer gpt-oss-20b shapes (2.80 B parameters, 3.3 GB checkpoint): ours float32 22 GB (params
and decoder, 11.2 GB each), ours mxfp4 6.2 GB (3.1 GB each), builder fp32 11.2 GB, builder int4 3.5 GB, the GGUF
3.1 GB; the JAX reference's params if no ours peer of its format is measured. Memory: builder int4's build peaks at
14.8 GB (170 s), builder fp32's at 11.3 GB, the GGUF conversion at 5.0 GB (25 s), a float32 runtime at about 12 GB.
At 24 layers (20.9 B parameters) the float32 peers need > 80 GB of disk and memory, and the builder holds the
whole model (transformers dequantizes the MXFP4 experts, the graph is written float32 before int4 quantization):
its int4 build, 14.8 GB at 2 layers (5.3 bytes a parameter), would need about 110 GB at 24 layers (an estimate,
not measured). On this 24 GB machine: ``--peers ours_mxfp4 llama_cpp`` at 24 layers; ``builder_int4`` too on a
machine with the memory.

    .venv/bin/gptoss synth --preset gpt-oss-20b --layers 2 --seed 0 --output /tmp/bench/20b2/ckpt
    .venv/bin/python benchmarks/side_by_side.py --checkpoint /tmp/bench/20b2/ckpt --workdir /tmp/bench/20b2/sbs \\
        --llama-cache /tmp/peers --llama-binding --output docs/side_by_side.md --append
    .venv/bin/gptoss synth --preset gpt-oss-20b --seed 0 --output /tmp/bench/20b/ckpt
    .venv/bin/python benchmarks/side_by_side.py --checkpoint /tmp/bench/20b/ckpt --workdir /tmp/bench/20b/sbs \\
        --llama-cache /tmp/peers --llama-binding --peers ours_mxfp4 llama_cpp --output docs/side_by_side.md --append

The toy checkpoint (``gptoss synth --preset toy``) runs every peer in a few minutes once the cache is built; its
sub-millisecond steps measure per-call overhead, not the bandwidth-bound 20b case, and llama-bench's peak RSS has
no Python interpreter in it.

Run it on a quiet machine: the timings are only as good as the machine is idle.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import peers  # benchmarks/ is on sys.path: this script's own folder
from decoders import (
    builder_peer,
    checkpoint_label,
    checkpoint_special_ids,
    convert_step,
    export_step,
    first_difference,
    measure_genai,
    prompt_ids,
    run_checked,
)
from peers import GB, Build, Peer, PeerError, Request

ROOT = Path(__file__).resolve().parent.parent
PEERS = ("ours_float32", "ours_mxfp4", "ours_q8", "ours_q4", "builder_fp32", "builder_int4", "llama_cpp")
VARIANT_PEERS = ("ours_q8", "ours_q4")  # quantized variants of our mxfp4 decoder (gptoss export --variant)
LABELS = {
    "ours_float32": "ours float32, genai",
    "ours_mxfp4": "ours mxfp4, genai",
    "ours_q8": "ours q8 (QMoE int8, MatMulNBits), genai",
    "ours_q4": "ours q4 (QMoE int4, MatMulNBits), genai",
    "builder_fp32": "builder fp32, genai",
    "builder_int4": "builder int4, genai",
    "llama_cpp": "llama.cpp (GGUF bf16, experts MXFP4)",
}
LLAMA_VERSION = "0.3.36"
LLAMA_SDIST = f"llama_cpp_python-{LLAMA_VERSION}.tar.gz"
LLAMA_SDIST_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
LLAMA_CMAKE_FLAGS = ("-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DBUILD_SHARED_LIBS=OFF", "-DCMAKE_BUILD_TYPE=Release")
BINDING_CMAKE_ARGS = "-DGGML_NATIVE=ON"
CONVERTER_PACKAGES = ("torch==2.13.0", "transformers<4.58", "sentencepiece", "protobuf<5")
PRE_TOKENIZER = "gpt-4o"  # real gpt-oss's, for a tokenizer llama.cpp's converter does not recognise

# Run as ``python -c LLAMA_BUILD SDIST CACHE BUILD FLAGS...``: the sdist unpacked into CACHE, llama-bench built in
# BUILD (CMAKE_BUILD_PARALLEL_LEVEL from the environment).
LLAMA_BUILD = """
import shutil, subprocess, sys, tarfile
from pathlib import Path
sdist, cache, build, *flags = sys.argv[1:]
with tarfile.open(sdist) as tar:
    tar.extractall(cache, filter="data")
shutil.rmtree(build, ignore_errors=True)
source = Path(cache) / Path(sdist).name.removesuffix(".tar.gz") / "vendor" / "llama.cpp"
subprocess.run(["cmake", "-S", str(source), "-B", build, *flags], check=True)
subprocess.run(["cmake", "--build", build, "--target", "llama-bench"], check=True)
"""
# Run as ``python -c VENV DEST CMAKE_ARGS PIP_ARGS...``: a venv at DEST, then ``pip install PIP_ARGS`` in it (with
# CMAKE_ARGS in the environment if not empty).
VENV = """
import os, subprocess, sys, venv
dest, cmake_args, *packages = sys.argv[1:]
venv.create(dest, with_pip=True)
env = dict(os.environ, **({"CMAKE_ARGS": cmake_args} if cmake_args else {}))
subprocess.run([os.path.join(dest, "bin", "python"), "-m", "pip", "install", "--no-input", *packages], env=env,
               check=True)
"""
# Run as ``python -c CONVERT LLAMA_CPP_DIR CONVERTER_ARGS...``: llama.cpp's convert_hf_to_gguf.py, with an
# unrecognised BPE pre-tokenizer (the converter raises NotImplementedError) declared as PRE_TOKENIZER.
CONVERT = f"""
import sys
llama_dir, *args = sys.argv[1:]
sys.path.insert(0, llama_dir)
sys.argv = [llama_dir + "/convert_hf_to_gguf.py", *args]
import convert_hf_to_gguf
from conversion.gpt_oss import GptOssModel
recognised = GptOssModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return recognised(self, tokenizer)
    except NotImplementedError:
        print("pre-tokenizer not recognised: declared {PRE_TOKENIZER!r}, as gpt-oss's", flush=True)
        return {PRE_TOKENIZER!r}
GptOssModel.get_vocab_base_pre = get_vocab_base_pre
convert_hf_to_gguf.main()
"""


# --- what runs in the measured processes -------------------------------------------------------------------------


def jax_reference(spec: dict) -> dict:
    """Our exact JAX model on our params (``spec["path"]``): the prompt's last-position logits and its greedy
    tokens (end-of-sequence held off)."""
    from gptoss.model.params import Params
    from gptoss.runtimes.jax_model import StreamedModel, jax_generate

    model = StreamedModel(Params.open(Path(spec["path"])))
    out = jax_generate(model, spec["prompt"], spec["options"]["tokens"], spec["suppress"])
    np.save(spec["logits_file"], np.asarray(out.logits[0][-1], dtype=np.float32))
    return {"tokens": out.tokens, "logits": spec["logits_file"]}


def measure_llama(spec: dict) -> dict:
    """llama.cpp through the ``llama_cpp`` binding (run in the binding's venv): load time, the prompt's
    last-position logits, the greedy tokens (end-of-sequence held off, as our runtimes choose them)."""
    from llama_cpp import Llama

    sys.path.insert(0, str(ROOT))
    from gptoss.runtimes.generation import choose  # numpy only

    prompt, count = spec["prompt"], spec["options"]["tokens"]
    start = time.perf_counter()
    llm = Llama(
        model_path=spec["path"],
        n_ctx=len(prompt) + count + 1,
        n_threads=spec["threads"],
        n_threads_batch=spec["threads"],
        logits_all=True,
        verbose=True,
    )
    load_s = time.perf_counter() - start
    llm.eval(prompt)
    logits = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float32)
    np.save(spec["logits_file"], logits)
    tokens = [choose(logits, spec["suppress"])]
    while len(tokens) < count:
        llm.eval(tokens[-1:])
        tokens.append(choose(llm.scores[llm.n_tokens - 1], spec["suppress"]))
    return {"load_s": load_s, "tokens": tokens, "logits": spec["logits_file"], "n_vocab": llm.n_vocab()}


# --- pure parts (tested in tests/test_side_by_side.py) -----------------------------------------------------------


def llama_bench_numbers(rows: list[dict]) -> dict:
    """llama-bench's JSON (``-o json``) as our measures: ``prefill`` per prompt length (the ``pp`` tests, s per
    run) and ``decode`` (the ``tg`` test, s/token = 1 / tokens per second of each run), as ``peers.summary``."""
    prefill, decode = {}, None
    for row in rows:
        n_prompt, n_gen = int(row["n_prompt"]), int(row["n_gen"])
        if n_prompt and not n_gen:
            prefill[str(n_prompt)] = peers.summary([ns / 1e9 for ns in row["samples_ns"]])
        elif n_gen and not n_prompt:
            decode = peers.summary([1 / ts for ts in row["samples_ts"]])
        else:
            raise PeerError(f"llama-bench row with n_prompt {n_prompt} and n_gen {n_gen}: neither a pp nor a tg test")
    if decode is None or not prefill:
        raise PeerError(f"llama-bench gave no {'tg' if decode is None else 'pp'} test: {rows!r:.300}")
    return {"prefill": prefill, "decode": decode}


def compare_logits(reference: np.ndarray, logits: np.ndarray, leave_out: list[int]) -> dict:
    """One position's logits against the reference's: max |diff| and whether the top-1 ids agree, over the ids both
    have save ``leave_out`` (end-of-sequence ids, which a runtime may have set to -inf to hold them off)."""
    reference, logits = np.asarray(reference, np.float64).ravel(), np.asarray(logits, np.float64).ravel()
    if reference.shape != logits.shape:
        raise PeerError(f"logits of {logits.size} ids against the reference's {reference.size}")
    keep = np.ones(reference.size, bool)
    keep[[i for i in leave_out if 0 <= i < reference.size]] = False
    ids = np.flatnonzero(keep)
    top, ref_top = int(ids[logits[keep].argmax()]), int(ids[reference[keep].argmax()])
    diff = float(np.abs(logits[keep] - reference[keep]).max())
    return {"max_abs_diff": diff, "top1": top, "reference_top1": ref_top, "top1_agree": top == ref_top}


def ratios(runtime: dict, anchor: str, lengths: list[str]) -> dict:
    """Each peer's numbers over the anchor's (prefill per length, decode s/token, peak RSS), None where either
    side has none."""

    def numbers(x: dict) -> dict:
        out = {f"prefill_{n}": x.get("prefill", {}).get(n, {}).get("median_s") for n in lengths}
        return out | {"decode": x.get("decode", {}).get("median_s"), "peak_rss": x.get("peak_rss_bytes")}

    base = numbers(runtime[anchor])
    return {
        name: {k: (v / base[k] if v is not None and base[k] else None) for k, v in numbers(x).items()}
        for name, x in runtime.items()
    }


# --- llama.cpp: the cache, the GGUF, the measurements ------------------------------------------------------------


class LlamaCpp:
    """llama.cpp from the sdist in ``cache``: its verified builds, the GGUF of a checkpoint, its measurements."""

    def __init__(self, cache: Path, env: dict) -> None:
        self.cache, self.env, self.records = cache, env, cache / "records"
        self.sdist = cache / LLAMA_SDIST
        self.source = cache / LLAMA_SDIST.removesuffix(".tar.gz")
        self.llama_dir = self.source / "vendor" / "llama.cpp"
        self.build_dir = cache / "llama.cpp-build"
        self.bench = self.build_dir / "bin" / "llama-bench"
        self.converter = cache / "converter-venv"
        self.binding = cache / "binding-venv"
        self.builds: dict = {}

    def steps(self) -> dict[str, Build]:
        py = sys.executable
        return {
            "llama_bench": Build("llama_bench", (py, "-c", LLAMA_BUILD, self.sdist, self.cache, self.build_dir,
                                                 *LLAMA_CMAKE_FLAGS), (self.sdist,), (self.source, self.bench),
                                 "`cmake " + " ".join(LLAMA_CMAKE_FLAGS) + "`, target llama-bench"),
            "converter_venv": Build("converter_venv", (py, "-c", VENV, self.converter, "", *CONVERTER_PACKAGES,
                                                       self.llama_dir / "gguf-py"), (self.llama_dir / "gguf-py",),
                                    (self.converter,), "venv: " + ", ".join(CONVERTER_PACKAGES) + ", gguf-py"),
            "binding_venv": Build("binding_venv", (py, "-c", VENV, self.binding, BINDING_CMAKE_ARGS, "--no-cache-dir",
                                                   self.sdist), (self.sdist,), (self.binding,),
                                  f"venv: `pip install {LLAMA_SDIST}` with CMAKE_ARGS={BINDING_CMAKE_ARGS}"),
        }  # fmt: skip

    def fetch(self) -> None:
        """The sdist into the cache (``pip download``) unless there, checked against its known sha256."""
        if not self.sdist.is_file():
            print(f"  downloading {LLAMA_SDIST} into {self.cache}", flush=True)
            cmd = (sys.executable, "-m", "pip", "download", f"llama-cpp-python=={LLAMA_VERSION}", "--no-deps",
                   "--no-binary", ":all:", "-d", self.cache)  # fmt: skip
            peers.run_command(cmd, self.records / "download.log", self.env)
        digest = hashlib.sha256(self.sdist.read_bytes()).hexdigest()
        if digest != LLAMA_SDIST_SHA256:
            raise PeerError(f"{self.sdist}: sha256 {digest}, not {LLAMA_SDIST_SHA256}; remove it to fetch it again")

    def prepare(self, install_binding: bool) -> None:
        """The verified builds: llama-bench, the converter's venv, and the binding's venv if ``install_binding``
        or already built (else ``self.binding_python`` is None)."""
        self.fetch()
        steps = self.steps()
        for name in ("llama_bench", "converter_venv"):
            self.builds[name] = peers.build(steps[name], self.records, reuse=True, env=self.env)
        if install_binding:
            self.builds["binding_venv"] = peers.build(steps["binding_venv"], self.records, reuse=True, env=self.env)
        else:
            self.builds["binding_venv"] = peers.verified(steps["binding_venv"], self.records)
        self.binding_python = str(self.binding / "bin" / "python") if self.builds["binding_venv"] else None

    def gguf_step(self, checkpoint: Path, gguf: Path) -> Build:
        cmd = (self.converter / "bin" / "python", "-c", CONVERT, self.llama_dir, checkpoint, "--outfile", gguf,
               "--outtype", "bf16")  # fmt: skip
        inputs = (checkpoint, *(self.llama_dir / p for p in ("convert_hf_to_gguf.py", "conversion", "gguf-py")))
        return Build("gguf", cmd, inputs, (gguf,), "`convert_hf_to_gguf.py CKPT --outtype bf16`")

    def measure(self, gguf: Path, request: Request, tokens: int, folder: Path) -> dict:
        """llama-bench's prefill and decode (peak RSS and wall of its process), then, with the binding, load
        time, logits and greedy tokens in a process of their own (under ``binding``)."""
        lengths = ",".join(map(str, request.prefill_lengths))
        cmd = (self.bench, "-m", gguf, "-t", request.threads, "-p", lengths, "-n", request.steps, "-r", request.runs,
               "-o", "json")  # fmt: skip
        folder.mkdir(parents=True, exist_ok=True)
        out = folder / "llama_bench.json"
        result = peers.run_command(cmd, folder / "llama_bench.log", self.env, output=out)
        try:
            rows = json.loads(out.read_text())
        except ValueError as exc:
            log = peers.tail(folder / "llama_bench.log")
            raise PeerError(f"llama-bench wrote no JSON to {out} ({exc})" + log) from None
        result |= llama_bench_numbers(rows)
        result["build"] = {k: rows[0].get(k) for k in ("build_commit", "build_number", "cpu_info", "model_size")}
        if self.binding_python is None:
            return result
        binding = Peer("llama_cpp_binding", "llama.cpp binding", gguf, measure_llama, options={"tokens": tokens},
                       measures=("load", "tokens", "logits"), python=self.binding_python)  # fmt: skip
        measured = peers.measure(binding, request, folder, self.env)
        return result | {k: measured[k] for k in ("load_s", "tokens", "logits")} | {"binding": measured}


# --- the run -----------------------------------------------------------------------------------------------------


def estimated_bytes(cfg, names: list[str], reference_format: str, workdir: Path) -> dict[str, int]:
    """Disk each peer's builds will add (the reference's params under ``reference``, if no ours peer makes them):
    what they write less what their folder in ``workdir`` holds already (replaced or reused)."""
    sizes = {
        "ours_float32": 2 * cfg.weight_bytes("float32"),
        "ours_mxfp4": 2 * cfg.weight_bytes("mxfp4"),
        "ours_q8": int(1.25 * cfg.param_count()),
        "ours_q4": int(0.75 * cfg.param_count()),
        "builder_fp32": 4 * cfg.param_count(),
        "builder_int4": int(1.5 * cfg.param_count()),
        "llama_cpp": cfg.weight_bytes("mxfp4"),
    }
    folders = {name: name for name in names}
    if f"ours_{reference_format}" not in names:
        sizes["reference"], folders["reference"] = cfg.weight_bytes(reference_format), f"ours_{reference_format}"
    present = {name: sum(f.stat().st_size for f in (workdir / folder).rglob("*") if f.is_file())
               for name, folder in folders.items()}  # fmt: skip
    return {name: max(0, sizes[name] - present[name]) for name in folders}


def run(args: argparse.Namespace, versions: dict) -> int:
    from gptoss.config import load_checkpoint_config
    from gptoss.files import require_free_space

    if not args.checkpoint.is_dir():
        raise PeerError(f"--checkpoint {args.checkpoint}: not a folder")
    checkpoint = args.checkpoint.resolve()
    cfg = load_checkpoint_config(checkpoint)
    layers, names = cfg.num_hidden_layers, [n for n in PEERS if n in args.peers]
    workdir = (args.workdir or ROOT / "results" / "side_by_side" / checkpoint.name).resolve()
    reference_format = args.reference_format or ("float32" if "ours_float32" in names else "mxfp4")
    print(
        f"checkpoint {args.checkpoint}: {layers} layers, hidden {cfg.hidden_size}, {cfg.num_local_experts} experts "
        f"(k={cfg.num_experts_per_tok}), vocab {cfg.vocab_size}; peers {', '.join(names)}; workdir {workdir}",
        flush=True,
    )
    env = dict(os.environ, JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    # No bytecode written into the verified trees (the llama.cpp source, the venvs): their hashes stay as built.
    env |= {"PYTHONDONTWRITEBYTECODE": "1", "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 1)}
    workdir.mkdir(parents=True, exist_ok=True)
    estimate = estimated_bytes(cfg, names, reference_format, workdir)
    require_free_space(workdir, int(sum(estimate.values()) * 1.05), "the builds (" + ", ".join(estimate) + ")")

    print("[1/4] builds", flush=True)
    builds: dict = {}
    params = {fmt: workdir / f"ours_{fmt}" / "params.msgpack" for fmt in ("float32", "mxfp4")}
    runtime_peers: list[Peer] = []
    variants = [name for name in VARIANT_PEERS if name in names]
    for fmt in ("float32", "mxfp4"):
        if f"ours_{fmt}" in names or fmt == reference_format or (fmt == "mxfp4" and variants):
            step = convert_step(checkpoint, params[fmt], layers, fmt, name=f"convert_{fmt}")
            builds[step.name] = peers.build(step, workdir / "builds", args.reuse, env)
        if f"ours_{fmt}" in names:
            step = export_step(params[fmt], workdir / f"ours_{fmt}" / "decoder", name=f"export_{fmt}")
            builds[step.name] = peers.build(step, workdir / "builds", args.reuse, env)
            peer = Peer(f"ours_{fmt}", LABELS[f"ours_{fmt}"], step.outputs[0], measure_genai, measures=peers.MEASURES)
            runtime_peers.append(peer)
    for name in variants:
        quantized = name.removeprefix("ours_")
        step = export_step(params["mxfp4"], workdir / name / "decoder", name=f"export_{name}", variant=quantized)
        builds[step.name] = peers.build(step, workdir / "builds", args.reuse, env)
        runtime_peers.append(Peer(name, LABELS[name], step.outputs[0], measure_genai, measures=peers.MEASURES))
    for precision in ("fp32", "int4"):
        if f"builder_{precision}" in names:
            peer = builder_peer(checkpoint, workdir, precision)
            builds[peer.name] = peers.build(peer.builds[0], workdir / "builds", args.reuse, env)
            runtime_peers.append(dataclasses.replace(peer, label=LABELS[peer.name], measures=peers.MEASURES))
    llama = None
    if "llama_cpp" in names:
        cache = args.llama_cache.resolve()
        cache.mkdir(parents=True, exist_ok=True)
        require_free_space(cache, int(2.5e9), "the llama.cpp cache (source, build, venvs) if built")
        llama = LlamaCpp(cache, env)
        llama.prepare(args.llama_binding)
        builds |= {name: record for name, record in llama.builds.items() if record}
        gguf = workdir / "llama_cpp" / "model.gguf"
        gguf.parent.mkdir(parents=True, exist_ok=True)
        builds["gguf"] = peers.build(llama.gguf_step(checkpoint, gguf), workdir / "builds", args.reuse, env)
    for name in builds:
        builds[name].setdefault("label", name)
    if args.builds_only:
        print(f"built: {', '.join(builds)} (--builds-only: nothing measured)", flush=True)
        return 0

    eos, special = checkpoint_special_ids(checkpoint)
    prompt, source = prompt_ids(checkpoint, max(args.prefill), cfg.vocab_size, special)
    request = Request(prompt, args.steps, args.runs, args.threads, suppress=eos, prefill_lengths=tuple(args.prefill))
    print(f"prompt: {len(prompt)} tokens ({source}): {prompt[:8]}…; end-of-sequence ids {eos}", flush=True)

    print(f"[2/4] the reference: our JAX model on {params[reference_format].name} ({reference_format})", flush=True)
    reference_peer = Peer("jax_reference", "JAX", params[reference_format], jax_reference,
                          measures=("tokens", "logits"), options={"tokens": args.tokens})  # fmt: skip
    reference = peers.measure(reference_peer, request, workdir / "runs", env)
    reference_logits = np.load(reference["logits"])

    rounds: dict[str, list[dict]] = {name: [] for name in names}
    order = [p.name for p in runtime_peers] + (["llama_cpp"] if llama else [])
    by_name = {p.name: p for p in runtime_peers}
    for r in range(args.rounds):
        turn = order[r % len(order) :] + order[: r % len(order)]
        for i, name in enumerate(turn):
            print(f"[3/4] round {r + 1} of {args.rounds}, {LABELS[name]} ({i + 1} of {len(turn)})", flush=True)
            folder = workdir / "runs" / f"round{r + 1}"
            if name == "llama_cpp":
                result = llama.measure(gguf, request, args.tokens, folder)
            else:
                result = peers.measure(by_name[name], request, folder, env)
            if "logits" in result:
                result["vs_reference"] = compare_logits(reference_logits, np.load(result["logits"]), eos)
            rounds[name].append(result)
            decode = result["decode"]["median_s"]
            prefill = ", ".join(f"{n}: {x['median_s'] * 1e3:.2f} ms" for n, x in result["prefill"].items())
            print(f"    prefill {prefill}; decode {decode * 1e3:.3f} ms/token", flush=True)

    print("[4/4] the report", flush=True)
    runtime = {name: peers.pool(rounds[name]) for name in names}
    lengths = [str(n) for n in args.prefill]
    anchor = "llama_cpp" if "llama_cpp" in names else names[0]
    tokens = reference["tokens"]
    agreement = {
        name: {
            "logits": x.get("vs_reference"),
            "first_token_difference": first_difference(tokens, x["tokens"][: len(tokens)]) if "tokens" in x else None,
            "tokens_measured": "tokens" in x,
        }
        for name, x in runtime.items()
    }
    report = {
        "checkpoint": str(checkpoint),
        "checkpoint_name": checkpoint_label(checkpoint),
        "layers": layers,
        **peers.machine(),
        "versions": versions | {"jax": importlib.metadata.version("jax"), "llama_cpp_python_sdist": LLAMA_VERSION},
        "settings": {k: getattr(args, k) for k in ("threads", "steps", "runs", "rounds", "tokens", "prefill")}
        | {"peers": names},
        "prompt": prompt,
        "prompt_source": source,
        "eos": eos,
        "builds": builds,
        "reference": reference | {"format": reference_format, "params": str(params[reference_format])},
        "runtime": runtime,
        "anchor": anchor,
        "ratios": ratios(runtime, anchor, lengths),
        "bandwidth_gbs": peers.read_bandwidth_gbs(),
        "agreement": agreement,
        "llama_binding": llama is not None and llama.binding_python is not None,
    }
    output = args.output or workdir / "side_by_side.md"
    peers.write_outputs(markdown(report), output, report, args.json or workdir / "side_by_side.json", args.append)
    if llama is not None and llama.binding_python is None:
        print(
            f"note: llama.cpp's load time, logits and greedy tokens were not measured: the llama-cpp-python binding "
            f"is not installed in {llama.binding} (--llama-binding installs it, about 10 minutes on 2 cores)",
            file=sys.stderr,
        )
    return 0


# --- the section -------------------------------------------------------------------------------------------------


def markdown(r: dict) -> str:
    ms, lengths, names = 1e3, [str(n) for n in r["settings"]["prefill"]], r["settings"]["peers"]
    runtime, agreement, anchor = r["runtime"], r["agreement"], r["anchor"]
    absent = "not measured"

    def build_row(name: str, step: dict) -> list:
        reused = " (reused, verified by hash)" if step.get("reused") else ""
        return [name + reused, f"{step['wall_s']:.1f}", f"{step['peak_rss_bytes'] / GB:.2f}", step["label"]]

    def run_row(name: str) -> list:
        x = runtime[name]
        prefill = [f"{x['prefill'][n]['median_s'] * ms:.2f}" for n in lengths]
        d = x["decode"]["median_s"]
        load = f"{x['load_s']:.2f}" if "load_s" in x else absent
        return [LABELS[name], *prefill, f"{d * ms:.3f}", f"{1 / d:.1f}", f"{x['peak_rss_bytes'] / GB:.3f}", load]

    def agree_row(name: str) -> list:
        a, x = agreement[name], runtime[name]
        if a["logits"] is None:
            logits = [absent, absent]
        else:
            top = "yes" if a["logits"]["top1_agree"] else f"**no** ({a['logits']['top1']})"
            logits = [f"{a['logits']['max_abs_diff']:.3g}", top]
        if not a["tokens_measured"]:
            tokens = absent
        elif a["first_token_difference"] is None:
            tokens = f"identical ({len(r['reference']['tokens'])})"
        else:
            tokens = f"**differ from step {a['first_token_difference']}**"
        return [LABELS[name], *logits, tokens, "yes" if x.get("tokens_stable", True) else "**no**"]

    def ratio_row(name: str) -> list:
        q = r["ratios"][name]
        keys = [f"prefill_{n}" for n in lengths] + ["decode", "peak_rss"]
        return [LABELS[name], *(f"{q[k]:.2f}" if q[k] is not None else absent for k in keys)]

    notes = []
    if "llama_cpp" in names:
        bench = runtime["llama_cpp"]["build"]
        notes.append(
            f"llama.cpp {bench['build_commit']} (build {bench['build_number']}, from llama-cpp-python "
            f"{r['versions']['llama_cpp_python_sdist']}): prefill and decode from `llama-bench -p "
            f"{','.join(lengths)} -n {r['settings']['steps']} -r {r['settings']['runs']}` (its `tg` decodes from "
            f"an empty cache; s/token = 1 / tokens per second), peak RSS that process's (C++, no interpreter); "
            + (
                "load time, logits and greedy tokens from the `llama_cpp` binding (`Llama(logits_all=True)`), a "
                "process of its own."
                if r["llama_binding"]
                else "load time, logits and greedy tokens **not measured**: the `llama_cpp` binding is not "
                "installed (`--llama-binding` installs it)."
            )
        )
    ref = r["reference"]
    bandwidth = ""
    if "bandwidth_gbs" in r:
        gbs = r["bandwidth_gbs"]
        bandwidth = f"Memory read bandwidth measured after the run: {gbs:.1f} GB/s (best of 5 sums over 1 GiB)."
    return peers.section(
        f"Side by side: {r['checkpoint_name']}, {r['layers']} layers",
        r["settings"]["threads"],
        f"as the threads of every runtime; onnxruntime {r['versions']['onnxruntime']}, onnxruntime-genai "
        f"{r['versions']['onnxruntime_genai']}, jax {r['versions']['jax']}. Prompt: {max(map(int, lengths))} tokens "
        f"({r['prompt_source']}), its first {', '.join(lengths)} for the prefills, batch 1. Prefill: the run of the "
        f"prompt alone on an empty cache, median of {r['settings']['runs']} runs (genai `append_tokens` after a "
        f"warm-up). Decode: s/token, median (genai: {r['settings']['steps']} steps after the prefill of the whole "
        f"prompt and {peers.DECODE_WARMUP} warm-up steps). {r['settings']['rounds']} round(s), the peers "
        f"alternating, each measurement a fresh process: peak RSS is the kernel's high-water mark of that process. "
        + bandwidth,
        peers.table(["build", "wall s", "peak RSS GB", "command"], [build_row(k, v) for k, v in r["builds"].items()]),
        peers.table(
            ["peer", *(f"prefill {n} ms" for n in lengths), "decode ms/token", "tokens/s", "peak RSS GB", "load s"],
            [run_row(name) for name in names],
        ),
        *notes,
        f"Against our exact JAX model ({ref['format']} params, `StreamedModel`; {ref['wall_s']:.1f} s, peak RSS "
        f"{ref['peak_rss_bytes'] / GB:.2f} GB): the last prompt position's logits (end-of-sequence ids {r['eos']} "
        f"left out) and the first {len(ref['tokens'])} greedy tokens (end-of-sequence held off).",
        peers.table(
            ["peer", "logits max abs diff", "top-1 agrees", "greedy tokens vs JAX", "same tokens every round"],
            [agree_row(name) for name in names],
        ),
        f"Ratios over {LABELS[anchor]}, from this run:",
        peers.table(
            ["peer", *(f"prefill {n}" for n in lengths), "decode s/token", "peak RSS"], [ratio_row(n) for n in names]
        ),
    )


# --- main --------------------------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="HF-layout checkpoint folder")
    parser.add_argument("--peers", nargs="+", choices=PEERS, default=list(PEERS), help="default: all")
    parser.add_argument("--workdir", type=Path, default=None, help="default: results/side_by_side/<ckpt name>")
    parser.add_argument("--llama-cache", type=Path, default=ROOT / "results" / "peers", help="llama.cpp's builds")
    parser.add_argument("--llama-binding", action="store_true", help="install llama-cpp-python if not there (~10 min)")
    parser.add_argument(
        "--reference-format", choices=["float32", "mxfp4"], default=None,
        help="params of the JAX reference (default: float32 if ours_float32 is measured, else mxfp4)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="threads of every runtime")
    parser.add_argument("--prefill", type=int, nargs="+", default=[32, 512], help="prompt lengths to prefill")
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed (llama-bench -n)")
    parser.add_argument("--tokens", type=int, default=16, help="greedy tokens compared with the reference's")
    parser.add_argument("--runs", type=int, default=5, help="prefill runs (median)")
    parser.add_argument("--rounds", type=int, default=1, help="measurements of every peer, alternating")
    parser.add_argument("--output", type=Path, default=None, help="markdown section (default: in workdir)")
    parser.add_argument("--append", action="store_true", help="append the section to --output")
    parser.add_argument("--json", type=Path, default=None, help="raw numbers (default: in workdir)")
    parser.add_argument("--reuse", action="store_true", help="keep the workdir's builds whose recorded sha256 match")
    parser.add_argument("--builds-only", action="store_true", help="build (or verify) what the peers need, then stop")
    args = parser.parse_args()
    for name in ("threads", "steps", "tokens", "runs", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if min(args.prefill) < 1:
        parser.error("--prefill lengths must be at least 1")
    if args.tokens > 1 + peers.DECODE_WARMUP + args.steps:
        parser.error(f"--tokens at most 1 + {peers.DECODE_WARMUP} + --steps (the tokens a genai peer chooses)")
    args.prefill = sorted(set(args.prefill))

    return run_checked(run, args)


if __name__ == "__main__":
    sys.exit(main())
