"""``gptoss plots``: the parity report's figures (matplotlib, PNG), from the parity CSVs and benchmark files.

- ``taps_heatmap.png``: max |diff| per block × tap (debug stage, worst prompt) on a log colour scale; cells over
  their tolerance are outlined in red, and the tolerances are marked on the colour bar.
- ``logits_hist.png``: histogram of every logits |diff| (log axes) with the logits tolerance.
- ``routing.png``: expert agreement and near ties per block.
- ``benchmarks.png``: wall time and peak memory per rule.
"""

from __future__ import annotations

import csv
import html
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gptoss.config import read_json
from gptoss.errors import GptOssError
from gptoss.files import atomic_output
from gptoss.model.outputs import BLOCK_TAPS
from gptoss.proof.compare import read_rows
from gptoss.proof.tolerances import Tolerances

log = logging.getLogger("gptoss.plots")
HEATMAP_TAPS = [t for t in BLOCK_TAPS if t != "expert_indices"] + ["hidden_state"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"figure.dpi": 110, "font.size": 9, "svg.hashsalt": "gptoss"})
    return plt


def _save(fig, path: Path) -> None:
    """Write and close the figure; no timestamp in the metadata, so the same inputs give the same bytes."""
    import matplotlib.pyplot as plt

    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        fig.savefig(fh, format="png", bbox_inches="tight", metadata={"Software": None})
    plt.close(fig)


def taps_heatmap(rows: list[dict], tol: Tolerances, path: Path) -> None:
    plt = _pyplot()
    from matplotlib.colors import LogNorm
    from matplotlib.lines import Line2D
    from matplotlib.patches import Rectangle

    debug = [r for r in rows if r["stage"] == "debug" and r["block"] is not None and r["group"] != "routing"]
    if not debug:
        raise GptOssError("no debug rows with block taps: run parity with --compare-block-debug")
    blocks = sorted({r["block"] for r in debug})
    grid = np.full((len(blocks), len(HEATMAP_TAPS)), np.nan)
    over = np.zeros_like(grid, dtype=bool)
    for r in debug:
        i, j = blocks.index(r["block"]), HEATMAP_TAPS.index(r["tap"])
        value = np.inf if r["nonfinite"] else r["max_abs_diff"]
        grid[i, j] = np.nanmax([grid[i, j], value])
        over[i, j] |= bool(value > tol.atol(r["group"]))
    finite = grid[np.isfinite(grid) & (grid > 0)]
    low = min(finite.min() if finite.size else 1e-8, tol.block_taps / 100)
    high = max(finite.max() if finite.size else 1e-3, max(tol.block_taps, tol.hidden_states) * 3)
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(HEATMAP_TAPS), 1.4 + 0.45 * len(blocks)))
    image = ax.imshow(np.clip(grid, low, high), norm=LogNorm(low, high), cmap="viridis", aspect="auto")
    for i, j in zip(*np.nonzero(over), strict=True):
        ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=2.5))
    for i in range(len(blocks)):
        for j in range(len(HEATMAP_TAPS)):
            if np.isfinite(grid[i, j]):
                ax.text(j, i, f"{grid[i, j]:.0e}", ha="center", va="center", fontsize=6.5, color="white")
    ax.set_xticks(range(len(HEATMAP_TAPS)), HEATMAP_TAPS, rotation=50, ha="right")
    ax.set_yticks(range(len(blocks)), [f"block {b}" for b in blocks])
    bar = fig.colorbar(image, ax=ax, label="max |diff| (log scale)")
    handles = [Rectangle((0, 0), 1, 1, fill=False, edgecolor="red", linewidth=2, label="over its tolerance")]
    for name, value, style in (("block taps", tol.block_taps, "-"), ("hidden states", tol.hidden_states, "--")):
        bar.ax.axhline(value, color="red", linestyle=style, linewidth=1.5)
        handles.append(Line2D([], [], color="red", linestyle=style, label=f"{name} atol {value:g} (colour bar)"))
    ax.legend(handles=handles, loc="upper center", bbox_to_anchor=(0.5, -0.8), ncol=3, fontsize=7, frameon=False)
    ax.set_title("Debug graph: max |JAX − ONNX Runtime| per block and tap (worst prompt)")
    _save(fig, path)


