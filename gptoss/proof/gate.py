"""``gptoss gate``: parity CSVs + tolerances → a JSON verdict and a Markdown summary; exit 1 on any breach.

The gate re-applies the tolerances it is given (it does not trust the ``passed`` column), fails on any
NaN/Inf, on a routing disagreement outside near ties, and on an expected stage without rows. When debug
rows fail it names the first block and tap in forward order whose difference exceeds its tolerance.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

from gptoss.errors import GptOssError
from gptoss.files import atomic_output, sha256
from gptoss.proof.compare import breach, first_failure, read_rows
from gptoss.proof.segment_coverage import check_coverage
from gptoss.proof.tolerances import GROUPS, Tolerances

log = logging.getLogger("gptoss.gate")


def _describe(row: dict, tol: Tolerances) -> str:
    where = f" (block {row['block']})" if row["block"] is not None else ""
    if row["nonfinite"] > 0:
        return f"{row['stage']} {row['tensor']}{where} has {row['nonfinite']} NaN/Inf values"
    if row["group"] == "routing":
        return f"{row['stage']} {row['tensor']}{where}: {int(row['max_abs_diff'])} tokens route to other experts"
    if row["group"] == "greedy_tokens":
        return (
            f"{row['stage']} {row['tensor']} (prompt {row.get('prompt_id')}): differs from JAX's greedy tokens at "
            f"step {row.get('step')}, where JAX's top-2 logits are not a near tie"
        )
    where += f" step {row['step']}" if row.get("step") not in (None, "") else ""
    return (
        f"{row['stage']} {row['tensor']}{where} max |diff| {row['max_abs_diff']:.3g} > atol "
        f"{tol.atol(row['group']):.3g} (prompt {row.get('prompt_id')})"
    )


def evaluate(
    rows: list[dict],
    tol: Tolerances,
    expect_stages: Sequence[str],
    manifests: Mapping[str, Path] | None = None,
    csv_paths: Sequence[Path] = (),
) -> dict:
    """The verdict as a dict (deterministic: no timestamps). ``manifests``: stage → the whole graph's tensor
    manifest, for the stages whose CSVs are segments (:mod:`gptoss.proof.segment_coverage`)."""
    stages = sorted({r["stage"] for r in rows})
    problems, whole_graphs, segments = [], [], {}
    for stage, manifest in (manifests or {}).items():
        found, graph, segments[stage] = check_coverage(rows, stage, manifest, csv_paths)
        problems += found
        whole_graphs.append(graph)
    problems += [f"expected stage {stage!r} has no rows" for stage in expect_stages if stage not in stages]
    if not rows:
        problems.append("no parity rows at all")
    worst: dict[str, dict] = {}
    for stage in stages:
        for group in GROUPS:
            members = [r for r in rows if r["stage"] == stage and r["group"] == group]
            if members:
                w = max(members, key=lambda r: breach(r, tol))
                worst[f"{stage}/{group}"] = {
                    "tensor": w["tensor"],
                    "block": w["block"],
                    "prompt_id": w.get("prompt_id"),
                    "max_abs_diff": w["max_abs_diff"],
                    "atol": tol.atol(group),
                    "rows": len(members),
                    "passed": all(breach(r, tol) <= 1 for r in members),
                }
    failing = sorted((r for r in rows if breach(r, tol) > 1), key=lambda r: -breach(r, tol))
    problems += [_describe(r, tol) for r in failing[:20]]
    graphs = sorted(
        {(r["stage"], r.get("onnx_sha256", ""), r.get("data_sha256", "")) for r in rows if r.get("onnx_sha256")}
        - {(r["stage"], r["onnx_sha256"], r["data_sha256"]) for r in rows if r["stage"] in segments}
        | {(g["stage"], g["onnx_sha256"], g["data_sha256"]) for g in whole_graphs}
    )
    verdict = {
        "passed": not problems,
        "problems": problems,
        "failing_rows": len(failing),
        "worst_failure": _describe(failing[0], tol) if failing else None,
        "first_failure": first_failure([r for r in rows if r["stage"] == "debug"], tol),
        "tolerances": {g: tol.atol(g) for g in GROUPS} | {"near_tie_margin": tol.near_tie_margin},
        "stages": {s: sum(r["stage"] == s for r in rows) for s in stages},
        "worst": worst,
        "graphs": [{"stage": s, "onnx_sha256": o, "data_sha256": d} for s, o, d in graphs],
        "generation": generation_summary(rows, tol),
        "csv_files": [
            {"path": str(p), "sha256": sha256(Path(p))}
            for p in sorted({r["source"] for r in rows} | set(map(str, csv_paths)))
        ],
    }
    return verdict | ({"segments": segments} if segments else {})


def generation_summary(rows: list[dict], tol: Tolerances) -> dict:
    """Per runtime (``tokens_onnxruntime``, ``tokens_genai``, ``tokens_transformers``): prompts whose greedy tokens
    equal JAX's, those that stopped at a near tie, those that differ, and the steps generated."""
    summary: dict[str, dict] = {}
    for r in (r for r in rows if r["group"] == "greedy_tokens"):
        runtime = summary.setdefault(r["tensor"].removeprefix("tokens_"), {"identical": 0, "near_tie": 0, "differ": 0})
        runtime["steps"] = int(float(r["shape"]))
        key = "differ" if breach(r, tol) > 1 else "near_tie" if int(r.get("near_ties") or 0) else "identical"
        runtime[key] += 1
    return summary


