"""``gptoss parity``: JAX vs ONNX Runtime on the same token ids, every real position, into a CSV (DESIGN §6).

Memory: the two sides never hold their weights at the same time. JAX runs every prompt first and spills its
outputs to a temporary ``.npz``; the model is dropped; then ONNX Runtime runs and each output is compared
against the JAX tensor loaded on its own.
"""

from __future__ import annotations

import csv
import gc
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import onnx

from gptoss.atomic import atomic_output
from gptoss.config import ParamsConfig, params_config_path
from gptoss.errors import GptOssError
from gptoss.export import load_model
from gptoss.gate import breach, first_failure
from gptoss.model import forward, output_names
from gptoss.names import INPUT_NAME, data_path
from gptoss.ort import ort_session, sha256
from gptoss.tolerances import GROUPS, ROUTING_TAP, Tolerances, classify

log = logging.getLogger("gptoss.parity")

COLUMNS = [
    "stage",
    "prompt_id",
    "tensor",
    "group",
    "block",
    "tap",
    "shape",
    "positions",
    "max_abs_diff",
    "mean_abs_diff",
    "max_rel_diff",
    "cosine",
    "ref_abs_max",
    "nonfinite",
    "atol",
    "passed",
    "argmax_agreement",
    "topk_overlap",
    "expert_agreement",
    "near_ties",
    "onnx_sha256",
    "data_sha256",
]
TOPK = 5
PAD_ID = 0
# Taps laid out per routing slot: compared only on tokens whose selected experts agree slot by slot.
PER_SLOT_TAPS = {"expert_weights", "expert_preact", "expert_act", "expert_out"}


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    ids: list[int]


def resolve_prompts(
    prompts: Sequence[str], token_ids: Sequence[str], tokenizer_path: Path | None, sequence_length: int
) -> list[Prompt]:
    """Prompts (tokenized with the checkpoint's tokenizer) and/or literal comma-separated token id lists."""
    resolved: list[Prompt] = []
    if prompts:
        from gptoss.tokenizer import encode, load_tokenizer

        if tokenizer_path is None:
            raise GptOssError("no tokenizer: the params config records none; pass --tokenizer or --token-ids")
        tokenizer = load_tokenizer(tokenizer_path)
        resolved += [Prompt(f"p{i}", encode(tokenizer, text)) for i, text in enumerate(prompts)]
    for i, text in enumerate(token_ids):
        try:
            resolved.append(Prompt(f"t{i}", [int(t) for t in text.replace(" ", "").split(",") if t]))
        except ValueError:
            raise GptOssError(f"--token-ids {text!r}: expected comma-separated integers") from None
    if not resolved:
        raise GptOssError("nothing to compare: pass at least one --prompt or --token-ids")
    for p in resolved:
        if not p.ids:
            raise GptOssError(f"prompt {p.prompt_id} has no tokens")
        if len(p.ids) > sequence_length:
            raise GptOssError(
                f"prompt {p.prompt_id} has {len(p.ids)} tokens, more than --sequence-length {sequence_length} "
                "(prompts are never truncated)"
            )
    return resolved


def prompt_inputs(
    params: Path,
    config: Path | None,
    prompts: Sequence[str],
    token_ids: Sequence[str],
    tokenizer: Path | None,
    sequence_length: int,
) -> tuple[Path, ParamsConfig, list[Prompt]]:
    """The params config (path and contents) and the prompts, tokenized with ``tokenizer`` or else the one the
    params config records."""
    config = config or params_config_path(params)
    params_cfg = ParamsConfig.read(config)
    tokenizer = tokenizer or (Path(params_cfg.tokenizer) if params_cfg.tokenizer else None)
    return config, params_cfg, resolve_prompts(prompts, token_ids, tokenizer, sequence_length)


def padded(prompt: Prompt, sequence_length: int) -> np.ndarray:
    """``[1, sequence_length]`` int32, right-padded: causal attention keeps real positions independent of padding."""
    ids = np.full((1, sequence_length), PAD_ID, dtype=np.int32)
    ids[0, : len(prompt.ids)] = prompt.ids
    return ids


def check_graph(onnx_path: Path, wanted: Sequence[str], sequence_length: int) -> None:
    """Fail early (before any computation) if the graph lacks outputs or has another static length."""
    if not onnx_path.is_file():
        raise GptOssError(f"{onnx_path}: ONNX file not found")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    available = {o.name for o in graph.output}
    missing = [name for name in wanted if name not in available]
    if missing:
        needs = []
        if any(n.startswith("hidden_state_") for n in missing):
            needs.append("--emit-hidden-states")
        if any(n.startswith("block_") for n in missing):
            needs.append("--emit-block-debug")
        raise GptOssError(
            f"{onnx_path} lacks outputs {missing[:3]}{'...' if len(missing) > 3 else ''}: "
            f"export it with {' '.join(needs) or 'the matching flags'}"
        )
    dims = graph.input[0].type.tensor_type.shape.dim
    if len(dims) == 2 and dims[1].HasField("dim_value") and dims[1].dim_value != sequence_length:
        raise GptOssError(
            f"{onnx_path} was exported for sequence length {dims[1].dim_value}, not --sequence-length {sequence_length}"
        )


