"""The gate's check that parity in segments covers the whole graph: every segment's CSV comes with the sha256 of
every weight its graph read (``.tensors.json``, written by :func:`gptoss.proof.parity.parity_segment`), and those
must be, tensor for tensor, the whole graph's (its manifest, written by ``gptoss manifest``), with no tensor of
the whole graph left out, no planned segment missing, and the segments chained: each started from the state the
one before it left (:mod:`gptoss.proof.segment_carry`)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from gptoss.errors import GptOssError
from gptoss.files import sha256
from gptoss.proof.segment_carry import Carry
from gptoss.segment_plan import carry_path, tensors_path


def _read(path: Path, what: str) -> dict:
    if not path.is_file():
        raise GptOssError(f"{path}: {what} not found")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise GptOssError(f"{path}: not a {what} ({exc})") from None


def check_coverage(
    rows: list[dict], stage: str, manifest_path: Path, csv_paths: Sequence[Path] = ()
) -> tuple[list[str], dict, list[dict]]:
    """The segments of ``stage`` (its rows' CSVs, and those of ``csv_paths`` whose record is of ``stage``: a
    canonical segment before the head compares nothing, as the whole canonical graph outputs only logits) against
    the whole graph's manifest, and their chain (each started from the state the one before it left). Returns the
    problems (each naming the segment and the tensor), the whole graph's ``{stage, onnx_sha256, data_sha256}``
    (what promotion checks) and one record per segment."""
    manifest = _read(Path(manifest_path), "tensor manifest")
    whole, problems, segments, records = manifest["tensors"], [], [], {}
    covered: set[str] = set()
    with_rows = {r["source"] for r in rows if r["stage"] == stage}
    for source in sorted(with_rows | set(map(str, csv_paths))):
        sidecar = tensors_path(Path(source))
        if not sidecar.is_file():
            if source in with_rows:
                problems.append(f"{stage} CSV {source} has no {sidecar.name}: not a segment's parity")
            continue
        record = _read(sidecar, "segment tensor record")
        if record.get("stage") != stage and source not in with_rows:
            continue  # another stage's segment
        digest, name = sha256(sidecar), record["segment"]
        records[name] = record | {"csv": Path(source), "sha256": digest}
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
    problems += [f"{stage} segment {s} has no parity CSV" for s in manifest["segments"] if s not in records]
    problems += _chain_problems(stage, manifest["segments"], records)
    if uncovered := sorted(set(whole) - covered):
        more = "..." if len(uncovered) > 3 else ""
        problems.append(
            f"{stage}: {len(uncovered)} tensors of {manifest['onnx']} are covered by no segment: "
            f"{', '.join(uncovered[:3])}{more}"
        )
    graph = {"stage": stage, "onnx_sha256": manifest["onnx_sha256"], "data_sha256": manifest["data_sha256"]}
    return problems, graph, segments


def _chain_problems(stage: str, planned: list[str], records: dict[str, dict]) -> list[str]:
    """Each planned segment after the first must have started from the carry that the segment before it left,
    as it is on disk, and that carry must come from that segment's recorded parity run."""
    problems = []
    for before, name in zip(planned, planned[1:], strict=False):
        if before not in records or name not in records:
            continue  # reported as missing
        entering, previous = records[name].get("entering"), records[before]
        carry = carry_path(previous["csv"])
        if not entering or entering.get("segment") != before:
            problems.append(f"{stage} segment {name}: did not start from the state segment {before} left")
        elif not carry.is_file() or sha256(carry) != entering["sha256"]:
            problems.append(
                f"{stage} segment {name}: started from a state of segment {before} that is not {carry.name} as it "
                "is now: run its parity again"
            )
        elif Carry.load(carry).tensors_sha256 != previous["sha256"]:
            problems.append(f"{stage} segment {before}: {carry.name} was not left by the parity run its CSV records")
    return problems
