"""Greedy generation by every runtime that can run the model, and the comparison of what they generated.

Each runtime runs its own loop from the same prompt: the Flax model with its KV cache (JAX), the decoder graph in
ONNX Runtime (our loop), onnxruntime-genai's ``Generator`` on the graph's folder, and transformers'
``generate(do_sample=False)``. End-of-sequence ids are suppressed so every loop runs all its steps. Step 0 reads
the prompt and chooses the first token; step ``i`` feeds token ``i-1`` and chooses token ``i``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gptoss.errors import GptOssError
from gptoss.names import INPUT_NAME, MASK_NAME, PAST_PREFIX, PRESENT_PREFIX


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


def jax_generate(model, prompt: Sequence[int], steps: int, suppress: Sequence[int]) -> Generation:
    """The Flax model's greedy loop with its KV cache (:func:`gptoss.model.decode_step`)."""
    import jax.numpy as jnp

    from gptoss.model import decode_step

    cfg = model.cfg
    empty = jnp.zeros((1, cfg.num_key_value_heads, 0, cfg.head_dim), jnp.float32)
    past = [(empty, empty)] * cfg.num_hidden_layers
    ids, out = np.asarray([prompt], np.int32), Generation([], [])
    for _ in range(steps):
        total = len(prompt) + len(out.tokens)
        logits, past = decode_step(model, jnp.asarray(ids), jnp.ones((1, total), jnp.int32), past)
        out.logits.append(np.asarray(logits)[0])
        out.tokens.append(choose(out.logits[-1][-1], suppress))
        ids = np.asarray([[out.tokens[-1]]], np.int32)
    return out


def ort_generate(session, prompt: Sequence[int], steps: int, suppress: Sequence[int]) -> Generation:
    """The decoder graph's greedy loop in ONNX Runtime: ``present.*`` fed back as ``past_key_values.*``."""
    past = empty_past(session, 1)
    ids, out = np.asarray([prompt], np.int64), Generation([], [])
    for _ in range(steps):
        mask = np.ones((1, len(prompt) + len(out.tokens)), np.int64)
        logits, past = ort_step(session, ids, mask, past)
        out.logits.append(logits[0])
        out.tokens.append(choose(out.logits[-1][-1], suppress))
        ids = np.asarray([[out.tokens[-1]]], np.int64)
    return out


def batched_ort_run(session, ids: np.ndarray, mask: np.ndarray, step_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A batch through the decoder graph: the prefill of ``ids`` (``mask`` 0 on padding), then one step of
    ``step_ids``; the logits of both."""
    prefill, past = ort_step(session, ids, mask, empty_past(session, len(ids)))
    mask = np.concatenate([mask, np.ones_like(step_ids)], axis=1)
    step, _ = ort_step(session, step_ids, mask, past)
    return prefill, step


def empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """No cache yet: every ``past_key_values.*`` input with 0 positions."""
    inputs = [i for i in session.get_inputs() if i.name.startswith(PAST_PREFIX)]
    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32) for i in inputs}


def ort_step(
    session, ids: np.ndarray, mask: np.ndarray, past: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One run of the decoder graph: the logits, and the presents as the next run's past."""
    past_length = next(iter(past.values())).shape[2]
    if mask.shape[1] != past_length + ids.shape[1]:
        raise GptOssError(
            f"attention_mask has {mask.shape[1]} positions; past {past_length} + new {ids.shape[1]} needs "
            f"{past_length + ids.shape[1]}"
        )
    names = [o.name for o in session.get_outputs()]
    results = dict(zip(names, session.run(names, {INPUT_NAME: ids, MASK_NAME: mask, **past}), strict=True))
    return results["logits"], {name: results[name.replace(PAST_PREFIX, PRESENT_PREFIX)] for name in past}


def genai_generate_all(folder: Path, prompts: list[list[int]], steps: int) -> list[list[int]]:
    """onnxruntime-genai's ``Generator`` on the decoder folder (the model loaded once), greedy from every prompt,
    end-of-sequence held off by min_length."""
    import onnxruntime_genai as og

    model = og.Model(str(folder))
    generated = []
    for prompt in prompts:
        params = og.GeneratorParams(model)
        length = len(prompt) + steps
        params.set_search_options(do_sample=False, max_length=length, min_length=length)
        generator = og.Generator(model, params)
        generator.append_tokens(list(prompt))
        while not generator.is_done():
            generator.generate_next_token()
        generated.append([int(t) for t in generator.get_sequence(0)[len(prompt) :]])
    return generated


def transformers_generate(model, prompt: Sequence[int], steps: int, suppress: Sequence[int]) -> Generation:
    """transformers' ``generate(do_sample=False)``; its raw logits per step (``output_logits``)."""
    import torch

    ids = torch.tensor([list(prompt)], dtype=torch.int64)
    with torch.no_grad():
        result = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=steps,
            min_new_tokens=steps,
            eos_token_id=list(suppress) or None,
            pad_token_id=list(suppress)[0] if suppress else 0,
            output_logits=True,
            return_dict_in_generate=True,
        )
    tokens = [int(t) for t in result.sequences[0, len(prompt) :]]
    return Generation(tokens, [step.numpy() for step in result.logits])


def compare_tokens(
    reference: Generation, tokens: Sequence[int], suppress: Sequence[int], margin: float
) -> tuple[int, bool, bool]:
    """Tokens against the reference's: ``(steps compared, near tie, failed)``. A first difference where the
    reference's top-2 logits are within ``margin`` is a near tie: later tokens follow another prefix and are not
    compared. Any other difference (or a missing token) fails."""
    for step, want in enumerate(reference.tokens):
        got = tokens[step] if step < len(tokens) else None
        if got != want:
            near_tie = got is not None and top2_margin(reference.logits[step][-1], suppress) < margin
            return step + 1, near_tie, not near_tie
    return len(reference.tokens), False, False
