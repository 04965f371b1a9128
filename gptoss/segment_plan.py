"""Parity in segments: the pieces a whole graph's parity is split into, one job each (config
``parity_segment_blocks``), and the names of the files each segment has. Pure Python: the workflow reads the plan
and the names while it parses the Snakefile.

A piece is named by its *ranks*: 0 is the embedding, ``i + 1`` block ``i``, ``layers + 1`` the final norm and the
unembedding (the head)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from gptoss.errors import GptOssError


@dataclasses.dataclass(frozen=True)
class Segment:
    """One segment: the pieces of ranks ``first`` to ``last``."""

    name: str
    first: int
    last: int

    @property
    def blocks(self) -> range:
        """The transformer blocks it holds (none for the embedding and the head)."""
        return range(max(self.first, 1) - 1, self.last) if self.name.startswith("blocks") else range(0)


def plan_segments(layers: int, blocks_per_segment: int) -> list[Segment]:
    """The embedding, the blocks in groups of ``blocks_per_segment`` (the last group may be shorter), the head."""
    if layers < 1:
        raise GptOssError(f"a model of {layers} layers has no blocks to segment")
    if blocks_per_segment < 1:
        raise GptOssError(f"parity segments need at least one block each, got {blocks_per_segment}")
    segments = [Segment("embed", 0, 0)]
    for start in range(0, layers, blocks_per_segment):
        end = min(start + blocks_per_segment, layers) - 1
        segments.append(Segment(f"blocks{start:02d}-{end:02d}", start + 1, end + 1))
    return segments + [Segment("head", layers + 1, layers + 1)]


def parse_segment(name: str, layers: int) -> Segment:
    """The segment called ``name`` (``embed``, ``blocks{a}-{b}``, ``head``) of a model of ``layers`` blocks."""
    if name == "embed":
        return Segment(name, 0, 0)
    if name == "head":
        return Segment(name, layers + 1, layers + 1)
    first, dash, last = name.removeprefix("blocks").partition("-")
    if name.startswith("blocks") and dash and first.isdigit() and last.isdigit():
        if int(first) <= int(last) < layers:
            return Segment(name, int(first) + 1, int(last) + 1)
    raise GptOssError(f"segment {name!r}: expected embed, head or blocksA-B with 0 <= A <= B < {layers}")


def segment_path(onnx_path: Path | str, segment: str) -> Path:
    """``onnx/debug.onnx`` → ``onnx/debug.seg_{segment}.onnx``: beside the whole graph and its weights file."""
    return Path(onnx_path).with_name(f"{Path(onnx_path).stem}.seg_{segment}.onnx")


def manifest_path(onnx_path: Path | str) -> Path:
    """``onnx/debug.onnx`` → ``onnx/debug.tensors.json``: the sha256 of every tensor of the whole graph."""
    return Path(onnx_path).with_name(f"{Path(onnx_path).stem}.tensors.json")


def tensors_path(csv: Path | str) -> Path:
    """``parity/debug/blocks00-03.csv`` → ``parity/debug/blocks00-03.tensors.json``: the sha256 of every weight
    the segment's graph read in its parity run."""
    return Path(csv).with_suffix(".tensors.json")


def carry_path(csv: Path | str) -> Path:
    """``parity/debug/blocks00-03.csv`` → ``parity/debug/blocks00-03.carry.npz``: the states its parity left for
    the next segment."""
    return Path(csv).with_suffix(".carry.npz")
