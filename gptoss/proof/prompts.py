"""Parity prompts: text tokenized with the checkpoint's tokenizer or literal token ids, right-padded."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gptoss.errors import GptOssError

if TYPE_CHECKING:  # the gate reads prompts without loading JAX
    from gptoss.model.params import Params

PAD_ID = 0


@dataclass(frozen=True)
class Prompt:
    prompt_id: str
    ids: list[int]


def prompt_inputs(
    params: Params, prompts: Sequence[str], token_ids: Sequence[str], tokenizer: Path | None, length: int | None
) -> list[Prompt]:
    """Prompts (tokenized with ``tokenizer``, else the one the params config records) and/or literal
    comma-separated token id lists, each at most ``length`` tokens (None: any length)."""
    tokenizer = tokenizer or (Path(params.config.tokenizer) if params.config.tokenizer else None)
    resolved: list[Prompt] = []
    if prompts:
        from gptoss.formats.tokenizer import encode, load_tokenizer

        if tokenizer is None:
            raise GptOssError("no tokenizer: the params config records none; pass --tokenizer or --token-ids")
        loaded = load_tokenizer(tokenizer)
        resolved += [Prompt(f"p{i}", encode(loaded, text)) for i, text in enumerate(prompts)]
    for i, text in enumerate(token_ids):
        try:
            resolved.append(Prompt(f"t{i}", [int(t) for t in text.replace(" ", "").split(",") if t]))
        except ValueError:
            raise GptOssError(f"--token-ids {text!r}: expected comma-separated integers") from None
    if not resolved:
        raise GptOssError("nothing to compare: pass at least one --prompt or --token-ids")
    for p in resolved:
        if not p.ids:
            raise GptOssError(f"prompt {p.prompt_id} has no tokens")
        if length is not None and len(p.ids) > length:
            raise GptOssError(
                f"prompt {p.prompt_id} has {len(p.ids)} tokens, more than --sequence-length {length} "
                "(prompts are never truncated)"
            )
    return resolved


def padded(prompt: Prompt, sequence_length: int) -> np.ndarray:
    """``[1, sequence_length]`` int32, right-padded: causal attention keeps real positions independent of padding."""
    ids = np.full((1, sequence_length), PAD_ID, dtype=np.int32)
    ids[0, : len(prompt.ids)] = prompt.ids
    return ids
