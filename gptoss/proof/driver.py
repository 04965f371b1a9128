"""The JAX side of every comparison stage, run in a process of its own, its outputs spilled to disk."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from gptoss.model.gpt_oss import forward
from gptoss.model.outputs import output_names
from gptoss.proof.prompts import Prompt, padded
from gptoss.runtimes.jax_model import jax_generate, load_model


def spill_jax_outputs(
    params: Path,
    config: Path | None,
    prompts: list[Prompt],
    sequence_length: int | None,
    hidden: bool,
    debug: bool,
    spill: Path,
    generate_tokens: int = 0,
    suppress: Sequence[int] = (),
) -> None:
    """Run the Flax model on every prompt: write ``spill/{prompt_id}.npz`` (the forward pass's outputs, unless
    ``sequence_length`` is None) and, with ``generate_tokens``, its greedy generation with the KV cache to
    ``spill/{prompt_id}.generation.npz``.

    The stages run it :func:`in_fresh_process`, because what JAX holds after a run (compiled programs, buffers
    its allocator keeps) stays with the process: on the 24-layer 20b that was 3 GB under the ONNX Runtime side
    that follows.
    """
    params_cfg, model = load_model(params, config)
    names = output_names(params_cfg.model, hidden, debug)
    for prompt in prompts:
        if sequence_length is not None:
            outputs = forward(model, jnp.asarray(padded(prompt, sequence_length)), hidden, debug)
            np.savez(spill / f"{prompt.prompt_id}.npz", **{n: np.asarray(outputs[n]) for n in names})
            del outputs
        if generate_tokens:
            generation = jax_generate(model, prompt.ids, generate_tokens, suppress)
            generation.save(spill / f"{prompt.prompt_id}.generation.npz")
