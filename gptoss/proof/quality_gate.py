"""``gptoss quality-gate``: quality CSVs + budgets per variant → a JSON verdict and a Markdown summary; exit 1 on
any breach. A budget is ``VARIANT:STATISTIC=VALUE``; :data:`DIRECTIONS` says which way each statistic may go. A
budgeted statistic the CSVs lack for its variant fails, and so does a NaN value. The top-1 agreement per block
depth (rows with a ``block``) has no budget: the verdict and the summary report it.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Sequence
from pathlib import Path

from gptoss.errors import GptOssError
from gptoss.files import atomic_output, sha256
from gptoss.proof.quality import TEXT_ID, read_rows

log = logging.getLogger("gptoss.quality")

# The statistics a budget may bound: "max" = the value must be <= the budget, "min" = >= the budget.
# greedy_agreement has one row per prompt: the budget applies to each.
DIRECTIONS = {"kld_mean": "max", "kld_p99": "max", "top1_agreement": "min", "greedy_agreement": "min"}
Budgets = dict[str, dict[str, float]]  # variant -> statistic -> budget
# What a variant's rows were measured on (sha256 of both graphs and weights files): the promotion checks them.
GRAPH_KEYS = ("variant_onnx_sha256", "variant_data_sha256", "exact_onnx_sha256", "exact_data_sha256")


def parse_budgets(texts: Sequence[str]) -> Budgets:
    """``["q4:kld_p99=0.5", ...]`` → ``{"q4": {"kld_p99": 0.5}}``."""
    budgets: Budgets = {}
    for text in texts:
        variant, _, rest = text.partition(":")
        statistic, _, value = rest.partition("=")
        if not (variant and statistic and value):
            raise GptOssError(f"--budget {text!r}: expected VARIANT:STATISTIC=VALUE, e.g. q4:kld_p99=0.5")
        if statistic not in DIRECTIONS:
            raise GptOssError(
                f"--budget {text!r}: {statistic} has no budget direction (one of {', '.join(DIRECTIONS)})"
            )
        try:
            budgets.setdefault(variant, {})[statistic] = float(value)
        except ValueError:
            raise GptOssError(f"--budget {text!r}: {value!r} is not a number") from None
    if not budgets:
        raise GptOssError("no budgets: pass at least one --budget VARIANT:STATISTIC=VALUE")
    return budgets


def within(value: float, budget: float, direction: str) -> bool:
    """Whether ``value`` keeps to ``budget`` in ``direction``; NaN never does."""
    if math.isnan(value):
        return False
    return value <= budget if direction == "max" else value >= budget


def _describe(variant: str, statistic: str, row: dict | None, budget: float) -> str:
    if row is None:
        return f"{variant} has no {statistic} rows (budget {budget:g})"
    unit = "steps" if row["prompt_id"] != "eval_text" else "positions"
    where = f"({row['prompt_id']}, {row['positions']} {unit})"
    if math.isnan(row["value"]):
        return f"{variant} {statistic} is NaN, budget {budget:g} {where}"
    sign = ">" if DIRECTIONS[statistic] == "max" else "<"
    return f"{variant} {statistic} {row['value']:.3g} {sign} budget {budget:g} {where}"


def evaluate(rows: list[dict], budgets: Budgets) -> dict:
    """The verdict as a dict (deterministic: no timestamps; NaN written as null). Per variant and budgeted
    statistic: the worst row's value and prompt, the budget, its direction, and whether every row keeps to it."""
    variants: dict[str, dict] = {}
    problems: list[str] = []
    for variant in sorted(budgets):
        statistics = {}
        for statistic in (s for s in DIRECTIONS if s in budgets[variant]):
            budget, direction = budgets[variant][statistic], DIRECTIONS[statistic]
            members = [r for r in rows if r["variant"] == variant and r["statistic"] == statistic]
            failing = [r for r in members if not within(r["value"], budget, direction)]
            # the row reported: the first NaN, else the worst value in the budget's direction
            sign = 1 if direction == "max" else -1
            worst = min(members, key=lambda r: (not math.isnan(r["value"]), -sign * r["value"]), default=None)
            if not members or failing:
                problems.append(_describe(variant, statistic, worst, budget))
            statistics[statistic] = {
                "value": None if worst is None or math.isnan(worst["value"]) else worst["value"],
                "prompt_id": None if worst is None else worst["prompt_id"],
                "positions": None if worst is None else worst["positions"],
                "rows": len(members),
                "budget": budget,
                "direction": direction,
                "passed": bool(members) and not failing,
            }
        graphs = sorted({tuple(r.get(key, "") for key in GRAPH_KEYS) for r in rows if r["variant"] == variant})
        if len(graphs) > 1:
            problems.append(f"{variant}: its rows measure {len(graphs)} different pairs of graphs; re-run quality")
        mine = [r for r in rows if r["variant"] == variant and r["prompt_id"] == TEXT_ID]
        measured = {r["statistic"]: r["value"] for r in mine if r.get("block") is None}
        variants[variant] = {
            "passed": all(s["passed"] for s in statistics.values()) and len(graphs) == 1,
            "statistics": statistics,
            "measured": {k: None if math.isnan(v) else v for k, v in sorted(measured.items())},
            "graphs": dict(zip(GRAPH_KEYS, graphs[0], strict=True)) if len(graphs) == 1 else None,
            "top1_agreement_by_depth": by_depth(mine),
        }
    unbudgeted = sorted({r["variant"] for r in rows} - set(budgets))
    return {
        "passed": not problems,
        "problems": problems,
        "variants": variants,
        "unbudgeted_variants": unbudgeted,
        "csv_files": [{"path": p, "sha256": sha256(Path(p))} for p in sorted({r["source"] for r in rows})],
    }


