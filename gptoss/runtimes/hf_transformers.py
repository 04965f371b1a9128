"""Hugging Face ``transformers`` ``GptOssForCausalLM``, the independent reference: built from the checkpoint's raw
tensors (MXFP4 experts dequantized by transformers' own ``convert_moe_packed_tensors``), truncated to the params'
layers; its forward pass with every block's output, and its ``generate``."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from gptoss.errors import GptOssError

try:
    import torch
    from transformers import GptOssConfig, GptOssForCausalLM
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors
except ImportError as exc:
    raise GptOssError(
        f"the transformers reference needs torch and transformers: pip install -e '.[test]' ({exc})"
    ) from None

from gptoss.config import ParamsConfig
from gptoss.formats.checkpoint import Checkpoint
from gptoss.formats.names import OURS_TO_HF_EXPERTS
from gptoss.runtimes.generation import Generation


def hf_model(checkpoint: Path, params_cfg: ParamsConfig):
    """A float32 ``GptOssForCausalLM`` with the checkpoint's first N layers."""
    hf_cfg = GptOssConfig(**{k: v for k, v in params_cfg.model.to_hf_dict().items() if k != "architectures"})
    hf_cfg._attn_implementation = "eager"
    with torch.device("meta"):  # no random init of weights that are replaced anyway (11 GB at 20b)
        model = GptOssForCausalLM(hf_cfg)
    store = Checkpoint.open(checkpoint)  # tensors by their HF names, whatever the layout
    state = {}
    for name, param in model.state_dict().items():
        if name.endswith(tuple(OURS_TO_HF_EXPERTS.values())) and f"{name}_blocks" in store:
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
    model.model.rotary_emb = type(model.model.rotary_emb)(hf_cfg)  # its buffers live on the meta device
    return model.eval()


def hf_forward(model, input_ids: np.ndarray) -> dict[str, np.ndarray]:
    """Logits and every block's output (``hidden_state_{i}``, by forward hooks) of ``input_ids [1, s]``."""
    captured: list = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out)) for layer in model.model.layers]
    try:
        with torch.no_grad():
            logits = model(torch.from_numpy(input_ids.astype(np.int64))).logits
    finally:
        for hook in hooks:
            hook.remove()
    hidden = {f"hidden_state_{i}": (v[0] if isinstance(v, tuple) else v).numpy() for i, v in enumerate(captured)}
    return {"logits": logits.numpy(), **hidden}


def transformers_generate(model, prompt: Sequence[int], steps: int, suppress: Sequence[int]) -> Generation:
    """transformers' ``generate(do_sample=False)``; its raw logits per step (``output_logits``)."""
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
