"""What each step of the workflow needs: resident memory, wall time and threads, from the model's architecture
and how its weights are stored.

The workflow's resource functions (workflow/rules/common.smk) look up a job's checkpoint and call these:
``mem_mb`` is Snakemake's memory budget locally and the job's ``--mem`` on a cluster, ``runtime`` the job's
``-t`` (minutes), threads its ``--cpus-per-task``. A step is one of ``STEPS``: the rule, with parity split by what
it runs (``parity_step``). Pure Python, no JAX: the workflow imports it while it parses the Snakefile.
"""

from __future__ import annotations

import math
from pathlib import Path

from gptoss.config import WEIGHT_FORMAT_NAMES, GptOssConfig, load_checkpoint_config
from gptoss.errors import GptOssError
from gptoss.formats.synth import preset_config
from gptoss.stages import STAGES

# Resident memory per step, in MB, calibrated on docs/performance.md ("The memory model"): fixed + per_params × the
# params' MB + per_embedding × the embedding's MB (the largest tensor; float32 where the step decodes the checkpoint
# through float32) + per_layer × layers. Streaming keeps most steps independent of depth.
MEMORY_MODEL = {
    #                      fixed, per_params, per_embedding, per_layer
    "synth": (800, 0.0, 2.0, 0),  # generating a shard
    "download": (1000, 0.0, 0.0, 0),
    "convert": (800, 0.0, 2.0, 0),  # mxfp4: the experts copied, the rest read as bf16
    "convert_decoded": (800, 0.0, 1.5, 0),  # float32/bfloat16: the experts decoded
    "weights": (300, 0.0, 1.0, 0),  # one tensor at a time
    "export": (500, 0.0, 0.0, 20),  # tracing only: the graph reads the weights file's layout, not its bytes
    "parity": (300, 1.07, 0.0, 0),  # ONNX Runtime's session, the JAX side streamed in its own process
    "parity_float32": (300, 0.8, 0.0, 0),
    "parity_decoder": (1900, 1.0, 0.0, 0),  # + the KV caches and genai, each runtime in turn
    "parity_decoder_float32": (1900, 0.73, 0.0, 0),
    "parity_reference": (1500, 0.0, 0.0, 0),  # + transformers' model in float32: see estimate_mem_mb
    "gate": (300, 0.0, 0.0, 0),
    "promote": (300, 0.0, 0.0, 0),
    "report": (1000, 0.0, 0.0, 0),
    "export_variant": (1000, 0.0, 2.0, 0),  # one quantized tensor at a time (a layer's experts, an unembedding slice)
    "quality": (1900, 2.5, 0.0, 0),  # the exact and the variant decoders' sessions, one chunk's logits of each
    "quality_gate": (300, 0.0, 0.0, 0),
}
# transformers holds the model in float32 whatever the params' format: this many times its float32 bytes.
REFERENCE_FLOAT32_FACTOR = 1.1
# Each further attempt of a job (Snakemake's ``attempt``, 1 for the first) asks for this much more memory.
MEMORY_PER_RETRY = 0.25

# Minutes per step: fixed + per_gb × the GB of weights the step reads or writes + per_layer × layers. Generous on
# purpose (a job that outlives its limit is killed): at least 3 times every per-rule time measured in
# docs/performance.md and workflow/README.md; the fixed part covers a cluster job's start.
RUNTIME_MODEL = {
    #                  fixed, per_gb, per_layer
    "synth": (5, 0.2, 0.0),
    "download": (30, 1.0, 0.0),  # the network's speed; a local rule on a cluster (the submit host runs it)
    "convert": (5, 0.25, 0.0),
    "weights": (5, 0.1, 0.0),
    "export": (5, 0.0, 0.25),  # tracing: by depth, whatever the weights' size
    "parity": (5, 0.5, 0.1),  # forward passes: ONNX Runtime decodes every MXFP4 expert of a layer per prompt
    "parity_decoder": (10, 1.5, 0.25),  # greedy steps by JAX, ONNX Runtime and onnxruntime-genai in turn
    "parity_reference": (15, 2.0, 0.25),  # transformers on the float32 model (not measured beyond the toy)
    "gate": (5, 0.0, 0.0),
    "promote": (5, 0.2, 0.0),  # copying and hashing the weights
    "report": (10, 0.0, 0.0),
    "export_variant": (5, 1.0, 0.25),  # quantizing every weight with NumPy
    "quality": (10, 3.0, 0.25),  # prefills of the evaluation text and greedy steps, on both decoders
    "quality_gate": (5, 0.0, 0.0),
}
# The workflow's steps. parity: the debug and canonical graphs; parity_decoder: generation on the decoder graph;
# parity_reference: transformers on the checkpoint.
STEPS = tuple(RUNTIME_MODEL)
# The weights a step's time scales with, where they are not the params: synth and download write the
# checkpoint (MXFP4 experts, bfloat16 elsewhere); transformers runs the model in float32.
RUNTIME_WEIGHTS = {"synth": "mxfp4", "download": "mxfp4", "parity_reference": "float32"}

