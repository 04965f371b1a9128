"""What the decoder comparisons share: the peers' adapters for a decoder folder in onnxruntime-genai and for our
decoder graph straight in ONNX Runtime (``peers.Decoder``; ``measure_genai``, ``measure_ort`` run in each peer's
process), the builds of the decoders (ours: convert, export; the onnxruntime-genai model builder's), the prompt,
the checkpoint's label, the weight bytes a decode step reads, and greedy tokens compared."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import peers  # benchmarks/ is on sys.path: the folder of the script that runs
from peers import Build, Peer, PeerError

# A fixed text, tokenized with the checkpoint's tokenizer and repeated up to the prompt length.
PROMPT_TEXT = (
    "The quick brown fox jumps over the lazy dog. def forward(self, x): return x @ self.kernel + self.bias. "
    "Large language models predict the next token from the ones before it, one step at a time. "
)
# Initializers a decode step reads only in part (names of both graphs): the experts (k of E per layer, chosen by
# the router) and the tables one row of which is gathered per token (embedding; the builder's RoPE caches).
EXPERT_NAMES = re.compile(r"(\.experts\.|\.mlp\.(gate_up|down)_(kernel|bias)$)")
ROW_TABLE_NAMES = re.compile(r"(^|\.)(embed\.embedding|embed_tokens\.weight)$|^(cos|sin)_cache$")

# --- the adapters: what runs in each peer's process --------------------------------------------------------------


class GenaiDecoder(peers.Decoder):
    """A decoder folder in onnxruntime-genai's ``Generator``."""

    def load(self, spec: dict) -> None:
        import onnxruntime_genai as og

        self.og = og
        # The builder's GroupQueryAttention wants a KV buffer of at least its sliding window (128 at 20b).
        decoder = json.loads((Path(spec["path"]) / "genai_config.json").read_text())["model"]["decoder"]
        window = decoder.get("sliding_window", {}).get("window_size", 0)
        length = max(len(spec["prompt"]) + peers.DECODE_WARMUP + spec["steps"] + 1, window + 1)
        config = og.Config(spec["path"])
        # onnxruntime-genai reads the decoder's session options from genai_config.json; overlay the thread count.
        options = {"intra_op_num_threads": spec["threads"]}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.model = og.Model(config)
        self.params = og.GeneratorParams(self.model)
        self.params.set_search_options(do_sample=False, max_length=length, min_length=length)
        self.generator = None

    def prefill(self, ids: list[int]) -> float:
        self.generator, self.prompt_length = None, len(ids)
        self.generator = self.og.Generator(self.model, self.params)
        start = time.perf_counter()
        self.generator.append_tokens(np.asarray(ids, dtype=np.int32))
        seconds = time.perf_counter() - start
        self.generator.generate_next_token()  # picks from the prefill's logits: no model run
        return seconds

    def step(self) -> None:
        self.generator.generate_next_token()

    def tokens(self) -> list[int]:
        return [int(t) for t in self.generator.get_sequence(0)[self.prompt_length :]]

    def logits(self) -> np.ndarray:
        logits = np.asarray(self.generator.get_output("logits"), dtype=np.float32)  # [1, positions kept, vocab]
        return logits.reshape(-1, logits.shape[-1])[-1]


class OrtDecoder(peers.Decoder):
    """Our decoder graph straight in ONNX Runtime: ``present.*`` fed back as ``past_key_values.*``."""

    def load(self, spec: dict) -> None:
        from gptoss.runtimes.onnx_runtime import ort_session

        self.session, self.suppress = ort_session(Path(spec["path"]), spec["threads"]), spec["suppress"]

    def run(self, ids: list[int], past: dict) -> float:
        from gptoss.runtimes.generation import choose
        from gptoss.runtimes.onnx_runtime import ort_step

        ids_array = np.asarray([ids], np.int64)
        mask = np.ones((1, next(iter(past.values())).shape[2] + len(ids)), np.int64)
        start = time.perf_counter()
        logits, self.past = ort_step(self.session, ids_array, mask, past)
        seconds = time.perf_counter() - start
        self.last_logits = logits[0, -1]
        self.chosen.append(choose(self.last_logits, self.suppress))
        return seconds

    def prefill(self, ids: list[int]) -> float:
        from gptoss.runtimes.onnx_runtime import empty_past

        self.chosen = []
        return self.run(ids, empty_past(self.session, 1))

    def step(self) -> None:
        self.run(self.chosen[-1:], self.past)

    def tokens(self) -> list[int]:
        return list(self.chosen)

    def logits(self) -> np.ndarray:
        return self.last_logits


def measure_genai(spec: dict) -> dict:
    return peers.measure_decoder(GenaiDecoder(), spec)