def logits_histogram(diffs_files: Sequence[Path], tol: Tolerances, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    for diffs_file in diffs_files:
        with np.load(diffs_file) as data:
            values = np.concatenate([data[k] for k in data.files]) if data.files else np.zeros(0)
        positive = values[values > 0]
        if positive.size:
            bins = np.logspace(np.log10(positive.min()), np.log10(max(positive.max(), tol.logits)), 60)
            label = f"{diffs_file.stem.split('_')[0]} ({values.size:,} values, {np.mean(values == 0):.0%} exact)"
            ax.hist(positive, bins=bins, histtype="step", linewidth=1.5, label=label)
    ax.axvline(tol.logits, color="red", linestyle="--", label=f"logits atol {tol.logits:g}")
    ax.set(xscale="log", yscale="log", xlabel="|logit JAX − logit ONNX Runtime|", ylabel="count")
    ax.legend(fontsize=7)
    ax.set_title("Logits differences, every real position and vocabulary entry")
    _save(fig, path)


def routing_plot(rows: list[dict], path: Path) -> None:
    plt = _pyplot()
    routing = [r for r in rows if r["group"] == "routing"]
    if not routing:
        raise GptOssError("no routing rows: run parity with --compare-block-debug")
    blocks = sorted({r["block"] for r in routing})
    agreement = [np.mean([float(r["expert_agreement"]) for r in routing if r["block"] == b]) for b in blocks]
    ties = [sum(int(r["near_ties"]) for r in routing if r["block"] == b) for b in blocks]
    fig, ax = plt.subplots(figsize=(1.5 + 0.8 * len(blocks), 3.0))
    bars = ax.bar([f"block {b}" for b in blocks], agreement, color="tab:green")
    for bar, tie in zip(bars, ties, strict=True):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{tie} near ties", ha="center", va="bottom")
    ax.set(ylim=(0, 1.15), ylabel="tokens routed to the same experts", title="Routing agreement (JAX vs ONNX Runtime)")
    _save(fig, path)


def benchmarks_plot(benchmark_files: Sequence[Path], path: Path) -> None:
    plt = _pyplot()
    names, seconds, rss = [], [], []
    for tsv in benchmark_files:
        with open(tsv) as fh:
            row = next(csv.DictReader(fh, delimiter="\t"))
        names.append(tsv.stem)
        seconds.append(float(row["s"]))
        rss.append(float(row["max_rss"]) / 1024 if row.get("max_rss") not in (None, "", "-", "NA") else 0.0)
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 0.6 + 0.32 * len(names)), sharey=True)
    left.barh(names, seconds, color="tab:blue")
    left.set_xlabel("wall time (s)")
    right.barh(names, rss, color="tab:orange")
    right.set_xlabel("peak RSS (GB)")
    left.invert_yaxis()
    fig.suptitle("Per-rule benchmarks (Snakemake benchmark files)")
    _save(fig, path)


def _html_page(path: Path, title: str, rows: list[tuple[str, str]]) -> None:
    """A titled two-column table as a small HTML page (the report shows HTML inline)."""
    cells = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in rows)
    style = (
        "<style>body{font-family:sans-serif} th{text-align:left;padding:2px 16px 2px 0} "
        "td{font-family:monospace}</style>"
    )
    with atomic_output(path) as tmp:
        tmp.write_text(f"<html><body>{style}<h3>{html.escape(title)}</h3><table>{cells}</table></body></html>\n")


def verdict_html(verdict: dict, path: Path) -> None:
    status = "PASSED" if verdict["passed"] else "FAILED"
    rows = [
        (key, f"{w['tensor']} max |diff| {w['max_abs_diff']:.3g} (atol {w['atol']:.3g})")
        for key, w in verdict["worst"].items()
    ]
    _html_page(path, f"Parity gate: {status}", rows + [("problems", "; ".join(verdict["problems"]) or "none")])


def manifest_html(manifest: dict, path: Path) -> None:
    rows = [(f["name"], f"{f['bytes']:,} bytes, sha256 {f['sha256']}") for f in manifest["files"]]
    model = {k: v for k, v in (manifest.get("model") or {}).items() if k != "config"}
    rows += [("checkpoint", json.dumps(manifest.get("checkpoint"))), ("model", json.dumps(model))]
    rows += [("opset / sequence length", f"{manifest.get('opset')} / {manifest.get('sequence_length')}")]
    rows += [("versions", ", ".join(f"{k} {v}" for k, v in manifest["versions"].items()))]
    rows += [("project commit", manifest.get("project_commit", ""))]
    _html_page(path, f"Promoted: {manifest['tag']}", rows)


