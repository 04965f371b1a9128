"""What a runtime's greedy generation yields, and how every runtime's loop chooses a token.

Each runtime runs its own loop from the same prompt (``jax_model``, ``onnx_runtime``, ``genai``,
``hf_transformers``). End-of-sequence ids are suppressed so every loop runs all its steps. Step 0 reads the prompt
and chooses the first token; step ``i`` feeds token ``i-1`` and chooses token ``i``. Only numpy here: the
comparison of generations imports it without loading a runtime.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np


@dataclasses.dataclass
class Generation:
    """A runtime's greedy tokens and the logits each step chose from (step 0: every prompt position)."""

    tokens: list[int]
    logits: list[np.ndarray]  # step 0: [prompt, vocab]; step i: [1, vocab]

    def save(self, path: Path) -> None:
        np.savez(path, tokens=np.asarray(self.tokens), **{f"step_{i}": x for i, x in enumerate(self.logits)})

    @classmethod
    def load(cls, path: Path) -> Generation:
        with np.load(path) as data:
            steps = sorted((k for k in data.files if k.startswith("step_")), key=lambda k: int(k[5:]))
            return cls([int(t) for t in data["tokens"]], [data[k] for k in steps])


def choose(logits: np.ndarray, suppress: Sequence[int]) -> int:
    """The greedy token of one position's logits, never a suppressed (end-of-sequence) id."""
    allowed = np.array(logits, dtype=np.float32, copy=True)
    allowed[list(suppress)] = -np.inf
    return int(allowed.argmax())


def top2_margin(logits: np.ndarray, suppress: Sequence[int]) -> float:
    """How far the greedy token's logit is above the runner-up's (suppressed ids excluded)."""
    allowed = np.array(logits, dtype=np.float64, copy=True)
    allowed[list(suppress)] = -np.inf
    top = np.partition(allowed, -2)[-2:]
    return float(top[1] - top[0])