def measure_ort(spec: dict) -> dict:
    return peers.measure_decoder(OrtDecoder(), spec)


# --- the scripts' main ---------------------------------------------------------------------------------------


def run_checked(run: Callable[[argparse.Namespace, dict], int], args: argparse.Namespace) -> int:
    """``run(args, versions)`` (versions: onnxruntime's and onnxruntime-genai's), or exit status 1 with a one-line
    error if gptoss or onnxruntime-genai cannot be imported or ``run`` raises ``PeerError`` or ``GptOssError``."""
    try:
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
    versions = {"onnxruntime": onnxruntime.__version__, "onnxruntime_genai": onnxruntime_genai.__version__}
    try:
        return run(args, versions)
    except (PeerError, GptOssError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


# --- the builds -------------------------------------------------------------------------------------------------


def builder_peer(checkpoint: Path, workdir: Path, precision: str = "fp32") -> Peer:
    """The onnxruntime-genai model builder's CPU decoder of ``checkpoint`` at ``precision`` (fp32, int4) in genai,
    named ``builder_<precision>``, with its build (into ``workdir/builder_<precision>``, cache
    ``workdir/builder_cache``; ``HF_HUB_OFFLINE=1`` wanted in the build's environment)."""
    name, folder = f"builder_{precision}", workdir / f"builder_{precision}"
    cmd = (sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", checkpoint, "-o", folder, "-p", precision,
           "-e", "cpu", "-c", workdir / "builder_cache")  # fmt: skip
    label = f"`python -m onnxruntime_genai.models.builder -i CKPT -p {precision} -e cpu`"
    step = Build(name, cmd, (checkpoint,), (folder,), label)
    return Peer(name, f"builder {precision}, genai", folder, measure_genai, builds=(step,))


def gptoss_sources() -> tuple[Path, ...]:
    """The ``gptoss`` package's source files: inputs of every build by ``gptoss``, so that a build by other code
    is never reused."""
    return tuple(sorted((Path(__file__).resolve().parent.parent / "gptoss").rglob("*.py")))


def convert_step(checkpoint: Path, params: Path, layers: int, weight_format: str, name: str = "convert") -> Build:
    """``gptoss convert`` of ``checkpoint``'s first ``layers`` layers to ``params`` (and its config beside it)."""
    from gptoss.config import params_config_path

    cmd = (sys.executable, "-m", "gptoss", "convert", "--checkpoint", checkpoint, "--output", params,
           "--layers", layers, "--weight-format", weight_format)  # fmt: skip
    label = f"`gptoss convert --weight-format {weight_format}`"
    return Build(name, cmd, (checkpoint, *gptoss_sources()), (params, params_config_path(params)), label)


def export_step(params: Path, folder: Path, name: str = "export", variant: str | None = None) -> Build:
    """``gptoss export --stage decoder`` of ``params`` into the decoder folder ``folder`` (``--variant``: a quantized
    variant of it)."""
    from gptoss.config import params_config_path

    flags = ("--variant", variant) if variant else ()
    cmd = (sys.executable, "-m", "gptoss", "export", "--stage", "decoder", *flags, "--params", params, "--output",
           folder / "model.onnx")  # fmt: skip
    inputs = (params, params_config_path(params), *gptoss_sources())
    label = f"`gptoss export --stage decoder{' --variant ' + variant if variant else ''}`"
    return Build(name, cmd, inputs, (folder,), label)


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


def special_ids(folder: Path) -> tuple[list[int], set[int]]:
    """A decoder folder's end-of-sequence ids (never chosen) and its special ids (kept out of the prompt)."""
    return _special(json.loads((folder / "genai_config.json").read_text())["model"])


def checkpoint_special_ids(checkpoint: Path) -> tuple[list[int], set[int]]:
    """:func:`special_ids` of an HF-layout checkpoint: its ``generation_config.json`` over its ``config.json``."""
    config = {}
    for name in ("config.json", "generation_config.json"):
        if (checkpoint / name).is_file():
            config |= {k: v for k, v in json.loads((checkpoint / name).read_text()).items() if v is not None}
    return _special(config)


def _special(config: dict) -> tuple[list[int], set[int]]:
    eos = config.get("eos_token_id") or []
    eos = eos if isinstance(eos, list) else [eos]
    return eos, set(eos) | {config.get("bos_token_id"), config.get("pad_token_id")}


def decoder_file(folder: Path) -> Path:
    """The graph a decoder folder's ``genai_config.json`` names."""
    config = folder / "genai_config.json"
    if not config.is_file():
        raise PeerError(f"{folder}: no genai_config.json (not a decoder folder)")
    return folder / json.loads(config.read_text())["model"]["decoder"]["filename"]


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
