"""Parity rows: comparing a reference and a candidate tensor per prompt, writing and reading the CSV, and
judging rows against the tolerances (shared by ``parity``, the reference stage, ``gate`` and ``plots``). One row
per (prompt, tensor, block), real (non-padding) positions only.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

from gptoss.errors import GptOssError
from gptoss.files import atomic_output
from gptoss.model.outputs import BLOCK_TAPS
from gptoss.proof.prompts import Prompt
from gptoss.proof.tolerances import EXACT_GROUPS, GROUPS, ROUTING_TAP, Tolerances, classify
from gptoss.runtimes.generation import Generation, top2_margin

log = logging.getLogger("gptoss.compare")

COLUMNS = (
    "stage prompt_id tensor group block tap shape positions max_abs_diff mean_abs_diff max_rel_diff cosine "
    "ref_abs_max nonfinite atol passed argmax_agreement topk_overlap expert_agreement near_ties step tokens "
    "ref_tokens onnx_sha256 data_sha256"
).split()
NUMERIC = ("max_abs_diff", "mean_abs_diff", "max_rel_diff", "cosine", "ref_abs_max", "atol")
# Taps laid out per routing slot: compared only on tokens whose selected experts agree slot by slot.
PER_SLOT_TAPS = {"expert_weights", "expert_preact", "expert_act", "expert_out"}


def diff_metrics(ref: np.ndarray, got: np.ndarray) -> dict[str, float | int]:
    """Max/mean |diff|, max |diff| relative to the reference magnitude, cosine, non-finite count."""
    ref64, got64 = ref.astype(np.float64).reshape(-1), got.astype(np.float64).reshape(-1)
    nonfinite = int((~np.isfinite(ref64)).sum() + (~np.isfinite(got64)).sum())
    if ref64.size == 0:
        return dict(max_abs_diff=0.0, mean_abs_diff=0.0, max_rel_diff=0.0, cosine=1.0, ref_abs_max=0.0, nonfinite=0)
    if nonfinite:
        return dict.fromkeys(NUMERIC[:-1], math.nan) | {"nonfinite": nonfinite}
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


def logits_agreement(ref: np.ndarray, got: np.ndarray, k: int = 5) -> tuple[float, float]:
    """Fraction of positions with the same argmax; mean top-k overlap."""
    ref2, got2 = ref.reshape(-1, ref.shape[-1]), got.reshape(-1, got.shape[-1])
    argmax = float(np.mean(ref2.argmax(-1) == got2.argmax(-1)))
    k = min(k, ref2.shape[-1])
    top_ref, top_got = (np.argpartition(-logits, k - 1, axis=-1)[:, :k] for logits in (ref2, got2))
    overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(top_ref, top_got, strict=True)])
    return argmax, float(overlap)


def routing_agreement(
    ref_idx: np.ndarray, got_idx: np.ndarray, router_logits: np.ndarray, margin: float
) -> tuple[float, int, int]:
    """(fraction of tokens selecting the same experts, near-tie tokens, disagreements outside near ties)."""
    k = ref_idx.shape[-1]
    same = np.array([set(a) == set(b) for a, b in zip(ref_idx.reshape(-1, k), got_idx.reshape(-1, k), strict=True)])
    ordered = -np.sort(-router_logits.reshape(-1, router_logits.shape[-1]), axis=-1)
    near = (ordered[:, k - 1] - ordered[:, k]) < margin if ordered.shape[-1] > k else np.zeros(len(same), dtype=bool)
    return float(same.mean()), int(near.sum()), int((~same & ~near).sum())


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
        if tap in PER_SLOT_TAPS:
            idx_name = f"block_{block}_{ROUTING_TAP}"
            same_slots = np.all(ref[idx_name][:, :n] == got[idx_name][:, :n], axis=-1)
            ref_t, got_t = ref_t[same_slots], got_t[same_slots]
        row.update(diff_metrics(ref_t, got_t))
        if tap == ROUTING_TAP:  # judged by its disagreements outside near ties
            router_logits = ref[f"block_{block}_router_logits"][:, :n]
            agreement, near, disagreements = routing_agreement(ref_t, got_t, router_logits, tol.near_tie_margin)
            row.update(max_abs_diff=float(disagreements), expert_agreement=agreement, near_ties=near)
        if group == "logits":
            row["argmax_agreement"], row["topk_overlap"] = logits_agreement(ref_t, got_t)
        row["passed"] = breach(row, tol) <= 1
        yield row


@dataclasses.dataclass(frozen=True)
class Results:
    """Where a parity run's rows go: the CSV, judged by ``tolerances``, and (if ``logits_diffs``) every real
    position's logits |diff| per prompt as ``.npz``, for the report's histogram."""

    csv: Path
    tolerances: Tolerances = Tolerances()
    logits_diffs: Path | None = None

    def write(self, rows: list[dict], diffs: dict[str, np.ndarray]) -> None:
        """The CSV and the differences, each written atomically; a summary logged."""
        with atomic_output(self.csv) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=COLUMNS, restval="")
            writer.writeheader()
            for row in rows:
                writer.writerow({k: (repr(v) if isinstance(v, float) else v) for k, v in row.items()})
        log_summary(rows, self.tolerances)
        if self.logits_diffs is not None:
            with atomic_output(self.logits_diffs) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, **diffs)


def log_summary(rows: list[dict], tolerances: Tolerances) -> None:
    """Worst row per group, as a compact table in the log, and the first failing tap in forward order."""
    log.info("%-14s %-34s %12s %10s %6s", "group", "worst tensor", "max|diff|", "atol", "ok")
    for group in GROUPS:
        members = [r for r in rows if r["group"] == group]
        if not members:
            continue
        worst = max(members, key=lambda r: breach(r, tolerances))
        tensor = f"{worst['tensor']} ({worst['prompt_id']})"
        ok = "yes" if all(r["passed"] for r in members) else "NO"
        log.info("%-14s %-34s %12.3g %10.3g %6s", group, tensor, worst["max_abs_diff"], worst["atol"], ok)
    if first := first_failure(rows, tolerances):
        log.warning(
            "first tap over its tolerance in forward order: block %s %s (max |diff| %.3g, atol %.3g; the tap "
            "before it, %s: %.3g)",
            *(first[k] for k in ("block", "tap", "max_abs_diff", "atol", "previous_tensor")),
            first["previous_max_abs_diff"] or 0.0,
        )


def read_rows(paths: Sequence[Path]) -> list[dict]:
    rows: list[dict] = []
    for path in paths:
        if not path.is_file():
            raise GptOssError(f"{path}: parity CSV not found")
        with open(path, newline="") as fh:
            reader = csv.DictReader(fh)
            if missing := {"stage", "tensor", "group", "max_abs_diff", "nonfinite"} - set(reader.fieldnames or []):
                raise GptOssError(f"{path}: not a parity CSV (missing columns {sorted(missing)})")
            for row in reader:
                for key in NUMERIC:
                    row[key] = float(row[key]) if row.get(key) not in (None, "") else math.nan
                row["nonfinite"] = int(row["nonfinite"])
                row["block"] = int(row["block"]) if row.get("block") not in (None, "") else None
                row["source"] = str(path)
                rows.append(row)
    return rows


def breach(row: dict, tol: Tolerances) -> float:
    """How far over its tolerance a row is (> 1 fails; inf for NaN/Inf or a routing or token disagreement)."""
    if row["nonfinite"] > 0 or math.isnan(row["max_abs_diff"]):
        return math.inf
    if row["group"] in EXACT_GROUPS:
        return math.inf if row["max_abs_diff"] > 0 else 0.0
    atol = tol.atol(row["group"])
    return row["max_abs_diff"] / atol if atol > 0 else (math.inf if row["max_abs_diff"] > 0 else 0.0)


def forward_order(row: dict) -> tuple[int, int]:
    """Position of a row in the forward pass: (block, tap index); hidden states close their block."""
    block = row["block"] if row["block"] is not None else 1 << 30
    tap = row.get("tap") or ""
    index = BLOCK_TAPS.index(tap) if tap in BLOCK_TAPS else len(BLOCK_TAPS)
    return block, index


def first_failure(rows: list[dict], tol: Tolerances) -> dict | None:
    """The first tap in forward order that exceeds its tolerance, and the step from the tap before it."""
    worst_at: dict[tuple[int, int], dict] = {}
    for r in (r for r in rows if r["block"] is not None):
        key = forward_order(r)
        if key not in worst_at or breach(r, tol) > breach(worst_at[key], tol):
            worst_at[key] = r
    previous: dict = {}
    for key in sorted(worst_at):
        r = worst_at[key]
        if breach(r, tol) > 1:
            return {k: r[k] for k in ("stage", "block", "tap", "tensor", "max_abs_diff")} | {
                "atol": tol.atol(r["group"]),
                "previous_tensor": previous.get("tensor"),
                "previous_max_abs_diff": previous.get("max_abs_diff"),
            }
        previous = r
    return None


def logits_row(
    stage: str, prompt: Prompt, tensor: str, step: int, ref: np.ndarray, got: np.ndarray, tol: Tolerances
) -> dict:
    """A ``decode_logits`` row: one generation step's logits ``[positions, vocab]``."""
    row = dict(stage=stage, prompt_id=prompt.prompt_id, tensor=tensor, group="decode_logits", block=None, step=step)
    row.update(positions=ref.shape[0], shape="x".join(map(str, ref.shape)), atol=tol.decode_logits)
    row.update(diff_metrics(ref, got))
    row["argmax_agreement"], row["topk_overlap"] = logits_agreement(ref, got)
    row["passed"] = breach(row, tol) <= 1
    return row


