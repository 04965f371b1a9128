"""``gptoss quality``: a quantized decoder folder against the exact one, measured the way ``llama-perplexity
--kl-divergence`` measures quantization, plus greedy generation on the parity prompts.

The evaluation text is tokenized with the exact folder's tokenizer and cut into chunks of ``chunk_length`` tokens.
Each chunk runs once through each graph as a prefill on an empty cache (batch 1, ``attention_mask`` all ones). As
in llama.cpp's perplexity, only the second half of each chunk is scored (positions ``chunk_length // 2`` to
``chunk_length - 1``), so that every scored position has at least half a chunk of context; each scored position
predicts the next token of the text (the last one: the first token after the chunk, which llama.cpp leaves out).
No BOS token is inserted. Per scored position, in float64 from the log-softmax of both graphs' logits:
KL(exact ‖ variant), whether the argmax agrees, Δp (the variant's probability of the next text token minus the
exact one's) and each graph's negative log-likelihood of it. Only one chunk's logits per graph are held at a time.
With ``--probe`` (the variant's probe graph) and ``--params``, also the top-1 agreement per block depth on the same
chunks and positions (:mod:`gptoss.proof.depth`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gptoss.errors import GptOssError
from gptoss.files import atomic_output, sha256
from gptoss.graphs.names import data_path
from gptoss.proof.compare import compare_tokens
from gptoss.runtimes.generation import Generation

if TYPE_CHECKING:
    from tokenizers import Tokenizer

    from gptoss.model.params import Params

log = logging.getLogger("gptoss.quality")

EVAL_TEXT = Path(__file__).resolve().parent.parent / "eval_text" / "eval_text.txt"
# The workflow's parity prompts (config/config.yaml `prompts`); the workflow passes its own with --prompt.
DEFAULT_PROMPTS = ("What is the capital of France?",)
# block: the block depth of a per-depth row, empty on the others; probe_*: the graph the per-depth rows ran.
COLUMNS = (
    "stage variant prompt_id statistic block value positions exact_onnx_sha256 variant_onnx_sha256 exact_data_sha256 "
    "variant_data_sha256 probe_onnx_sha256 probe_data_sha256 text_sha256 tokens chunk_length"
).split()
TEXT_ID = "eval_text"
KLD_PERCENTILES = {"kld_median": 50, "kld_p90": 90, "kld_p95": 95, "kld_p99": 99, "kld_p99_9": 99.9}
DELTA_P_PERCENTILES = {"delta_p_p1": 1, "delta_p_p5": 5, "delta_p_p50": 50, "delta_p_p95": 95, "delta_p_p99": 99}
ROW_BLOCK = 32  # positions per float64 log-softmax block (32 x 201088 x 8 bytes = 51 MB per array)


@dataclass(frozen=True)
class Decoder:
    """A decoder folder: its graph, its tokenizer (if any) and the end-of-sequence ids greedy loops suppress."""

    folder: Path
    onnx: Path
    tokenizer: Path
    suppress: tuple[int, ...]
    head_size: int | None = None  # genai_config.json's, for a graph whose cache's head dimension is symbolic
    # onnxruntime-genai's shared past/present buffers (the builder's graphs): the past is a buffer of fixed capacity
    # whose valid length the attention mask gives; its sliding-window layers' capacity is the window.
    shared_buffer: bool = False
    window: int | None = None
    sliding_layers: tuple[int, ...] = ()


def open_decoder(folder: Path, flag: str) -> Decoder:
    """Check a decoder folder: the graph ``genai_config.json`` names (else ``model.onnx``) and ``tokenizer.json``."""
    folder = Path(folder)
    if not folder.is_dir():
        raise GptOssError(f"{folder}: {flag} decoder folder not found")
    name, suppress, head_size, shared = "model.onnx", (), None, {}
    if (config_path := folder / "genai_config.json").is_file():
        try:
            config = json.loads(config_path.read_text())
            model = config["model"]
            name = model["decoder"].get("filename", name)
            head_size = model["decoder"].get("head_size")
            if config.get("search", {}).get("past_present_share_buffer"):
                sliding = model["decoder"].get("sliding_window") or {}
                shared = dict(shared_buffer=True, window=sliding.get("window_size"),
                              sliding_layers=tuple(sliding.get("layers", ())))  # fmt: skip
            eos = model.get("eos_token_id") or []
            suppress = tuple(int(i) for i in (eos if isinstance(eos, list) else [eos]))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise GptOssError(f"{config_path}: not a decoder genai_config.json ({exc})") from None
    if not (folder / name).is_file():
        raise GptOssError(f"{folder / name}: {flag} folder has no decoder graph")
    return Decoder(folder, folder / name, folder / "tokenizer.json", suppress, head_size, **shared)


def read_text(path: Path) -> str:
    """The evaluation text; a first line starting with ``#`` (the sources) is not part of it."""
    path = Path(path)
    if not path.is_file():
        raise GptOssError(f"{path}: evaluation text not found")
    text = path.read_text(encoding="utf-8")
    return text.partition("\n")[2] if text.startswith("#") else text


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def position_measures(exact: np.ndarray, variant: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """Per position (rows of ``[positions, vocab]`` logits, ``targets`` the next text tokens): ``kld`` =
    KL(exact ‖ variant), ``same_top`` (argmax equal), ``delta_p`` = p_variant − p_exact of the target, and each
    graph's negative log-likelihood of the target (``nll_exact``, ``nll_variant``). float64, in row blocks."""
    parts: dict[str, list[np.ndarray]] = {k: [] for k in ("kld", "same_top", "delta_p", "nll_exact", "nll_variant")}
    for start in range(0, len(targets), ROW_BLOCK):
        rows = slice(start, start + ROW_BLOCK)
        log_p, log_q, target = log_softmax(exact[rows]), log_softmax(variant[rows]), targets[rows]
        parts["kld"].append((np.exp(log_p) * (log_p - log_q)).sum(axis=-1))
        parts["same_top"].append(exact[rows].argmax(axis=-1) == variant[rows].argmax(axis=-1))
        lp, lq = (np.take_along_axis(x, target[:, None], axis=-1)[:, 0] for x in (log_p, log_q))
        parts["delta_p"].append(np.exp(lq) - np.exp(lp))
        parts["nll_exact"].append(-lp)
        parts["nll_variant"].append(-lq)
    return {k: np.concatenate(v) if v else np.zeros(0) for k, v in parts.items()}


def text_statistics(measures: dict[str, np.ndarray]) -> dict[str, float]:
    """llama.cpp's set over every scored position: KLD mean (and its standard error), median, percentiles, max;
    top-1 agreement; Δp mean, RMS and percentiles; each perplexity and their ratio. Percentiles: numpy's linear."""
    kld, delta_p = measures["kld"], measures["delta_p"]
    n = len(kld)
    stats = {
        "kld_mean": float(kld.mean()),
        "kld_mean_stderr": float(kld.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan,
    }
    stats |= {name: float(np.percentile(kld, q)) for name, q in KLD_PERCENTILES.items()}
    stats["kld_max"] = float(kld.max())
    stats["top1_agreement"] = float(measures["same_top"].mean())
    stats["delta_p_mean"] = float(delta_p.mean())
    stats["delta_p_rms"] = float(np.sqrt(np.mean(delta_p**2)))
    stats |= {name: float(np.percentile(delta_p, q)) for name, q in DELTA_P_PERCENTILES.items()}
    stats["ppl_exact"] = float(np.exp(measures["nll_exact"].mean()))
    stats["ppl_variant"] = float(np.exp(measures["nll_variant"].mean()))
    stats["ppl_ratio"] = stats["ppl_variant"] / stats["ppl_exact"]
    return stats


def greedy_agreement(
    exact: Generation, variant_tokens: Sequence[int], suppress: Sequence[int], margin: float
) -> tuple[float, bool]:
    """``(agreement, near tie)`` of the variant's greedy tokens against the exact ``Generation``: the share of steps
    before the first difference (1.0 if identical). A first difference where the exact model's top-2 logits are
    within ``margin`` is a near tie and counts as agreement (the decoder parity's rule)."""
    compared, near_tie, failed = compare_tokens(exact, variant_tokens, suppress, margin)
    steps = len(exact.tokens)
    return ((compared - 1) / steps if failed else 1.0), near_tie


def _vocab(session, path: Path) -> int | None:
    dim = next((o.shape[-1] for o in session.get_outputs() if o.name == "logits"), None)
    if dim is None:
        raise GptOssError(f"{path}: not a decoder graph (no logits output)")
    return dim if isinstance(dim, int) else None


def _check_finite(logits: np.ndarray, path: Path, chunk: int) -> None:
    if not np.isfinite(logits).all():
        bad = int((~np.isfinite(logits)).sum())
        raise GptOssError(f"{path}: {bad} NaN/Inf logits in chunk {chunk} of the evaluation text")


def prefill_logits(session, decoder: Decoder) -> Callable[[np.ndarray, int], np.ndarray]:
    """A decoder session as a chunk's logits: one prefill of ``ids [1, L]`` on an empty cache, every position's.
    A graph with onnxruntime-genai's shared buffers gets zeroed buffers of the capacity genai would give it (the
    window for its sliding layers, the chunk for the others) and the attention mask of the chunk alone."""
    from gptoss.graphs.names import INPUT_NAME, MASK_NAME, PAST_PREFIX
    from gptoss.runtimes.onnx_runtime import empty_past, ort_step

    def run(ids: np.ndarray, chunk: int) -> np.ndarray:
        if not decoder.shared_buffer:
            out, _ = ort_step(session, ids, np.ones_like(ids), empty_past(session, 1, decoder.head_size))
            return out[0]
        feeds = {INPUT_NAME: ids, MASK_NAME: np.ones_like(ids)}
        for i in (i for i in session.get_inputs() if i.name.startswith(PAST_PREFIX)):
            layer = int(i.name.removeprefix(PAST_PREFIX).split(".")[0])
            capacity = decoder.window if layer in decoder.sliding_layers else ids.shape[1]
            feeds[i.name] = np.zeros((1, i.shape[1], capacity, decoder.head_size), np.float32)
        return session.run(["logits"], feeds)[0][0]

    return run


def greedy_by_prefill(run: Callable[[np.ndarray, int], np.ndarray], prompt: list[int], steps: int,
                      suppress: Sequence[int]) -> list[int]:  # fmt: skip
    """Greedy tokens without a cache: the whole sequence prefilled again at every step (for shared-buffer graphs)."""
    from gptoss.runtimes.generation import choose

    tokens: list[int] = []
    for _ in range(steps):
        logits = run(np.asarray([prompt + tokens], np.int64), 0)
        tokens.append(choose(logits[-1], suppress))
    return tokens


def text_chunks(tokens: np.ndarray, length: int) -> list[np.ndarray]:
    """The evaluation's chunks: ``ids [1, length]`` each, as many whole ones as leave the last a next token."""
    return [tokens[None, c * length : (c + 1) * length] for c in range((len(tokens) - 1) // length)]


def score_text(
    runs: Sequence[Callable[[np.ndarray, int], np.ndarray]], paths: Sequence[Path], tokens: np.ndarray, length: int
) -> dict[str, np.ndarray]:
    """:func:`position_measures` of every scored position: chunk by chunk, the exact model's and the variant's
    logits (``runs``: ``ids [1, L]``, chunk index → ``[L, vocab]``, e.g. :func:`prefill_logits`); positions
    ``length // 2`` to ``length - 1`` of each chunk, each predicting the text's next token. Holds one chunk's scored
    logits per side at a time."""
    chunks, first = text_chunks(tokens, length), length // 2
    parts: list[dict[str, np.ndarray]] = []
    start = time.perf_counter()
    for c, ids in enumerate(chunks):
        logits = []
        for run, path in zip(runs, paths, strict=True):
            out = run(ids, c)
            logits.append(np.array(out[first:], np.float32))  # a copy: the full [L, vocab] is freed
            del out
            _check_finite(logits[-1], path, c)
        if logits[0].shape[-1] != logits[1].shape[-1]:
            raise GptOssError(
                f"{paths[1]}: vocabulary of {logits[1].shape[-1]} logits, the exact graph's has {logits[0].shape[-1]}"
            )
        parts.append(position_measures(*logits, tokens[c * length + first + 1 : (c + 1) * length + 1]))
        del logits
        log.info("chunk %d/%d: mean KLD %.3g, %.1f s", c + 1, len(chunks), parts[-1]["kld"].mean(),
                 time.perf_counter() - start)  # fmt: skip
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def evaluation_tokens(exact: Decoder, text: Path | None, max_tokens: int | None) -> tuple[np.ndarray, Path, Tokenizer]:
    """The evaluation text (the packaged one unless ``text``) tokenized with the exact folder's tokenizer, its first
    ``max_tokens``; the text's path; the tokenizer."""
    from gptoss.formats.tokenizer import encode, load_tokenizer

    if not exact.tokenizer.is_file():
        raise GptOssError(f"{exact.tokenizer}: not found (the --exact folder's tokenizer reads the text)")
    text_path = Path(text) if text is not None else EVAL_TEXT
    tokenizer = load_tokenizer(exact.tokenizer)
    tokens = np.asarray(encode(tokenizer, read_text(text_path)), np.int64)[:max_tokens]
    if len(tokens) < 2:
        raise GptOssError(f"{text_path}: {len(tokens)} token(s); the evaluation needs at least 2")
    return tokens, text_path, tokenizer


def quality(
    exact_dir: Path,
    variant_dir: Path,
    variant_name: str,
    csv_path: Path,
    *,
    text: Path | None = None,
    max_tokens: int | None = None,
    chunk_length: int = 512,
    prompts: Sequence[str] = DEFAULT_PROMPTS,
    steps: int = 8,
    threads: int | None = None,
    near_tie_margin: float = 1e-4,
    kld_values: Path | None = None,
    probe: Path | None = None,
    params: Params | None = None,
) -> list[dict]:
    """Measure ``variant_dir`` against ``exact_dir`` on the evaluation text and the prompts; write the CSV (one row
    per statistic) and, if asked, every scored position's KLD (float32 ``.npy``). ``probe`` (the variant's probe
    folder) with the exact ``params``: also one row per block depth. Returns the rows."""
    from gptoss.formats.tokenizer import encode
    from gptoss.runtimes.onnx_runtime import ort_generate, ort_session

    exact, variant = open_decoder(exact_dir, "--exact"), open_decoder(variant_dir, "--variant")
    tokens, text_path, tokenizer = evaluation_tokens(exact, text, max_tokens)
    if variant.tokenizer.is_file() and sha256(variant.tokenizer) != sha256(exact.tokenizer):
        log.warning("%s differs from %s: the variant is scored on the exact tokenizer's ids", variant.tokenizer,
                    exact.tokenizer)  # fmt: skip
    if chunk_length < 1:
        raise GptOssError(f"--chunk-length must be at least 1, got {chunk_length}")
    if steps < 1:
        raise GptOssError(f"--steps must be at least 1, got {steps}")
    length = min(chunk_length, len(tokens) - 1)
    if probe is not None:
        from gptoss.proof.depth import open_probe

        if params is None:
            raise GptOssError("--probe needs --params (the exact params: the logit lens applies their head)")
        probe = open_probe(probe, variant.onnx, params, length)
    sessions = [ort_session(d.onnx, threads) for d in (exact, variant)]
    vocabs = [_vocab(s, d.onnx) for s, d in zip(sessions, (exact, variant), strict=True)]
    if None not in vocabs and vocabs[0] != vocabs[1]:
        raise GptOssError(f"{variant.onnx}: vocabulary of {vocabs[1]} logits, the exact graph's has {vocabs[0]}")
    log.info("%s: %d tokens, %d chunks of %d, scoring positions %d..%d of each", text_path.name, len(tokens),
             (len(tokens) - 1) // length, length, length // 2, length - 1)  # fmt: skip
    runs = [prefill_logits(s, d) for s, d in zip(sessions, (exact, variant), strict=True)]
    measures = score_text(runs, [exact.onnx, variant.onnx], tokens, length)
    stats = text_statistics(measures)
    greedy = []
    for i, prompt in enumerate(prompts):
        if not (ids := encode(tokenizer, prompt)):
            raise GptOssError(f"prompt p{i} has no tokens")
        reference = ort_generate(sessions[0], ids, steps, exact.suppress, exact.head_size)
        if variant.shared_buffer:
            got = greedy_by_prefill(runs[1], list(ids), steps, exact.suppress)
        else:
            got = ort_generate(sessions[1], ids, steps, exact.suppress, variant.head_size).tokens
        greedy.append((f"p{i}", *greedy_agreement(reference, got, exact.suppress, near_tie_margin)))
    del sessions
    depths = None
    if probe is not None:
        from gptoss.proof.depth import depth_agreement

        depths = depth_agreement(params, probe, tokens, length, threads)

    common = dict(stage="quality", variant=variant_name, text_sha256=sha256(text_path), tokens=len(tokens))
    common["chunk_length"] = length
    for role, decoder in (("exact", exact), ("variant", variant)):
        weights = data_path(decoder.onnx)  # the graph's weights file (model.onnx.data), if it has one
        common[f"{role}_onnx_sha256"] = sha256(decoder.onnx)
        common[f"{role}_data_sha256"] = sha256(weights) if weights.is_file() else ""
    n = len(measures["kld"])
    rows = [common | dict(prompt_id=TEXT_ID, statistic=k, value=v, positions=n) for k, v in stats.items()]
    if depths is not None:
        rows += depth_rows(depths, common, n, probe)
    for prompt_id, agreement, near_tie in greedy:
        for statistic, value in (("greedy_agreement", agreement), ("greedy_near_tie", float(near_tie))):
            rows.append(common | dict(prompt_id=prompt_id, statistic=statistic, value=value, positions=steps))
    write_rows(rows, csv_path)
    if kld_values is not None:
        with atomic_output(Path(kld_values)) as tmp, open(tmp, "wb") as fh:
            np.save(fh, measures["kld"].astype(np.float32))
    log.info("%s: KLD mean %.4g (p99 %.4g), same top %.2f%%, ppl ratio %.4f over %d positions", variant_name,
             stats["kld_mean"], stats["kld_p99"], 100 * stats["top1_agreement"], stats["ppl_ratio"], n)  # fmt: skip
    return rows


def depth_rows(depths: np.ndarray, common: dict, positions: int, probe: Path) -> list[dict]:
    """One row per block depth: its top-1 agreement, the probe's provenance."""
    from gptoss.proof.depth import STATISTIC, probe_provenance

    common = common | probe_provenance(probe) | dict(prompt_id=TEXT_ID, statistic=STATISTIC, positions=positions)
    log.info("top-1 agreement per block depth: %s", ", ".join(f"{d}: {v:.3f}" for d, v in enumerate(depths)))
    return [common | dict(block=d, value=float(v)) for d, v in enumerate(depths)]


def write_rows(rows: list[dict], path: Path) -> None:
    """The quality CSV, written atomically; floats with ``repr`` (round-trip exact)."""
    with atomic_output(Path(path)) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})


def read_rows(paths: Sequence[Path]) -> list[dict]:
    """Rows of quality CSVs (``value`` float, NaN kept; ``positions`` int; ``block`` int, or None where empty or
    absent, as in CSVs written before it), each with its ``source`` path."""
    rows: list[dict] = []
    for path in map(Path, paths):
        if not path.is_file():
            raise GptOssError(f"{path}: quality CSV not found")
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if missing := {"variant", "prompt_id", "statistic", "value", "positions"} - set(reader.fieldnames or []):
                raise GptOssError(f"{path}: not a quality CSV (missing columns {sorted(missing)})")
            for line, row in enumerate(reader, start=2):
                try:
                    row["value"] = float(row["value"]) if row["value"] not in (None, "") else math.nan
                    row["positions"] = int(row["positions"] or 0)
                except ValueError:
                    raise GptOssError(f"{path}: line {line}: value {row['value']!r} is not a number") from None
                row["block"] = _block(row.get("block"), path, line)
                rows.append(row | {"source": str(path)})
    return rows


def _block(text: str | None, path: Path, line: int) -> int | None:
    if text in (None, ""):
        return None
    try:
        return int(text)
    except ValueError:
        raise GptOssError(f"{path}: line {line}: block {text!r} is not a block depth") from None
