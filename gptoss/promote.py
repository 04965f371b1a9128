"""``gptoss promote``: copy a gated graph to its destination with a manifest of what was verified.

Refuses unless the verdict passed **and** the sha256 of the ``.onnx`` and ``.onnx.data`` being promoted
equal those a parity run verified. The destination is assembled in a temporary folder and renamed into
place, so it either holds a complete, verified artifact or is left as it was.
"""

from __future__ import annotations

import functools
import json
import logging
import platform
import shutil
import subprocess
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

import onnx

from gptoss import __version__
from gptoss.config import ParamsConfig, read_json
from gptoss.errors import GptOssError
from gptoss.files import atomic_output, require_free_space, sha256
from gptoss.graphs.genai import GENAI_CONFIG, check_folder, companion_files
from gptoss.graphs.names import data_path

log = logging.getLogger("gptoss.promote")

PACKAGES = ("jax", "jaxlib", "flax", "jax2onnx", "onnx", "onnxruntime", "numpy")


def versions() -> dict[str, str]:
    installed = {d.metadata["Name"].lower(): d.version for d in metadata.distributions()}
    found = {name: installed.get(name, "not installed") for name in PACKAGES}
    return {"python": platform.python_version(), "gptoss": __version__} | found


def git_commit() -> str:
    """The project's git commit (with ``-dirty`` if the tree has changes), or ``unknown``."""
    root = Path(__file__).resolve().parent.parent
    git = functools.partial(subprocess.run, cwd=root, capture_output=True, text=True, check=True)
    try:
        commit = git(["git", "rev-parse", "HEAD"])
        dirty = git(["git", "status", "--porcelain", "--untracked-files=no"])
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def verified_stage(verdict: dict, onnx_sha: str, data_sha: str) -> str:
    for graph in verdict.get("graphs", []):
        if graph["onnx_sha256"] == onnx_sha and graph["data_sha256"] == data_sha:
            return graph["stage"]
    raise GptOssError(
        f"the files to promote (onnx sha256 {onnx_sha[:12]}…, data {data_sha[:12]}…) are not the ones the parity "
        "run verified; re-run parity and the gate on them"
    )


def provenance(onnx_path: Path, verdict: dict, params_cfg: ParamsConfig | None) -> dict:
    """The manifest's entries on where the graph comes from and how it was verified (the promotion adds its own)."""
    imports = onnx.load(str(onnx_path), load_external_data=False).opset_import
    opset = next((o.version for o in imports if o.domain in ("", "ai.onnx")), None)
    model = None
    if params_cfg is not None:
        model = {
            "layers": params_cfg.model.num_hidden_layers,
            "source_layers": params_cfg.source_layers,
            "weight_format": params_cfg.weight_format,
            "config": params_cfg.model.to_hf_dict(),
        }
    return {
        "checkpoint": params_cfg.checkpoint_info() if params_cfg else None,
        "model": model,
        "opset": opset,
        "tolerances": verdict["tolerances"],
        "worst_differences": verdict["worst"],
        "parity_stages": verdict["stages"],
        "generation": verdict.get("generation", {}),
        "versions": versions(),
        "project_commit": git_commit(),
    }


def readme(m: dict) -> str:
    lines = [f"# {m['tag']}", "", "ONNX graph promoted by `gptoss promote` after passing the parity gate.", ""]
    if m["checkpoint"]:
        lines.append(f"- checkpoint: {', '.join(f'{k} `{v}`' for k, v in m['checkpoint'].items())}")
    if model := m["model"]:
        lines.append(f"- layers: {model['layers']} of {model['source_layers']}, weight format {model['weight_format']}")
    lines += [
        f"- opset {m['opset']}, verified sequence length {m['sequence_length']}",
        "",
        "| stage/group | worst tensor | max abs diff | atol |",
        "|---|---|---|---|",
    ]
    for key, w in m["worst_differences"].items():
        lines.append(f"| {key} | {w['tensor']} | {w['max_abs_diff']:.3g} | {w['atol']:.3g} |")
    lines += [
        "",
        "Files and sha256 are in `manifest.json`. `model.onnx`: inputs `input_ids [batch, sequence]` (int32), "
        "output `logits [batch, sequence, vocab]` (float32).",
    ]
    if any(f["name"] == GENAI_CONFIG for f in m["files"]):
        steps = {name: g["steps"] for name, g in m["generation"].items()}
        lines += [
            "",
            "This folder is also a KV-cache decoder for onnxruntime-genai (`genai_config.json`, the graph it names, "
            f"the shared `model.onnx.data`); its greedy tokens equal JAX's ({steps} steps).",
            "",
            "```python",
            "import onnxruntime_genai as og",
            'model = og.Model(".")  # this folder',
            "params = og.GeneratorParams(model)",
            "params.set_search_options(do_sample=False, max_length=64)",
            "generator = og.Generator(model, params); generator.append_tokens([1, 2, 3])",
            "while not generator.is_done(): generator.generate_next_token()",
            "```",
        ]
    return "\n".join(lines) + "\n"