def step_rows(stage: str, prompt: Prompt, reference: Generation, got: Generation, tol: Tolerances) -> list[dict]:
    """``decode_logits`` rows, one per step whose prefix both runtimes share: up to and including the first step
    where their tokens differ. Step 0 covers every prompt position."""
    rows = []
    for step, (ref_logits, got_logits) in enumerate(zip(reference.logits, got.logits, strict=False)):
        rows.append(logits_row(stage, prompt, "logits", step, ref_logits, got_logits, tol))
        if reference.tokens[step] != got.tokens[step]:
            break
    return rows


def token_row(
    stage: str, prompt: Prompt, runtime: str, reference: Generation, tokens: list[int], suppress, tol: Tolerances
) -> dict:
    """A ``greedy_tokens`` row: ``runtime``'s tokens against the reference's (JAX's) under the near-tie rule;
    ``max_abs_diff`` is 1 for a disagreement outside a near tie, ``step`` the first step that differs."""
    compared, near_tie, failed = compare_tokens(reference, tokens, suppress, tol.near_tie_margin)
    differs = compared - 1 if (near_tie or failed) else None
    return dict(
        stage=stage, prompt_id=prompt.prompt_id, tensor=f"tokens_{runtime}", group="greedy_tokens", block=None,
        shape=str(len(reference.tokens)), positions=compared, max_abs_diff=float(failed), nonfinite=0, atol=0.0,
        near_ties=int(near_tie), step=differs, tokens=" ".join(map(str, tokens)),
        ref_tokens=" ".join(map(str, reference.tokens)), passed=not failed,
    )  # fmt: skip


def logits_diff(prompt: Prompt, ref: Mapping[str, np.ndarray], got: Mapping[str, np.ndarray]) -> np.ndarray:
    """Every real position's logits |diff| (float32, flat), for the report's histogram."""
    n = len(prompt.ids)
    return np.abs(got["logits"][:, :n] - ref["logits"][:, :n]).astype(np.float32).ravel()


def compare_tokens(
    reference: Generation, tokens: Sequence[int], suppress: Sequence[int], margin: float
) -> tuple[int, bool, bool]:
    """Tokens against the reference's: ``(steps compared, near tie, failed)``. A first difference where the
    reference's top-2 logits are within ``margin`` is a near tie: later tokens follow another prefix and are not
    compared. Any other difference (or a missing token) fails."""
    for step, want in enumerate(reference.tokens):
        got = tokens[step] if step < len(tokens) else None
        if got != want:
            near_tie = got is not None and top2_margin(reference.logits[step][-1], suppress) < margin
            return step + 1, near_tie, not near_tie
    return len(reference.tokens), False, False