# The model-sized steps use several cores once the params reach this size (XLA compilation, ONNX Runtime); a toy
# model gains more from running the stages' branches side by side.
BIG_MODEL_MB = 1000
BIG_MODEL_THREADS = 4


def _check(weight_format: str, step: str, attempt: int) -> None:
    if weight_format not in WEIGHT_FORMAT_NAMES:
        raise GptOssError(f"unknown weight format {weight_format!r}; choose one of {list(WEIGHT_FORMAT_NAMES)}")
    if step not in STEPS:
        raise GptOssError(f"unknown step {step!r}; choose one of {list(STEPS)}")
    if attempt < 1:
        raise GptOssError(f"attempt counts from 1, got {attempt}")


def parity_step(stage: str) -> str:
    """The step of a parity job of ``stage`` (a key of gptoss.stages.STAGES)."""
    if STAGES[stage].decoder:
        return "parity_decoder"
    return "parity" if STAGES[stage].exported else "parity_reference"


def params_mb(cfg: GptOssConfig, weight_format: str) -> float:
    """The params' size in MB (10^6 bytes), stored as ``weight_format``."""
    return cfg.weight_bytes(weight_format) / 1e6


def estimate_mem_mb(cfg: GptOssConfig, weight_format: str, step: str, attempt: int = 1) -> int:
    """Peak resident memory of ``step`` on the model ``cfg`` with its weights stored as ``weight_format``, in MB;
    each attempt after the first asks ``MEMORY_PER_RETRY`` more."""
    _check(weight_format, step, attempt)
    decodes = step == "synth" or (step == "convert" and weight_format != "mxfp4")
    key = step
    if step == "convert" and decodes:
        key = "convert_decoded"
    elif weight_format == "float32" and f"{step}_float32" in MEMORY_MODEL:
        key = f"{step}_float32"
    fixed, per_params, per_embedding, per_layer = MEMORY_MODEL[key]
    embedding_mb = cfg.vocab_size * cfg.hidden_size * (4 if decodes or weight_format == "float32" else 2) / 1e6
    layers = cfg.num_hidden_layers
    estimate = fixed + per_params * params_mb(cfg, weight_format) + per_embedding * embedding_mb + per_layer * layers
    if step == "parity_reference":
        estimate += REFERENCE_FLOAT32_FACTOR * params_mb(cfg, "float32")
    return int(estimate * (1 + MEMORY_PER_RETRY * (attempt - 1)))


def estimate_runtime_min(cfg: GptOssConfig, weight_format: str, step: str, attempt: int = 1) -> int:
    """Wall-time limit of ``step`` in minutes (generous: see RUNTIME_MODEL); attempt N gets N times the first's."""
    _check(weight_format, step, attempt)
    fixed, per_gb, per_layer = RUNTIME_MODEL[step]
    gb = cfg.weight_bytes(RUNTIME_WEIGHTS.get(step, weight_format)) / 1e9
    return math.ceil((fixed + per_gb * gb + per_layer * cfg.num_hidden_layers) * attempt)


def estimate_threads(cfg: GptOssConfig, weight_format: str) -> int:
    """Threads of the model-sized steps (export and parity): 1 for a toy, more once the params are big."""
    return BIG_MODEL_THREADS if params_mb(cfg, weight_format) >= BIG_MODEL_MB else 1


def estimate_config(
    layers: int, checkpoint: Path | None = None, preset: str | None = None, hint: str = ""
) -> GptOssConfig:
    """The converted model's architecture, before anything ran: from the checkpoint's config.json when the folder
    ``checkpoint`` holds one, else from the synthetic ``preset``, else (a Hub repo not downloaded yet) from the
    gpt-oss-120b shapes when ``hint`` (the repo id or the folder) names 120b, and the gpt-oss-20b ones otherwise.
    The first ``layers`` blocks are kept (all of them when the checkpoint has fewer)."""
    if checkpoint is not None and any((checkpoint / sub / "config.json").is_file() for sub in (".", "original")):
        try:
            full = load_checkpoint_config(checkpoint)
            return full.truncated(min(layers, full.num_hidden_layers))
        except GptOssError:
            pass  # the convert job reports a broken checkpoint properly
    if preset is None:
        preset = "gpt-oss-120b" if "120b" in hint.lower() else "gpt-oss-20b"
    return preset_config(preset, layers)


