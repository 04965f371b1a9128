"""Parity in segments: the pieces a whole graph's parity is split into, one job each (config
``parity_segment_blocks``). Pure Python: the workflow reads the plan while it parses the Snakefile.

A piece is named by its *ranks*: 0 is the embedding, ``i + 1`` block ``i``, ``layers + 1`` the final norm and the
unembedding (the head)."""

from __future__ import annotations

import dataclasses

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