def verified_files(
    onnx_path: Path, verdict: dict, digest: Callable[[Path], str] = sha256, stage: str | None = None
) -> tuple[dict[Path, str], str]:
    """A graph's files (path -> sha256 by ``digest``: the graph and its weights, and for the decoder
    genai_config.json and the tokenizer files) and the stage whose parity run verified them; refuses files parity
    did not verify, and a decoder whose genai_config.json disagrees with its graph."""
    data = data_path(onnx_path)
    for path in (onnx_path, data):
        if not path.is_file():
            raise GptOssError(f"{path}: file to promote not found")
    hashes = {onnx_path: digest(onnx_path), data: digest(data)}
    verified = verified_stage(verdict, hashes[onnx_path], hashes[data])
    if stage == "decoder":
        config = check_folder(onnx_path.parent)
        if config["model"]["decoder"]["filename"] != onnx_path.name or verified != "decoder":
            raise GptOssError(f"{onnx_path}: not the decoder graph the gate verified and genai_config.json names")
        hashes |= {p: digest(p) for p in companion_files(onnx_path.parent)}
    return hashes, verified


def copy_checked(files: dict[Path, str], folder: Path, renamed: dict[Path, str] | None = None) -> list[dict]:
    """Copy ``files`` (path -> sha256) into the new ``folder`` (``renamed``: path -> name there), each copy checked
    against its sha256; the manifest's list of files."""
    folder.mkdir()
    listed = []
    for path, expected in files.items():
        copy = folder / (renamed or {}).get(path, path.name)
        shutil.copyfile(path, copy)
        if sha256(copy) != expected:
            raise GptOssError(f"{copy}: copy differs from {path} (disk problem?)")
        listed.append({"name": copy.name, "bytes": copy.stat().st_size, "sha256": expected})
    return listed


