"""The Flax model in JAX as the proof runs it: weights read from the params file one block at a time, and greedy
generation with the KV cache."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss.model.gpt_oss import decode_step
from gptoss.model.params import Params, abstract_model, flat_param_specs
from gptoss.runtimes.generation import Generation, choose


class StreamedModel:
    """The Flax model with its weights left in the params file: each piece (the embedding, block ``i``, the final
    norm, the unembedding) is read when it is used and dropped after, so the process holds one block's weights
    at a time, whatever the depth. :func:`gptoss.model.gpt_oss.forward` and ``decode_step`` run it."""

    def __init__(self, params: Params) -> None:
        self.params, self.cfg = params, params.model_config
        self.skeleton = abstract_model(self.cfg, params.config.weight_format)

    def _load(self, module: nnx.Module, prefix: str) -> nnx.Module:
        # On CPU, `jax.device_put` adopts each freshly read (64-byte aligned) buffer without a copy.
        graphdef, state = nnx.split(module)
        values = [(path, jax.device_put(self.params.read(prefix + name))) for path, name, _ in flat_param_specs(state)]
        return nnx.merge(graphdef, nnx.from_flat_state(values))

    def __getattr__(self, name: str) -> nnx.Module:
        """``embed``, ``norm`` and ``unembed``, read each time they are used."""
        if name not in ("embed", "norm", "unembed"):
            raise AttributeError(name)
        return self._load(getattr(self.skeleton, name), f"{name}.")

    @property
    def layers(self) -> Sequence[nnx.Module]:
        return _Blocks(self)


class _Blocks(Sequence):
    """``StreamedModel.layers``: block ``i`` is read when it is asked for."""

    def __init__(self, model: StreamedModel) -> None:
        self.model = model

    def __len__(self) -> int:
        return len(self.model.skeleton.layers)

    def __getitem__(self, i: int) -> nnx.Module:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.model._load(self.model.skeleton.layers[i], f"layers.{i}.")


def jax_generate(model, prompt: Sequence[int], steps: int, suppress: Sequence[int]) -> Generation:
    """The Flax model's greedy loop with its KV cache (:func:`gptoss.model.gpt_oss.decode_step`)."""
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
