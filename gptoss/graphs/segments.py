"""Parity in segments (:mod:`gptoss.segment_plan`): the files that tie each segment graph to the whole graph.

A segment graph (traced by :func:`gptoss.graphs.trace.build_segment_onnx`, written by
:func:`gptoss.graphs.export.export_segment`) sits beside the whole graph and reads the same ``model.onnx.data``;
its metadata says which segment it is. The whole graph's *manifest* holds the sha256 of every tensor it reads, and
each segment's parity run records the sha256 of every tensor the segment graph reads (:func:`tensor_sha256s`, the
bytes as ONNX Runtime reads them): the gate compares the two, so the proof covers every byte of the promoted
graph."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from onnx import TensorProto

from gptoss.errors import GptOssError
from gptoss.files import atomic_output, sha256
from gptoss.segment_plan import Segment, manifest_path

# The segment a graph is, as metadata (JSON): name, ranks first and last, the value entering it.
SEGMENT_KEY = "gptoss.segment"
CHUNK = 16 * 2**20
# The model's weights (a params name, or one expert's view of one); a graph's other initializers are constants of
# its trace, named by the tracer.
_MODEL_WEIGHT = re.compile(r"(embed|norm|unembed|layers\.\d+)\.")


def is_model_weight(name: str) -> bool:
    return bool(_MODEL_WEIGHT.match(name))


def segment_meta(model: onnx.ModelProto) -> dict | None:
    """The segment a graph is (:data:`SEGMENT_KEY`), or None for a whole graph."""
    props = {p.key: p.value for p in model.metadata_props}
    return json.loads(props[SEGMENT_KEY]) if SEGMENT_KEY in props else None


def is_segment(onnx_path: Path) -> bool:
    """Whether ``onnx_path`` is a segment graph (checked without its weights)."""
    return Path(onnx_path).is_file() and segment_meta(onnx.load(str(onnx_path), load_external_data=False)) is not None


def mark_segment(model: ir.Model, segment: Segment, entering: str | None) -> None:
    """Record in ``model`` which segment it is (:data:`SEGMENT_KEY`)."""
    meta = dict(name=segment.name, first=segment.first, last=segment.last, input=entering)
    model.metadata_props[SEGMENT_KEY] = json.dumps(meta, sort_keys=True)


def write_manifest(onnx_path: Path, segments: list[str], output: Path | None = None) -> dict:
    """The whole graph's tensor manifest (``output``, default :func:`manifest_path`): its sha256 and its weights
    file's, the names of the segments it is proven in, and every weight's sha256 (one pass over the weights
    file)."""
    model = onnx.load(str(onnx_path), load_external_data=False)
    manifest = {
        "onnx": onnx_path.name,
        "onnx_sha256": sha256(onnx_path),
        "segments": list(segments),
        **tensor_sha256s(model, onnx_path.parent, with_file=True),
    }
    with atomic_output(output or manifest_path(onnx_path)) as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def _external(tensor: TensorProto) -> dict[str, str] | None:
    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return {entry.key: entry.value for entry in tensor.external_data}


def tensor_sha256s(model: onnx.ModelProto, folder: Path, with_file: bool = False) -> dict:
    """``{"tensors": {name: sha256}}`` of every model weight ``model`` holds (its bytes as ONNX Runtime reads them:
    the external file's range, or the tensor's own data); ``with_file``: also ``data_sha256`` of the whole weights
    file, hashed in the same one pass over it."""
    digests: dict[str, hashlib._Hash] = {}
    ranges: list[tuple[int, int, str]] = []
    files = set()
    for tensor in (t for t in model.graph.initializer if is_model_weight(t.name)):
        digests[tensor.name] = hashlib.sha256()
        if (where := _external(tensor)) is None:
            digests[tensor.name].update(onnx.numpy_helper.to_array(tensor).tobytes())
            continue
        files.add(where["location"])
        ranges.append((int(where.get("offset", 0)), int(where["length"]), tensor.name))
    if len(files) > 1:
        raise GptOssError(f"the graph's weights are in {len(files)} files, not one: {sorted(files)}")
    result: dict = {"data_sha256": sha256(folder / "model.onnx.data")} if with_file and not files else {}
    if files:
        data = folder / files.pop()
        file_digest = _hash_ranges(data, sorted(ranges), digests, whole=with_file)
        if with_file:
            result["data_sha256"] = file_digest
    return result | {"tensors": {name: digest.hexdigest() for name, digest in sorted(digests.items())}}


def _hash_ranges(path: Path, ranges: list[tuple[int, int, str]], digests: dict, whole: bool) -> str | None:
    """Feed each ``(offset, length, name)`` range of ``path`` to its digest; ``whole``: read the file end to end
    once (and return its sha256), else read only the ranges."""
    if not path.is_file():
        raise GptOssError(f"{path}: weights file not found")
    size = path.stat().st_size
    if ranges and (end := max(o + n for o, n, _ in ranges)) > size:
        raise GptOssError(f"{path}: {size} bytes, but the graph reads up to byte {end}")
    file_digest = hashlib.sha256() if whole else None
    with open(path, "rb") as fh:
        if not whole:
            for offset, length, name in ranges:
                fh.seek(offset)
                for block in _blocks(fh, length):
                    digests[name].update(block)
            return None
        position = 0
        for block in _blocks(fh, size):
            file_digest.update(block)
            end = position + len(block)
            for offset, length, name in ranges:
                lo, hi = max(offset, position), min(offset + length, end)
                if lo < hi:
                    digests[name].update(block[lo - position : hi - position])
            position = end
    return file_digest.hexdigest()


def _blocks(fh, length: int) -> Iterator[bytes]:
    while length > 0 and (block := fh.read(min(CHUNK, length))):
        yield block
        length -= len(block)