def promote(
    onnx_path: Path,
    verdict_path: Path,
    dest: Path,
    tag: str,
    config: Path | None = None,
    sequence_length: int | None = None,
    decoder: Path | None = None,
) -> Path:
    """``dest``: the canonical graph as ``model.onnx`` with its weights ``model.onnx.data`` and, with ``decoder``
    (a decoder graph in the same folder, sharing those weights), that graph, ``genai_config.json`` and the
    tokenizer files, so that ``onnxruntime_genai.Model(dest)`` generates; ``manifest.json`` lists every file with
    its sha256 and the generation verdict; ``README.md``. Files are copied and checked (a hard link would make
    ``onnx.load`` refuse the weights file)."""
    verdict = read_json(verdict_path)
    if verdict.get("passed") is not True:
        raise GptOssError(f"{verdict_path}: the gate did not pass; nothing promoted")
    digest = functools.cache(sha256)  # the graphs share their weights file: hash it once
    files, stage = verified_files(onnx_path, verdict, digest)
    if decoder is not None:
        if data_path(decoder) != data_path(onnx_path):
            raise GptOssError(f"{decoder}: the decoder must share the canonical graph's {data_path(onnx_path)}")
        files |= verified_files(decoder, verdict, digest, "decoder")[0]
    params_cfg = ParamsConfig.read(config) if config else None

    require_free_space(dest.parent, sum(p.stat().st_size for p in files), f"promoting into {dest}")
    with atomic_output(dest) as staging:
        listed = copy_checked(files, staging, {onnx_path: "model.onnx"})
        m = {"tag": tag, "files": listed, "verified_by_stage": stage, "sequence_length": sequence_length}
        m |= provenance(onnx_path, verdict, params_cfg) | {"verdict_sha256": sha256(verdict_path)}
        (staging / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
        (staging / "README.md").write_text(readme(m))
    log.info("promoted %s%s as %s into %s", onnx_path.name, f" and {decoder.name}" if decoder else "", tag, dest)
    return dest


def variant_readme(m: dict) -> str:
    stats = m["quality"]["measured"]
    lines = [f"# {m['tag']}", "", f"Quantized variant `{m['variant']}` of the exact decoder graph, promoted by "
             "`gptoss promote --variant` after passing the quality gate.", ""]  # fmt: skip
    if m["checkpoint"]:
        lines.append(f"- checkpoint: {', '.join(f'{k} `{v}`' for k, v in m['checkpoint'].items())}")
    exact = m["measured_against"]
    lines += [
        f"- measured against the exact decoder graph sha256 `{exact['exact_onnx_sha256'][:16]}…` (weights "
        f"`{exact['exact_data_sha256'][:16]}…`), which the parity gate verified",
        "",
        "| statistic | value |",
        "|---|---|",
    ]
    lines += [f"| {k} | {v:.4g} |" for k, v in stats.items() if v is not None]
    lines += ["", "| budget | value | bound | ok |", "|---|---|---|---|"]
    for name, s in m["quality"]["statistics"].items():
        bound = ("≤ " if s["direction"] == "max" else "≥ ") + f"{s['budget']:g}"
        lines.append(f"| {name} | {s['value']:.4g} | {bound} | {'yes' if s['passed'] else 'no'} |")
    lines += [
        "",
        "Files and sha256 are in `manifest.json`; the folder is an onnxruntime-genai model (`og.Model('.')`).",
    ]
    return "\n".join(lines) + "\n"


def promote_variant(
    folder: Path,
    variant: str,
    quality_verdict_path: Path,
    parity_verdict_path: Path,
    dest: Path,
    tag: str,
    config: Path | None = None,
) -> Path:
    """``dest``: the quantized ``variant``'s decoder folder (its graph, weights, ``genai_config.json`` and tokenizer
    files) with ``manifest.json`` and ``README.md``. Refuses unless the quality gate passed this variant on these
    very files (sha256) and the exact graph they were measured against is one the parity gate verified."""
    quality = read_json(quality_verdict_path)
    parity = read_json(parity_verdict_path)
    entry = quality.get("variants", {}).get(variant)
    if entry is None or entry.get("passed") is not True:
        raise GptOssError(f"{quality_verdict_path}: the quality gate did not pass variant {variant}; nothing promoted")
    if parity.get("passed") is not True:
        raise GptOssError(f"{parity_verdict_path}: the parity gate did not pass; nothing promoted")
    graphs = entry["graphs"]
    verified_stage(parity, graphs["exact_onnx_sha256"], graphs["exact_data_sha256"])  # the exact graph is proven
    config_json = check_folder(folder)
    onnx_path = folder / config_json["model"]["decoder"]["filename"]
    digest = functools.cache(sha256)
    files = {onnx_path: digest(onnx_path), data_path(onnx_path): digest(data_path(onnx_path))}
    if (files[onnx_path], files[data_path(onnx_path)]) != (
        graphs["variant_onnx_sha256"],
        graphs["variant_data_sha256"],
    ):
        raise GptOssError(
            f"{folder}: not the {variant} graph the quality gate measured (sha256 differs); re-run quality and the gate"
        )
    files |= {p: digest(p) for p in companion_files(folder)}
    params_cfg = ParamsConfig.read(config) if config else None

    require_free_space(dest.parent, sum(p.stat().st_size for p in files), f"promoting into {dest}")
    with atomic_output(dest) as staging:
        listed = copy_checked(files, staging)
        m = {
            "tag": tag,
            "variant": variant,
            "files": listed,
            "checkpoint": params_cfg.checkpoint_info() if params_cfg else None,
            "measured_against": graphs,
            "quality": {
                "statistics": entry["statistics"],
                "measured": entry["measured"],
                "top1_agreement_by_depth": entry.get("top1_agreement_by_depth", []),
            },
            "quality_verdict_sha256": sha256(quality_verdict_path),
            "parity_verdict_sha256": sha256(parity_verdict_path),
            "versions": versions(),
            "project_commit": git_commit(),
        }
        (staging / "manifest.json").write_text(json.dumps(m, indent=2, sort_keys=True) + "\n")
        (staging / "README.md").write_text(variant_readme(m))
    log.info("promoted variant %s as %s into %s", variant, tag, dest)
    return dest