def plots(
    csv_paths: Sequence[Path],
    diffs_files: Sequence[Path],
    benchmark_files: Sequence[Path],
    outdir: Path,
    tol: Tolerances,
    verdict: Path | None = None,
    manifest: Path | None = None,
) -> list[Path]:
    rows = read_rows(csv_paths)
    outdir.mkdir(parents=True, exist_ok=True)
    if verdict is not None:
        verdict_html(read_json(verdict), outdir / "gate.html")
    if manifest is not None:
        manifest_html(read_json(manifest), outdir / "manifest.html")
    written = [outdir / "taps_heatmap.png", outdir / "logits_hist.png", outdir / "routing.png"]
    taps_heatmap(rows, tol, written[0])
    logits_histogram(diffs_files, tol, written[1])
    routing_plot(rows, written[2])
    if benchmark_files:
        written.append(outdir / "benchmarks.png")
        benchmarks_plot(benchmark_files, written[-1])
    log.info("wrote %s", ", ".join(p.name for p in written))
    return written


def kld_histogram(values: dict[str, Path], path: Path) -> None:
    """Histogram of every scored position's KLD (log-x axis, share of positions), one step line per variant, as a
    PNG. KLD values of 0 (identical logits) are drawn in the first bin and counted in the legend."""
    loaded = {}
    for name, file in values.items():
        if not Path(file).is_file():
            raise GptOssError(f"{file}: KLD values (.npy from gptoss quality --kld-values) not found")
        loaded[name] = np.load(file).astype(np.float64).ravel()
    positive = np.concatenate([v[v > 0] for v in loaded.values()] + [np.zeros(0)])
    low, high = (max(positive.min(), 1e-12), positive.max()) if positive.size else (1e-12, 1e-11)
    bins = np.logspace(np.log10(low) - 0.05, np.log10(max(high, low * 10)) + 0.05, 60)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for name, v in loaded.items():
        label = f"{name}: mean {v.mean():.3g}, p99 {np.percentile(v, 99):.3g} ({v.size} positions"
        label += f", {int((v <= 0).sum())} at 0)" if (v <= 0).any() else ")"
        drawn = np.clip(v, bins[0], None)
        ax.hist(drawn, bins=bins, weights=np.full(v.size, 1 / max(v.size, 1)), histtype="step", linewidth=1.5,
                label=label)  # fmt: skip
    ax.set_xscale("log")
    ax.set_xlabel("KL(exact ‖ variant) per scored position (nats)")
    ax.set_ylabel("share of positions")
    ax.set_title("KL divergence of each variant from the exact decoder (evaluation text)")
    ax.legend(fontsize=7)
    _save(fig, path)


def depth_agreement_plot(rows: list[dict], path: Path) -> None:
    """The top-1 agreement per block depth (rows of ``gptoss quality --probe``), one line per variant, with its own
    head's ``top1_agreement`` drawn after the last block, as a PNG."""
    from gptoss.proof.depth import STATISTIC

    depth = [r for r in rows if r["statistic"] == STATISTIC and r.get("block") is not None]
    if not depth:
        raise GptOssError(f"no {STATISTIC} rows in the quality CSVs: run gptoss quality with --probe")
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    for variant in sorted({r["variant"] for r in depth}):
        mine = sorted((r for r in depth if r["variant"] == variant), key=lambda r: r["block"])
        blocks = [r["block"] for r in mine]
        line = ax.plot(
            blocks, [r["value"] for r in mine], marker="o", label=f"{variant} ({mine[0]['positions']} positions)"
        )
        own = [r["value"] for r in rows if r["variant"] == variant and r["statistic"] == "top1_agreement"]
        if own:
            ax.plot([blocks[-1] + 1], own[:1], marker="*", markersize=11, linestyle="", color=line[0].get_color(),
                    label=f"{variant}: top1_agreement, its own head")  # fmt: skip
    ticks = sorted({r["block"] for r in depth})
    ax.set_xticks([*ticks, ticks[-1] + 1], [str(b) for b in ticks] + ["head"])
    ax.set(ylim=(0, 1.05), xlabel="block depth (hidden state after the block)", ylabel="top-1 agreement")
    ax.set_title("Top-1 agreement per block depth (logit lens: the exact head on both models)")
    ax.legend(fontsize=7)
    _save(fig, path)