def summary_markdown(verdict: dict) -> str:
    lines = [f"# Parity gate: {'PASSED' if verdict['passed'] else 'FAILED'}", ""]
    lines += ["| stage/group | worst tensor | block | max abs diff | atol | ok |", "|---|---|---|---|---|---|"]
    for key, w in verdict["worst"].items():
        block = "" if w["block"] is None else w["block"]
        ok = "yes" if w["passed"] else "**NO**"
        lines.append(f"| {key} | {w['tensor']} | {block} | {w['max_abs_diff']:.3g} | {w['atol']:.3g} | {ok} |")
    if f := verdict["first_failure"]:
        lines += [
            "",
            f"First failing tap in forward order: block {f['block']} `{f['tap']}` "
            f"(max |diff| {f['max_abs_diff']:.3g}, atol {f['atol']:.3g}; previous tap "
            f"`{f['previous_tensor']}` {f['previous_max_abs_diff']}).",
        ]
    if verdict["problems"]:
        lines += ["", "## Problems", ""] + [f"- {p}" for p in verdict["problems"]]
    if verdict["generation"]:
        lines += ["", "## Greedy generation vs JAX (prompts per verdict)", ""]
        lines.append("| runtime | steps per prompt | identical | stopped at a near tie | differ |")
        lines.append("|---|---|---|---|---|")
        for name, g in verdict["generation"].items():
            lines.append(f"| {name} | {g['steps']} | {g['identical']} | {g['near_tie']} | {g['differ']} |")
    return "\n".join(lines) + "\n"


def gate(
    csv_paths: Sequence[Path],
    tol: Tolerances,
    verdict_path: Path,
    summary_path: Path | None = None,
    expect_stages: Sequence[str] = (),
    manifests: Mapping[str, Path] | None = None,
) -> int:
    """Write the verdict and summary; raise ``GptOssError`` (exit 1) naming the worst breach if it failed."""
    verdict = evaluate(read_rows(csv_paths), tol, expect_stages, manifests, csv_paths)
    with atomic_output(verdict_path) as tmp:
        tmp.write_text(json.dumps(verdict, indent=2, sort_keys=True) + "\n")
    with atomic_output(summary_path or verdict_path.with_suffix(".md")) as tmp:
        tmp.write_text(summary_markdown(verdict))
    for key, w in verdict["worst"].items():
        ok = "ok" if w["passed"] else "FAIL"
        log.info("%-26s %-34s max|diff| %.3g (atol %.3g) %s", key, w["tensor"], w["max_abs_diff"], w["atol"], ok)
    if not verdict["passed"]:
        first = verdict["first_failure"]
        where = f"; first failing tap in forward order: block {first['block']} {first['tap']}" if first else ""
        raise GptOssError(f"gate failed: {verdict['problems'][0]}{where}")
    log.info("gate passed: %s", ", ".join(f"{s}={n} rows" for s, n in verdict["stages"].items()))
    return 0