def diff_metrics(ref: np.ndarray, got: np.ndarray) -> dict[str, float | int]:
    """Max/mean |diff|, max |diff| relative to the reference magnitude, cosine, non-finite count."""
    ref64, got64 = ref.astype(np.float64).reshape(-1), got.astype(np.float64).reshape(-1)
    nonfinite = int((~np.isfinite(ref64)).sum() + (~np.isfinite(got64)).sum())
    if ref64.size == 0:
        return dict(max_abs_diff=0.0, mean_abs_diff=0.0, max_rel_diff=0.0, cosine=1.0, ref_abs_max=0.0, nonfinite=0)
    if nonfinite:
        nan = float("nan")
        return dict(
            max_abs_diff=nan, mean_abs_diff=nan, max_rel_diff=nan, cosine=nan, ref_abs_max=nan, nonfinite=nonfinite
        )
    diff = np.abs(got64 - ref64)
    ref_abs_max = float(np.abs(ref64).max())
    norms = float(np.linalg.norm(ref64) * np.linalg.norm(got64))
    cosine = float(ref64 @ got64 / norms) if norms > 0 else float(np.array_equal(ref64, got64))
    return dict(
        max_abs_diff=float(diff.max()),
        mean_abs_diff=float(diff.mean()),
        max_rel_diff=float(diff.max() / ref_abs_max) if ref_abs_max > 0 else float(diff.max()),
        cosine=cosine,
        ref_abs_max=ref_abs_max,
        nonfinite=0,
    )


def logits_agreement(ref: np.ndarray, got: np.ndarray, k: int = TOPK) -> tuple[float, float]:
    """Fraction of positions with the same argmax; mean top-k overlap."""
    ref2, got2 = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
    argmax = float(np.mean(ref2.argmax(-1) == got2.argmax(-1)))
    k = min(k, ref2.shape[-1])
    top_ref = np.argpartition(-ref2, k - 1, axis=-1)[:, :k]
    top_got = np.argpartition(-got2, k - 1, axis=-1)[:, :k]
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top_ref, top_got, strict=True)])
    return argmax, float(overlap)


def routing_agreement(
    ref_idx: np.ndarray, got_idx: np.ndarray, router_logits: np.ndarray, margin: float
) -> tuple[float, int, int]:
    """(fraction of tokens selecting the same experts, near-tie tokens, disagreements outside near ties)."""
    k = ref_idx.shape[-1]
    same = np.array([set(a) == set(b) for a, b in zip(ref_idx.reshape(-1, k), got_idx.reshape(-1, k), strict=True)])
    ordered = -np.sort(-router_logits.reshape(-1, router_logits.shape[-1]), axis=-1)
    if ordered.shape[-1] > k:
        near = (ordered[:, k - 1] - ordered[:, k]) < margin
    else:
        near = np.zeros(len(same), dtype=bool)
    return float(same.mean()), int(near.sum()), int((~same & ~near).sum())


def run_jax_side(
    params: Path,
    config: Path | None,
    prompts: list[Prompt],
    sequence_length: int,
    hidden: bool,
    debug: bool,
    spill: Path,
) -> None:
    """Run the Flax model on every prompt; write ``spill/{prompt_id}.npz``."""
    params_cfg, model = load_model(params, config)
    names = output_names(params_cfg.model, hidden, debug)
    for prompt in prompts:
        outputs = forward(model, jnp.asarray(padded(prompt, sequence_length)), hidden, debug)
        np.savez(spill / f"{prompt.prompt_id}.npz", **{n: np.asarray(outputs[n]) for n in names})
        del outputs
    del model
    gc.collect()


