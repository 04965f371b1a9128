"""``gptoss reference``: Hugging Face ``transformers`` ``GptOssForCausalLM`` vs the Flax model → ``stage=reference``
rows (logits, hidden states) in the parity CSV format.

The reference side is independent of our conversion: the checkpoint's raw tensors go into a transformers model
truncated to the same layers, MXFP4 experts dequantized by transformers' own ``convert_moe_packed_tensors``.
The two sides run one after the other (JAX outputs spilled to disk first), as in ``gptoss parity``.
"""

from __future__ import annotations

import gc
import logging
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gptoss.proof.compare import compare_prompt, logits_diff, step_rows, token_row, write_results
from gptoss.proof.driver import spill_jax_outputs
from gptoss.proof.prompts import padded, prompt_inputs
from gptoss.proof.tolerances import Tolerances
from gptoss.runtimes.generation import Generation
from gptoss.runtimes.hf_transformers import hf_forward, hf_model, transformers_generate
from gptoss.runtimes.process import in_fresh_process

log = logging.getLogger("gptoss.reference")


def reference(
    checkpoint: Path,
    params: Path,
    csv_path: Path,
    sequence_length: int,
    prompts: Sequence[str] = (),
    token_ids: Sequence[str] = (),
    tokenizer: Path | None = None,
    config: Path | None = None,
    tolerances: Tolerances | None = None,
    logits_diffs: Path | None = None,
    generate_tokens: int = 0,
) -> list[dict]:
    """Run JAX, then transformers, on every prompt; write the CSV (and the logits |diff| per prompt) atomically.

    With ``generate_tokens``, both also generate greedily from every prompt (JAX with its KV cache, transformers
    with ``generate``): ``decode_logits`` rows per step and a ``greedy_tokens`` row (``tokens_transformers``).
    """
    tolerances = tolerances or Tolerances()
    config, params_cfg, resolved = prompt_inputs(params, config, prompts, token_ids, tokenizer, sequence_length)
    suppress = params_cfg.eos_token_ids
    rows: list[dict] = []
    diffs: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory(prefix="gptoss-reference-") as spill_dir:
        spill = Path(spill_dir)
        log.info("JAX side: %d prompt(s), %d greedy steps", len(resolved), generate_tokens)
        jax_side = (params, config, resolved, sequence_length, True, False, spill, generate_tokens, suppress)
        in_fresh_process(spill_jax_outputs, *jax_side)
        log.info("transformers side: %s, %d layers", checkpoint, params_cfg.model.num_hidden_layers)
        model = hf_model(checkpoint, params_cfg)
        got = {p.prompt_id: hf_forward(model, padded(p, sequence_length)) for p in resolved}
        generated = {}
        if generate_tokens:
            generated = {p.prompt_id: transformers_generate(model, p.ids, generate_tokens, suppress) for p in resolved}
        del model
        gc.collect()
        for prompt in resolved:
            with np.load(spill / f"{prompt.prompt_id}.npz") as ref:
                rows += list(compare_prompt("reference", prompt, ref, got[prompt.prompt_id], tolerances))
                diffs[prompt.prompt_id] = logits_diff(prompt, ref, got[prompt.prompt_id])
            if generate_tokens:
                jax = Generation.load(spill / f"{prompt.prompt_id}.generation.npz")
                jax.logits = [step[-1:] for step in jax.logits]  # transformers returns the last position's
                theirs = generated[prompt.prompt_id]
                rows += step_rows("reference", prompt, jax, theirs, tolerances)
                rows.append(token_row("reference", prompt, "transformers", jax, theirs.tokens, suppress, tolerances))
    write_results(csv_path, rows, tolerances, diffs, logits_diffs)
    return rows
