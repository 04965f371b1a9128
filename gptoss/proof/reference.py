"""``gptoss parity --stage reference``: Hugging Face ``transformers`` ``GptOssForCausalLM`` against the Flax model,
``stage=reference`` rows in the parity CSV format. The reference is independent of our conversion: it reads the
checkpoint's raw tensors (:mod:`gptoss.runtimes.hf_transformers`).
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path

import numpy as np

from gptoss.model.params import Params
from gptoss.proof.compare import Results, compare_prompt, logits_diff, step_rows, token_row
from gptoss.proof.driver import JaxOutputs, JaxRequest, compare
from gptoss.proof.prompts import Prompt, padded
from gptoss.runtimes.hf_transformers import hf_forward, hf_model, transformers_generate

log = logging.getLogger("gptoss.reference")


def reference(
    checkpoint: Path, params: Params, results: Results, prompts: list[Prompt], sequence_length: int, steps: int = 0
) -> list[dict]:
    """Logits and hidden states of every prompt by JAX and by transformers. With ``steps``, both also generate that
    many tokens greedily from every prompt (JAX with its KV cache, transformers with ``generate``): ``decode_logits``
    rows per step and a ``greedy_tokens`` row (``tokens_transformers``)."""
    tolerances = results.tolerances
    suppress = tuple(params.config.eos_token_ids)

    def transformers_side(jax: JaxOutputs) -> tuple[list[dict], dict[str, np.ndarray]]:
        log.info("transformers side: %s, %d layers", checkpoint, params.model_config.num_hidden_layers)
        model = hf_model(checkpoint, params.config)
        got = {p.prompt_id: hf_forward(model, padded(p, sequence_length)) for p in prompts}
        generated = {}
        if steps:
            generated = {p.prompt_id: transformers_generate(model, p.ids, steps, suppress) for p in prompts}
        del model
        gc.collect()
        rows, diffs = [], {}
        for prompt in prompts:
            with jax.forward(prompt) as ref:
                rows += list(compare_prompt("reference", prompt, ref, got[prompt.prompt_id], tolerances))
                diffs[prompt.prompt_id] = logits_diff(prompt, ref, got[prompt.prompt_id])
            if steps:
                ours = jax.generation(prompt)
                ours.logits = [step[-1:] for step in ours.logits]  # transformers returns the last position's
                theirs = generated[prompt.prompt_id]
                rows += step_rows("reference", prompt, ours, theirs, tolerances)
                rows.append(token_row("reference", prompt, "transformers", ours, theirs.tokens, suppress, tolerances))
        return rows, diffs

    request = JaxRequest(prompts, sequence_length, hidden_states=True, generate_tokens=steps, suppress=suppress)
    return compare("reference", params, request, transformers_side, results)
