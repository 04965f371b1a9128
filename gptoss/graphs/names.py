"""The names a graph's callers rely on: its inputs and outputs (onnxruntime-genai's for the decoder) and the
weights file every graph of a model shares. No heavy imports, so the gate, plots and promotion read them too."""

from __future__ import annotations

from pathlib import Path

INPUT_NAME = "input_ids"
# The decoder graph's other inputs and its outputs (onnxruntime-genai's names): per layer i, %d -> i.
MASK_NAME = "attention_mask"
PAST_PREFIX, PRESENT_PREFIX = "past_key_values.", "present."
PAST_KEY, PAST_VALUE = PAST_PREFIX + "%d.key", PAST_PREFIX + "%d.value"
PRESENT_KEY, PRESENT_VALUE = PRESENT_PREFIX + "%d.key", PRESENT_PREFIX + "%d.value"

WEIGHTS_FILE = "model.onnx.data"
# One expert of an expert weight ``[E, ...]`` as a weight of its own: the same bytes of the weights file.
EXPERT_VIEW = "{weight}@expert{expert}"


def data_path(onnx_path: Path) -> Path:
    """The weights of a graph: ``model.onnx.data`` in its folder, which every graph of a model there shares."""
    return onnx_path.with_name(WEIGHTS_FILE)


def is_data_input(name: str) -> bool:
    """The graph inputs a caller feeds (token ids, the decoder's mask and cache, a segment graph's hidden state);
    every other one is a weight."""
    return name in (INPUT_NAME, MASK_NAME) or name.startswith(PAST_PREFIX) or is_hidden_input(name)


def is_hidden_input(name: str) -> bool:
    """The hidden state entering a segment graph: ``block_0_input`` or ``hidden_state_{i}``."""
    return name == "block_0_input" or (name.startswith("hidden_state_") and name[13:].isdigit())


def expert_view(weight: str, expert: int) -> str:
    """The name of expert ``expert``'s part of ``weight`` (``[E, ...]``) as a weight of its own."""
    return EXPERT_VIEW.format(weight=weight, expert=expert)


def viewed_weight(name: str) -> tuple[str, int] | None:
    """``(weight, expert)`` of an :func:`expert_view` name, else ``None``."""
    weight, found, expert = name.rpartition("@expert")
    return (weight, int(expert)) if found and expert.isdigit() else None
