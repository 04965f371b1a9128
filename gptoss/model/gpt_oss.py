"""The whole causal LM and its two loops, each written once: :func:`forward` (a whole sequence; hidden states and
block taps on request) and :func:`decode_step` (new tokens after a KV cache). Both run eagerly, as the export
traces them, or jitted one piece at a time, as the JAX side of the proof runs them."""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from gptoss.config import GptOssConfig
from gptoss.model.layers import WEIGHT_FORMATS, Block, Cache, Embed, KeyValues, Linear, Outputs, RMSNorm
from gptoss.model.outputs import BLOCK_TAPS


class GptOss(nnx.Module):
    """The full causal LM. ``__call__(input_ids [batch, seq]) -> {"logits": [batch, seq, vocab] float32, ...}``."""

    def __init__(self, cfg: GptOssConfig, weight_format: str = "float32") -> None:
        """``weight_format``: a key of ``WEIGHT_FORMATS`` (float32, bfloat16, or mxfp4 experts, others bfloat16)."""
        dtype, mxfp4 = WEIGHT_FORMATS[weight_format]
        self.cfg = cfg
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, dtype)
        self.layers = nnx.List([Block(cfg, i, dtype, mxfp4) for i in range(cfg.num_hidden_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.unembed = Linear(cfg.hidden_size, cfg.vocab_size, dtype, bias=False)

    def __call__(
        self, input_ids: jax.Array, emit_hidden_states: bool = False, emit_block_debug: bool = False
    ) -> Outputs:
        """Logits of a whole sequence (no cache) and, on request, the hidden states and block taps."""
        return forward(self, input_ids, emit_hidden_states, emit_block_debug, jit=False)

    def decode(
        self, input_ids: jax.Array, attention_mask: jax.Array, past: Sequence[KeyValues]
    ) -> tuple[jax.Array, list[KeyValues]]:
        """One step with a KV cache (:func:`decode_step`)."""
        return decode_step(self, input_ids, attention_mask, past, jit=False)


def cached_block(
    block: Block, x: jax.Array, input_ids: jax.Array, attention_mask: jax.Array, past: KeyValues
) -> tuple[jax.Array, KeyValues]:
    """``block`` decoding after its cache ``past``: positions count the real tokens (``attention_mask`` is 1)
    before each one, so left padding does not shift them; the new tokens' positions are the last ``s``."""
    key_positions = jnp.cumsum(attention_mask, axis=1, dtype=jnp.int32) - 1
    past_length = past[0].shape[2]
    positions = jax.lax.slice_in_dim(key_positions, past_length, past_length + input_ids.shape[1], axis=1)
    return block(x, positions, None, Cache(past[0], past[1], key_positions, attention_mask > 0))


def token_positions(input_ids: jax.Array) -> jax.Array:
    """Positions derive from the input itself (cumsum of ones), never arange over a symbolic size, so the graph
    exports with symbolic batch/sequence axes."""
    return jnp.cumsum(jnp.ones_like(input_ids, dtype=jnp.int32), axis=1) - 1


def block_outputs(block: Block, x: jax.Array, positions: jax.Array, emit_block_debug: bool):
    """One block's output and, on request, its debug taps (dict) — else ``None``."""
    taps: Outputs | None = {} if emit_block_debug else None
    out, _ = block(x, positions, taps)
    return out, taps


def collect(outputs: Outputs, i: int, x: jax.Array, taps: Outputs | None, emit_hidden_states: bool) -> None:
    """Name block ``i``'s outputs: ``hidden_state_{i}`` and ``block_{i}_{tap}`` (float32, indices int32)."""
    if emit_hidden_states:
        outputs[f"hidden_state_{i}"] = x.astype(jnp.float32)
    if taps is not None:
        for tap in BLOCK_TAPS:
            value = taps[tap]
            outputs[f"block_{i}_{tap}"] = value if value.dtype == jnp.int32 else value.astype(jnp.float32)


def forward(
    model: GptOss,
    input_ids: jax.Array,
    emit_hidden_states: bool = False,
    emit_block_debug: bool = False,
    jit: bool = True,
) -> Outputs:
    """Logits of a whole sequence and, on request, the hidden states and block taps. ``model``: a :class:`GptOss`,
    or anything with its ``cfg``, ``embed``, ``layers``, ``norm`` and ``unembed`` (such as
    :class:`gptoss.runtimes.jax_model.StreamedModel`). ``jit``: one program per piece (embedding, each block, head),
    so XLA's temporaries stay one block's worth, with the weights as its arguments (captured as constants they would
    be copied into the program, and ``nnx.jit`` returns the module state as outputs, a second copy)."""
    positions = token_positions(input_ids)
    x = _run(jit, Embed.__call__, model.embed, input_ids)
    outputs: Outputs = {}
    for i, block in enumerate(model.layers):
        x, taps = _run(jit, block_outputs, block, x, positions, static=(emit_block_debug,))
        collect(outputs, i, x, taps, emit_hidden_states)
    return {"logits": _run(jit, _head, (model.norm, model.unembed), x), **outputs}


def run_segment(
    model: GptOss,
    input_ids: jax.Array,
    hidden: jax.Array | None,
    first: int,
    last: int,
    emit_block_debug: bool = False,
    jit: bool = True,
) -> Outputs:
    """The pieces of ranks ``first`` to ``last`` (0 the embedding, ``i + 1`` block ``i``, ``layers + 1`` the head)
    on ``hidden``, the state entering them (None for the embedding): the embedding's output as ``block_0_input``,
    each block's ``hidden_state_{i}`` (and taps on request, its input as ``block_{i}_input``), the ``logits``.
    ``model``: anything with the pieces it runs (:func:`forward`)."""
    outputs: Outputs = {}
    x = hidden
    if first == 0:
        x = outputs["block_0_input"] = _run(jit, Embed.__call__, model.embed, input_ids)
    layers = model.cfg.num_hidden_layers
    if blocks := range(max(first, 1) - 1, min(last, layers)):
        positions = token_positions(input_ids)
        for i in blocks:
            x, taps = _run(jit, block_outputs, model.layers[i], x, positions, static=(emit_block_debug,))
            collect(outputs, i, x, taps, emit_hidden_states=True)
        if emit_block_debug and blocks[-1] + 1 < layers:
            outputs[f"block_{blocks[-1] + 1}_input"] = x
    if last == layers + 1:
        outputs["logits"] = _run(jit, _head, (model.norm, model.unembed), x)
    return outputs


def decode_step(
    model: GptOss, input_ids: jax.Array, attention_mask: jax.Array, past: Sequence[KeyValues], jit: bool = True
) -> tuple[jax.Array, list[KeyValues]]:
    """One step with a KV cache: ``input_ids [b, s]`` after ``past`` (per layer, keys and values
    ``[b, kv_heads, p, head_dim]``), ``attention_mask [b, p + s]`` (0 marks padding). Returns the logits
    ``[b, s, vocab]`` and every layer's keys/values ``[b, kv_heads, p + s, head_dim]``. ``jit``: see :func:`forward`."""
    x = _run(jit, Embed.__call__, model.embed, input_ids)
    presents = []
    for block, layer_past in zip(model.layers, past, strict=True):
        x, present = _run(jit, cached_block, block, x, input_ids, attention_mask, layer_past)
        presents.append(present)
    return _run(jit, _head, (model.norm, model.unembed), x), presents


def _head(head: tuple[RMSNorm, Linear], x: jax.Array) -> jax.Array:
    """Final norm and unembedding → float32 logits."""
    norm, unembed = head
    return unembed(norm(x)).astype(jnp.float32)


def _run(jit: bool, step: Callable, module: object, *args: jax.Array, static: tuple = ()):
    """``step(module, *args, *static)``, called as it is or as a jitted program with the module's weights as
    arguments (``static``: arguments the program is compiled for), waited for."""
    if not jit:
        return step(module, *args, *static)
    graphdef, state = nnx.split(module)
    # Wait for the piece: JAX dispatches asynchronously, and a caller streaming its weights (StreamedModel) would
    # otherwise read the next pieces while this one still runs, holding every pending piece's weights at once.
    return jax.block_until_ready(_jitted(step, static, graphdef, state, *args))


@functools.partial(jax.jit, static_argnums=(0, 1, 2))
def _jitted(step: Callable, static: tuple, graphdef: nnx.GraphDef, state: nnx.State, *args: jax.Array):
    return step(nnx.merge(graphdef, state), *args, *static)