# --- parity in segments ----------------------------------------------------------------------------------------
# A segment's parity job (config `parity_segment_blocks`). ONNX Runtime maps the weights file and runs only the
# segment's pieces; the pages it touches stay resident: in the debug graph every weight of the segment (its taps
# compute every expert) plus a working set that does not grow with the number of experts (measured alike at 32 and
# 128 experts per block); in the canonical graph the head, each block's attention, and the experts its tokens are
# routed to (:func:`routed_fraction`); the embedding only gathers rows. The JAX side, in a process of its own
# before it, streams the segment's pieces from the state the segment before it left, holding one piece at a time:
# SEGMENT_PIECES × that piece's MB. Peak = fixed + the larger of the two sides.
SEGMENT_MEMORY = {
    #                        fixed MB, every expert touched (the debug taps), working set MB
    "parity_segment": (600, False, 0.0),  # canonical
    "parity_segment_debug": (600, True, 1200.0),
}
SEGMENT_EXPORT_MB = 500  # export_segment: tracing only, like the whole graph's export
# The JAX side's MB per stored MB of the piece it holds: the embedding is gathered from, a block's experts are
# decoded a slice at a time, the unembedding is cast to float32 a slice at a time for its matmul.
SEGMENT_PIECES = {"embedding": 0.7, "block": 1.2, "head": 1.15}
SEGMENT_RUNTIME = {
    "parity_segment": (5, 1.0),
    "parity_segment_debug": (5, 1.0),
    "export_segment": (5, 0.0),
    "manifest": (5, 0.1),
}


def piece_mb(cfg: GptOssConfig, weight_format: str) -> tuple[float, float, float]:
    """Stored MB of the embedding, of one block and of the head (final norm and unembedding)."""
    per_weight = 4 if weight_format == "float32" else 2
    embedding = cfg.vocab_size * cfg.hidden_size * per_weight / 1e6
    head = (cfg.vocab_size + 1) * cfg.hidden_size * per_weight / 1e6
    block = (params_mb(cfg, weight_format) - embedding - head) / cfg.num_hidden_layers
    return embedding, block, head


def experts_mb(cfg: GptOssConfig, weight_format: str) -> float:
    """Stored MB of one block's experts."""
    per_weight = {"mxfp4": 17 / 32, "bfloat16": 2, "float32": 4}[weight_format]
    return 3 * cfg.num_local_experts * cfg.hidden_size * cfg.intermediate_size * per_weight / 1e6


def segment_mb(cfg: GptOssConfig, weight_format: str, first: int, last: int) -> float:
    """Stored MB of the pieces of ranks ``first`` to ``last`` (0 the embedding, i + 1 block i, layers + 1 the head)."""
    embedding, block, head = piece_mb(cfg, weight_format)
    return embedding * (first == 0) + block * _blocks(cfg, first, last) + head * (last == cfg.num_hidden_layers + 1)


def _blocks(cfg: GptOssConfig, first: int, last: int) -> int:
    return max(0, min(last, cfg.num_hidden_layers) - max(first, 1) + 1)


def routed_fraction(cfg: GptOssConfig, tokens: int) -> float:
    """The expected fraction of a block's experts that ``tokens`` positions are routed to (each picks
    ``num_experts_per_tok`` of ``num_local_experts``; taken as independent)."""
    return 1 - (1 - cfg.num_experts_per_tok / cfg.num_local_experts) ** tokens


def estimate_segment_mem_mb(
    cfg: GptOssConfig, weight_format: str, step: str, first: int, last: int, attempt: int = 1, tokens: int = 32
) -> int:
    """Peak resident memory in MB of ``step`` (parity_segment, parity_segment_debug, export_segment) for the
    segment of ranks ``first`` to ``last``, whose parity runs ``tokens`` positions (prompts × sequence length);
    each attempt after the first asks ``MEMORY_PER_RETRY`` more."""
    _check(weight_format, "parity", attempt)
    if step == "export_segment":
        estimate = SEGMENT_EXPORT_MB
    else:
        fixed, every_expert, working = SEGMENT_MEMORY[step]
        embedding, block, head = piece_mb(cfg, weight_format)
        blocks, has_head = _blocks(cfg, first, last), last > cfg.num_hidden_layers
        untouched = 0.0 if every_expert else (1 - routed_fraction(cfg, tokens)) * experts_mb(cfg, weight_format)
        onnx_side = blocks * (block - untouched) + head * has_head + working * (blocks > 0)
        pieces = {"embedding": embedding * (first == 0), "block": block * (blocks > 0), "head": head * has_head}
        jax_side = max(SEGMENT_PIECES[name] * mb for name, mb in pieces.items())
        estimate = fixed + max(onnx_side, jax_side)
    return int(estimate * (1 + MEMORY_PER_RETRY * (attempt - 1)))


def estimate_segment_runtime_min(
    cfg: GptOssConfig, weight_format: str, step: str, first: int, last: int, attempt: int = 1
) -> int:
    """Wall-time limit in minutes of ``step`` for the segment of ranks ``first`` to ``last`` (``manifest``: the
    whole graph's tensors); attempt N gets N times the first's."""
    _check(weight_format, "parity", attempt)
    fixed, per_gb = SEGMENT_RUNTIME[step]
    read = 2 * segment_mb(cfg, weight_format, first, last)
    if step == "manifest":
        read = params_mb(cfg, weight_format)
    return math.ceil((fixed + per_gb * read / 1e3) * attempt)
