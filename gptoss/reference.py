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

from gptoss.checkpoint import Checkpoint
from gptoss.compare import compare_prompt, logits_diff, step_rows, token_row, write_results
from gptoss.config import ParamsConfig
from gptoss.errors import GptOssError
from gptoss.generation import Generation, transformers_generate
from gptoss.prompts import Prompt, padded, prompt_inputs
from gptoss.runtime import in_fresh_process, spill_jax_outputs
from gptoss.tolerances import Tolerances

log = logging.getLogger("gptoss.reference")


def hf_model(checkpoint: Path, params_cfg: ParamsConfig):
    """A float32 ``GptOssForCausalLM`` with the checkpoint's first N layers."""
    try:
        import torch
        from transformers import GptOssConfig, GptOssForCausalLM
        from transformers.integrations.mxfp4 import convert_moe_packed_tensors
    except ImportError as exc:
        raise GptOssError(
            f"the transformers reference needs torch and transformers: pip install -e '.[test]' ({exc})"
        ) from None
    cfg = params_cfg.model
    hf_cfg = GptOssConfig(**{k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"})
    hf_cfg._attn_implementation = "eager"
    with torch.device("meta"):  # no random init of weights that are replaced anyway (11 GB at 20b)
        model = GptOssForCausalLM(hf_cfg)
    store = Checkpoint.open(checkpoint)  # tensors by their HF names, whatever the layout
    state = {}
    for name, param in model.state_dict().items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")) and f"{name}_blocks" in store:
            blocks = torch.from_numpy(np.array(store.get(f"{name}_blocks")))
            scales = torch.from_numpy(np.array(store.get(f"{name}_scales")))
            tensor = convert_moe_packed_tensors(blocks, scales, dtype=torch.float32)
        else:
            tensor = torch.from_numpy(np.asarray(store.get(name), dtype=np.float32))
        if tuple(tensor.shape) != tuple(param.shape):
            raise GptOssError(
                f"{checkpoint}: {name} has shape {list(tensor.shape)}, transformers expects {list(param.shape)}"
            )
        state[name] = tensor.to(torch.float32)
    model.load_state_dict(state, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(hf_cfg)  # its buffers were created on the meta device
    return model.eval()


def run_hf_side(model, prompts: list[Prompt], sequence_length: int) -> dict[str, dict[str, np.ndarray]]:
    """Logits and every block's output, per prompt, via forward hooks on the decoder layers."""
    import torch

    results: dict[str, dict[str, np.ndarray]] = {}
    captured: list = []
    for prompt in prompts:
        captured.clear()
        hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out)) for layer in model.model.layers]
        try:
            with torch.no_grad():
                logits = model(torch.from_numpy(padded(prompt, sequence_length).astype(np.int64))).logits
        finally:
            for hook in hooks:
                hook.remove()
        out = {"logits": logits.numpy()}
        for i, value in enumerate(captured):
            value = value[0] if isinstance(value, tuple) else value
            out[f"hidden_state_{i}"] = value.numpy()
        results[prompt.prompt_id] = out
    return results


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
        got = run_hf_side(model, resolved, sequence_length)
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
