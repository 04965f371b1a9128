"""The state one segment's parity hands the next (parity in segments): for every prompt, the hidden state leaving
the segment as JAX computed it and as ONNX Runtime computed it.

Each segment's ONNX Runtime side continues from ONNX Runtime's state, and its JAX side from JAX's: the segments,
run one after the other, compute what the whole graph and the whole model compute, drift included, so their rows
are the whole graph's rows. The carry also records the sha256 of the ``.tensors.json`` of the segment that left
it, so that the gate can follow the chain from the embedding to the head."""

from __future__ import annotations

import dataclasses
import json
import zipfile
from pathlib import Path

import numpy as np

from gptoss.errors import GptOssError
from gptoss.files import atomic_output
from gptoss.proof.prompts import Prompt

# The two sides a carry holds a state for, and the key of each prompt's token ids.
SIDES = ("jax", "onnxruntime")
_IDS = "ids"
_META = "carry"


@dataclasses.dataclass(frozen=True)
class Carry:
    """The states leaving segment ``segment`` (whose last piece has rank ``last``), per side and prompt id."""

    segment: str
    last: int
    tensors_sha256: str  # of the segment's .tensors.json (its parity's record)
    states: dict[str, dict[str, np.ndarray]] = dataclasses.field(default_factory=dict)  # also "ids": the prompts'

    def add(self, prompt: Prompt, **states: np.ndarray) -> None:
        """The states leaving the segment for ``prompt``, by side."""
        self.states.setdefault(_IDS, {})[prompt.prompt_id] = np.asarray(prompt.ids, dtype=np.int64)
        for side, value in states.items():
            self.states.setdefault(side, {})[prompt.prompt_id] = np.asarray(value)

    def state(self, side: str, prompt: Prompt, source: Path) -> np.ndarray:
        """The state ``side`` left for ``prompt`` (the same tokens); ``source``: the file, for the message."""
        ids = self.states.get(_IDS, {}).get(prompt.prompt_id)
        if ids is None or prompt.prompt_id not in self.states.get(side, {}):
            found = "no state" if ids is None else f"no {side} state"
        elif not np.array_equal(ids, prompt.ids):
            found = "the state of other tokens"
        else:
            return self.states[side][prompt.prompt_id]
        raise GptOssError(
            f"{source}: segment {self.segment}'s parity left {found} for prompt {prompt.prompt_id}: run it again "
            "with this run's prompts"
        )

    def save(self, path: Path) -> None:
        meta = {"segment": self.segment, "last": self.last, "tensors_sha256": self.tensors_sha256}
        arrays = {f"{side}:{pid}": value for side, by_prompt in self.states.items() for pid, value in by_prompt.items()}
        with atomic_output(path) as tmp, open(tmp, "wb") as fh:
            np.savez(fh, **{_META: np.array(json.dumps(meta))}, **arrays)

    @classmethod
    def load(cls, path: Path) -> Carry:
        if not Path(path).is_file():
            raise GptOssError(f"{path}: the state a segment's parity left (.carry.npz) not found")
        try:
            with np.load(path) as npz:
                meta = json.loads(str(npz[_META]))
                states: dict[str, dict[str, np.ndarray]] = {}
                for key in npz.files:
                    side, _, pid = key.partition(":")
                    if key != _META:
                        states.setdefault(side, {})[pid] = npz[key]
            return cls(meta["segment"], int(meta["last"]), meta["tensors_sha256"], states)
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as exc:
            raise GptOssError(f"{path}: not a segment's carried state ({exc})") from None