def by_depth(rows: list[dict]) -> list[dict]:
    """The per-depth rows (a ``block``) as ``{block, value, positions}``, by depth; NaN as None."""
    depth = sorted((r for r in rows if r.get("block") is not None), key=lambda r: r["block"])
    return [
        {"block": r["block"], "value": None if math.isnan(r["value"]) else r["value"], "positions": r["positions"]}
        for r in depth
    ]


def depth_markdown(verdict: dict, figure: str | None = None) -> list[str]:
    """The summary's section on the top-1 agreement per block depth: a table per variant that has it."""
    measured = {v: e for v, e in verdict["variants"].items() if e.get("top1_agreement_by_depth")}
    if not measured:
        return []
    lines = ["", "## Top-1 agreement per block depth", ""]
    lines += ["Logit lens: the hidden state after each block through the exact model's final norm and unembedding, in"]
    lines += ["the exact model and in the variant; the share of scored positions whose argmax agrees. The last row is"]
    lines += ["`top1_agreement`, through the variant's own head."]
    for variant, entry in measured.items():
        lines += ["", f"### {variant}", "", "| block depth | top-1 agreement | positions |", "|---|---|---|"]
        for d in entry["top1_agreement_by_depth"]:
            value = "NaN" if d["value"] is None else f"{d['value']:.4f}"
            lines.append(f"| {d['block']} | {value} | {d['positions']} |")
        if (own := entry["measured"].get("top1_agreement")) is not None:
            lines.append(f"| head (`top1_agreement`) | {own:.4f} | |")
    return lines + ([] if figure is None else ["", f"![top-1 agreement per block depth]({figure})"])


def summary_markdown(verdict: dict, figure: str | None = None) -> str:
    lines = [f"# Quality gate: {'PASSED' if verdict['passed'] else 'FAILED'}", ""]
    lines += ["| variant | statistic | worst value | where | budget | ok |", "|---|---|---|---|---|---|"]
    for variant, v in verdict["variants"].items():
        for statistic, s in v["statistics"].items():
            value = "missing" if not s["rows"] else "NaN" if s["value"] is None else f"{s['value']:.4g}"
            sign = "≤" if s["direction"] == "max" else "≥"
            where = f"{s['prompt_id']} ({s['positions']})" if s["rows"] else ""
            ok = "yes" if s["passed"] else "**NO**"
            lines.append(f"| {variant} | {statistic} | {value} | {where} | {sign} {s['budget']:g} | {ok} |")
    lines += depth_markdown(verdict, figure)
    if verdict["problems"]:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in verdict["problems"]]
    return "\n".join(lines) + "\n"


def quality_gate(
    csv_paths: Sequence[Path],
    budgets: Budgets,
    verdict_path: Path,
    summary_path: Path | None = None,
    depth_figure: Path | None = None,
) -> dict:
    """Write the verdict and summary (linking ``depth_figure``, the per-depth plot, if given); raise
    ``GptOssError`` (exit 1) naming the first breach if any."""
    verdict = evaluate(read_rows(csv_paths), budgets)
    with atomic_output(Path(verdict_path)) as tmp:
        tmp.write_text(json.dumps(verdict, indent=2, sort_keys=True, allow_nan=False) + "\n")
    summary = Path(summary_path or Path(verdict_path).with_suffix(".md"))
    figure = None if depth_figure is None else os.path.relpath(depth_figure, summary.parent)
    with atomic_output(summary) as tmp:
        tmp.write_text(summary_markdown(verdict, figure))
    if not verdict["passed"]:
        raise GptOssError(f"quality gate failed: {verdict['problems'][0]}")
    log.info("quality gate passed: %s", ", ".join(sorted(verdict["variants"])))
    return verdict
