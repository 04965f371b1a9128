"""The gate's check that parity in segments covers the whole graph: every segment's CSV comes with the sha256 of
every weight its graph read (``.tensors.json``, written by :func:`gptoss.proof.parity.parity_segment`), and those
must be, tensor for tensor, the whole graph's (its manifest, written by ``gptoss export --segment-blocks``), with
no tensor of the whole graph left out and no planned segment missing."""

from __future__ import annotations

import json
from pathlib import Path

from gptoss.errors import GptOssError
from gptoss.files import sha256


def tensors_path(csv: Path) -> Path:
    """``parity/debug/blocks00-03.csv`` → ``parity/debug/blocks00-03.tensors.json``."""
    return Path(csv).with_suffix(".tensors.json")


def _read(path: Path, what: str) -> dict:
    if not path.is_file():
        raise GptOssError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise GptOssError(f"{path}: not a {what} ({exc})") from None


def check_coverage(rows: list[dict], stage: str, manifest_path: Path) -> tuple[list[str], dict, list[dict]]:
    """The segments of ``stage`` (its rows' CSVs) against the whole graph's manifest. Returns the problems (each
    naming the segment and the tensor), the whole graph's ``{stage, onnx_sha256, data_sha256}`` (what promotion
    checks) and one record per segment."""
    manifest = _read(Path(manifest_path), "tensor manifest")
    whole, problems, segments = manifest["tensors"], [], []
    covered: set[str] = set()
    for source in sorted({r["source"] for r in rows if r["stage"] == stage}):
        sidecar = tensors_path(Path(source))
        if not sidecar.is_file():
            problems.append(f"{stage} CSV {source} has no {sidecar.name}: not a segment's parity")
            continue
        digest = sha256(sidecar)
        record = _read(sidecar, "segment tensor record")
        name = record["segment"]
        if any(r.get("data_sha256") != digest or r.get("onnx_sha256") != record["onnx_sha256"]
               for r in rows if r["source"] == source):  # fmt: skip
            problems.append(f"{stage} segment {name}: {sidecar.name} is not the one its CSV's rows were written with")
        for tensor, found in sorted(record["tensors"].items()):
            want = whole.get(tensor)
            if want is None:
                problems.append(f"{stage} segment {name}: tensor {tensor} is not in the whole graph {manifest['onnx']}")
            elif want != found:
                problems.append(
                    f"{stage} segment {name}: tensor {tensor} is not the whole graph's bytes (sha256 {found[:12]}… "
                    f"against {want[:12]}… in {manifest['onnx']})"
                )
            else:
                covered.add(tensor)
        segments.append({"segment": name, "onnx": record["onnx"], "onnx_sha256": record["onnx_sha256"],
                         "tensors": len(record["tensors"])})  # fmt: skip
    found_segments = {s["segment"] for s in segments}
    problems += [f"{stage} segment {s} has no parity CSV" for s in manifest["segments"] if s not in found_segments]
    if uncovered := sorted(set(whole) - covered):
        more = "..." if len(uncovered) > 3 else ""
        problems.append(
            f"{stage}: {len(uncovered)} tensors of {manifest['onnx']} are covered by no segment: "
            f"{', '.join(uncovered[:3])}{more}"
        )
    graph = {"stage": stage, "onnx_sha256": manifest["onnx_sha256"], "data_sha256": manifest["data_sha256"]}
    return problems, graph, segments