def compare_prompt(
    stage: str, prompt: Prompt, ref: np.lib.npyio.NpzFile, got: dict[str, np.ndarray], tol: Tolerances
) -> Iterator[dict]:
    """One CSV row per output, real positions only."""
    n = len(prompt.ids)
    for tensor, got_full in got.items():
        group, block, tap = classify(tensor)
        ref_t, got_t = ref[tensor][:, :n], got_full[:, :n]
        row = dict(stage=stage, prompt_id=prompt.prompt_id, tensor=tensor, group=group, tap=tap, positions=n)
        row.update(block=block, shape="x".join(map(str, ref_t.shape)), atol=tol.atol(group))
        if tap == ROUTING_TAP:
            agreement, near, disagreements = routing_agreement(
                ref_t, got_t, ref[f"block_{block}_router_logits"][:, :n], tol.near_tie_margin
            )
            row.update(diff_metrics(ref_t, got_t))
            row.update(max_abs_diff=float(disagreements), expert_agreement=agreement, near_ties=near)
            row["passed"] = breach(row, tol) <= 1
            yield row
            continue
        if tap in PER_SLOT_TAPS:
            idx_name = f"block_{block}_{ROUTING_TAP}"
            same_slots = np.all(ref[idx_name][:, :n] == got[idx_name][:, :n], axis=-1)
            ref_t, got_t = ref_t[same_slots], got_t[same_slots]
        row.update(diff_metrics(ref_t, got_t))
        if group == "logits":
            row["argmax_agreement"], row["topk_overlap"] = logits_agreement(ref_t, got_t)
        row["passed"] = breach(row, tol) <= 1
        yield row


def parity(
    params: Path,
    onnx_path: Path,
    csv_path: Path,
    sequence_length: int,
    prompts: Sequence[str] = (),
    token_ids: Sequence[str] = (),
    tokenizer: Path | None = None,
    config: Path | None = None,
    compare_hidden_states: bool = False,
    compare_block_debug: bool = False,
    stage: str | None = None,
    tolerances: Tolerances | None = None,
    threads: int | None = None,
    logits_diffs: Path | None = None,
) -> list[dict]:
    """Run both sides, write the CSV atomically, return its rows.

    ``logits_diffs``: also write every real position's logits |diff| (float32, one array per prompt) to this
    ``.npz``, for the report's histogram.
    """
    tolerances = tolerances or Tolerances()
    stage = stage or ("debug" if compare_hidden_states or compare_block_debug else "canonical")
    config, params_cfg, resolved = prompt_inputs(params, config, prompts, token_ids, tokenizer, sequence_length)
    wanted = output_names(params_cfg.model, compare_hidden_states, compare_block_debug)
    check_graph(onnx_path, wanted, sequence_length)
    hashes = dict(onnx_sha256=sha256(onnx_path), data_sha256=sha256(data_path(onnx_path)))

    rows: list[dict] = []
    diffs: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="gptoss-parity-") as spill_dir:
        spill = Path(spill_dir)
        log.info("JAX side: %d prompt(s), %d outputs each", len(resolved), len(wanted))
        run_jax_side(params, config, resolved, sequence_length, compare_hidden_states, compare_block_debug, spill)
        log.info("ONNX Runtime side: %s", onnx_path)
        session = ort_session(onnx_path, threads)
        for prompt in resolved:
            got = dict(zip(wanted, session.run(wanted, {INPUT_NAME: padded(prompt, sequence_length)}), strict=True))
            with np.load(spill / f"{prompt.prompt_id}.npz") as ref:
                rows += [{**row, **hashes} for row in compare_prompt(stage, prompt, ref, got, tolerances)]
                n = len(prompt.ids)
                diffs[prompt.prompt_id] = np.abs(got["logits"][:, :n] - ref["logits"][:, :n]).astype(np.float32).ravel()
            del got
    write_csv(csv_path, rows)
    log_summary(rows, tolerances)
    if logits_diffs is not None:
        with atomic_output(logits_diffs) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **diffs)
    return rows


def write_csv(path: Path, rows: list[dict]) -> None:
    with atomic_output(path) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})


def log_summary(rows: list[dict], tolerances: Tolerances | None = None) -> None:
    """Worst row per group, as a compact table in the log, and the first failing tap in forward order."""
    tolerances = tolerances or Tolerances()
    log.info("%-14s %-34s %12s %10s %6s", "group", "worst tensor", "max|diff|", "atol", "ok")
    for group in GROUPS:
        members = [r for r in rows if r["group"] == group]
        if not members:
            continue
        worst = max(members, key=lambda r: breach(r, tolerances))
        ok = all(r["passed"] for r in members)
        log.info(
            "%-14s %-34s %12.3g %10.3g %6s",
            group,
            f"{worst['tensor']} ({worst['prompt_id']})",
            worst["max_abs_diff"],
            worst["atol"],
            "yes" if ok else "NO",
        )
    first = first_failure(rows, tolerances)
    if first:
        log.warning(
            "first tap over its tolerance in forward order: block %s %s (max |diff| %.3g, atol %.3g; the tap "
            "before it, %s: %.3g)",
            first["block"],
            first["tap"],
            first["max_abs_diff"],
            first["atol"],
            first["previous_tensor"],
            first["previous_max_abs_diff"] or 0.0,
        )
