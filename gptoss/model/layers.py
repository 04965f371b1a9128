"""The layers of GPT-OSS in Flax NNX, faithful to Hugging Face ``GptOssForCausalLM``
(the traps each computation handles are listed in docs/gpt_oss/model.md).
Our parameter names and shapes: docs/gpt_oss/model.md, "Parameters"; every linear kernel is ``[in, out]``.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss.config import SLIDING, GptOssConfig
from gptoss.formats import mxfp4 as mxfp4_format
from gptoss.model.rope import apply_rope, rope_tables

Outputs = dict[str, jax.Array]
KeyValues = tuple[jax.Array, jax.Array]

# Weights may be stored as bfloat16 (half the memory), but every computation runs in float32: ONNX Runtime's CPU
# kernels (TopK, Softmax, ...) have no bfloat16 versions, and parity then compares like with like.
COMPUTE_DTYPE = jnp.float32
# How weights are stored: the dtype of the weights, and whether the experts stay MXFP4 blocks and scales (uint8,
# decoded to float32 where they are multiplied; the other weights then stay bfloat16, as checkpoints store them).
WEIGHT_FORMATS = {"float32": (jnp.float32, False), "bfloat16": (jnp.bfloat16, False), "mxfp4": (jnp.bfloat16, True)}

# Large bfloat16 weights are cast and used one slice at a time (experts along the expert axis, the unembedding
# along the vocabulary), so that the float32 casts alive at once stay under about this many bytes (XLA and ONNX
# Runtime alike free each slice's cast before making the next; docs/performance.md).
CAST_SLICE_BYTES = 256 * 2**20
# The most float32 expert weights the decoding path gathers for one layer (see MoE.__call__).
SPARSE_BYTES = 2**30


def _compute(param: nnx.Param | jax.Array) -> jax.Array:
    """A weight in the compute dtype (a no-op for float32 weights; a Cast at use for bfloat16 ones)."""
    return param[...].astype(COMPUTE_DTYPE)


def cast_slices(shape: tuple[int, ...], dtype: jnp.dtype, axis: int) -> list[slice]:
    """Slices along ``axis`` whose float32 casts (of a ``shape`` of ``dtype`` values, or the float32 decode of
    MXFP4 experts of that shape) stay under ``CAST_SLICE_BYTES``; one whole slice if nothing is converted."""
    n = shape[axis]
    if jnp.dtype(dtype) == COMPUTE_DTYPE:
        return [slice(0, n)]
    cast_bytes = int(np.prod(shape)) * jnp.dtype(COMPUTE_DTYPE).itemsize
    pieces = min(n, -(-cast_bytes // CAST_SLICE_BYTES))
    step = -(-n // pieces)
    return [slice(start, min(start + step, n)) for start in range(0, n, step)]


def _param(shape: tuple[int, ...], dtype: jnp.dtype) -> nnx.Param:
    # Parameters are always replaced by checkpoint values; zeros keep construction cheap and deterministic.
    return nnx.Param(jnp.zeros(shape, dtype))


@dataclasses.dataclass(frozen=True)
class Cache:
    """What one layer attends to besides its new tokens: the cached keys (after RoPE) and values ``[b, kv_heads,
    past, head_dim]``, and the position and validity (``attention_mask``) of every key, past and new ``[b, all]``."""

    keys: jax.Array
    values: jax.Array
    key_positions: jax.Array
    key_valid: jax.Array


class Linear(nnx.Module):
    """``x @ kernel + bias`` with a ``[in, out]`` kernel."""

    def __init__(self, fan_in: int, fan_out: int, dtype: jnp.dtype, bias: bool = True) -> None:
        self.kernel = _param((fan_in, fan_out), dtype)
        self.bias = _param((fan_out,), dtype) if bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        kernel = self.kernel[...]
        columns = cast_slices(kernel.shape, kernel.dtype, axis=1)  # several: bfloat16 and large (the unembedding)
        y = _concat([x @ _compute(kernel[:, cols]) for cols in columns], axis=-1)
        return y + _compute(self.bias) if self.bias is not None else y


class RMSNorm(nnx.Module):
    """RMSNorm, trap: computed in float32 with eps 1e-5, gain applied in float32, then cast back."""

    def __init__(self, size: int, eps: float) -> None:
        self.scale = _param((size,), jnp.float32)
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (normed * self.scale[...].astype(jnp.float32)).astype(x.dtype)


class Attention(nnx.Module):
    """GQA attention with biases, YaRN RoPE, learned sinks and an optional sliding window."""

    def __init__(self, cfg: GptOssConfig, layer: int, dtype: jnp.dtype) -> None:
        h, d = cfg.hidden_size, cfg.head_dim
        self.cfg = cfg
        self.q_proj = Linear(h, cfg.num_attention_heads * d, dtype)
        self.k_proj = Linear(h, cfg.num_key_value_heads * d, dtype)
        self.v_proj = Linear(h, cfg.num_key_value_heads * d, dtype)
        self.o_proj = Linear(cfg.num_attention_heads * d, h, dtype)
        self.sinks = _param((cfg.num_attention_heads,), dtype)
        # Trap: sliding window only on the layers `layer_types` names (even layers in gpt-oss).
        self.window = cfg.sliding_window if cfg.layer_types[layer] == SLIDING else None

    def __call__(
        self, x: jax.Array, positions: jax.Array, taps: Outputs | None, cache: Cache | None = None
    ) -> tuple[jax.Array, KeyValues]:
        """Attention of ``x [b, s, hidden]`` at ``positions [b, s]`` over the cached keys (if any) and its own;
        returns the output and the keys/values of every position ``[b, kv_heads, past + s, head_dim]``."""
        cfg = self.cfg
        batch, seq = x.shape[0], x.shape[1]
        n_kv, d = cfg.num_key_value_heads, cfg.head_dim
        group = cfg.num_attention_heads // n_kv
        q = self.q_proj(x).reshape(batch, seq, cfg.num_attention_heads, d)
        k = self.k_proj(x).reshape(batch, seq, n_kv, d)
        v = self.v_proj(x).reshape(batch, seq, n_kv, d)
        cos, sin = rope_tables(cfg, positions)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if taps is not None:
            taps.update(q=q, k=k, v=v)

        # Keys and values by head, the cache's layout (keys after RoPE); the new ones follow the cached ones.
        keys, values = (jnp.swapaxes(t, 1, 2).astype(jnp.float32) for t in (k, v))
        key_positions, key_valid = positions, None
        if cache is not None:
            keys = jax.lax.concatenate([cache.keys, keys], 2)
            values = jax.lax.concatenate([cache.values, values], 2)
            key_positions, key_valid = cache.key_positions, cache.key_valid

        # Trap: GQA — query head h uses kv head h // group, i.e. heads are [kv, group] in that order.
        q = q.reshape(batch, seq, n_kv, group, d).astype(jnp.float32)
        scores = jnp.einsum("bqngd,bnsd->bngqs", q, keys) * np.float32(d**-0.5)

        # Masks come from the positions (no arange over a symbolic axis). Causal: k <= q.
        # Trap: sliding keeps `q - window < k <= q`, exactly `window` keys including the current one.
        q_pos, k_pos = positions[:, :, None], key_positions[:, None, :]
        allowed = k_pos <= q_pos
        if self.window is not None:
            allowed = allowed & (q_pos - k_pos < self.window)
        if key_valid is not None:  # padding (attention_mask 0) is never attended to
            allowed = allowed & key_valid[:, None, :]
        scores = jnp.where(allowed[:, None, None, :, :], scores, jnp.finfo(jnp.float32).min)

        # Trap: sinks are one learned logit per query head, an extra softmax column — not scaled, never
        # masked — dropped after the softmax without renormalising. Written as the softmax over
        # [scores, sink] restricted to the score columns: exp(s - m) / (sum exp(s - m) + exp(sink - m)).
        sinks = self.sinks[...].astype(jnp.float32).reshape(1, n_kv, group, 1, 1)
        row_max = jnp.maximum(jnp.max(scores, axis=-1, keepdims=True), sinks)
        weights = jnp.exp(scores - row_max)
        probs = weights / (jnp.sum(weights, axis=-1, keepdims=True) + jnp.exp(sinks - row_max))

        out = jnp.einsum("bngqs,bnsd->bqngd", probs, values)
        out = out.reshape(batch, seq, cfg.num_attention_heads * d).astype(x.dtype)
        return self.o_proj(out), (keys, values)


class MoE(nnx.Module):
    """Router (linear with bias) → top-k on raw logits → softmax over the k selected → clamped swiglu experts,
    computed for every expert (:meth:`_dense`) or, when decoding, for the selected ones only (:meth:`_selected`)."""

    def __init__(self, cfg: GptOssConfig, dtype: jnp.dtype, mxfp4: bool = False) -> None:
        h, i, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
        self.cfg, self.mxfp4 = cfg, mxfp4
        self.router = Linear(h, e, dtype)
        if mxfp4:  # as the checkpoint stores them: [E, out, in/32, 16] codes and [E, out, in/32] scales
            self.gate_up_blocks = _param((e, 2 * i, h // mxfp4_format.GROUP, mxfp4_format.GROUP // 2), jnp.uint8)
            self.gate_up_scales = _param((e, 2 * i, h // mxfp4_format.GROUP), jnp.uint8)
            self.down_blocks = _param((e, h, i // mxfp4_format.GROUP, mxfp4_format.GROUP // 2), jnp.uint8)
            self.down_scales = _param((e, h, i // mxfp4_format.GROUP), jnp.uint8)
        else:  # [E, in, out]
            self.gate_up_kernel = _param((e, h, 2 * i), dtype)
            self.down_kernel = _param((e, i, h), dtype)
        self.gate_up_bias = _param((e, 2 * i), dtype)
        self.down_bias = _param((e, h), dtype)

    def __call__(self, x: jax.Array, taps: Outputs | None, sparse: bool = False) -> jax.Array:
        """``sparse``: when few tokens come (decoding), compute only their selected experts (see
        :meth:`_selected`); the choice is made at run time, so one graph serves prefill and decoding."""
        cfg = self.cfg
        e, k = cfg.num_local_experts, cfg.num_experts_per_tok
        router_logits = self.router(x)
        # Trap: top-k on the raw logits, softmax over the k selected logits only.
        top_logits, top_idx = jax.lax.top_k(router_logits, k)
        top_weights = jax.nn.softmax(top_logits.astype(jnp.float32), axis=-1).astype(x.dtype)
        if sparse and taps is None:
            # Few (token, expert) pairs: reading just those experts costs less than reading every one — up to half
            # the experts and SPARSE_BYTES of their gathered float32 copies. A count from the data, not the shape:
            # the graph keeps symbolic axes.
            expert_bytes = 4 * 3 * cfg.hidden_size * cfg.intermediate_size
            max_pairs = min(e // 2, max(k, SPARSE_BYTES // expert_bytes))
            pairs = jnp.sum(jnp.ones_like(top_idx))
            return jax.lax.cond(
                pairs <= max_pairs,
                lambda: self._selected(x, top_idx, top_weights),
                lambda: self._dense(x, top_idx, top_weights, None)[0],
            )
        out, parts = self._dense(x, top_idx, top_weights, taps)
        if taps is not None:
            batch, seq, _ = x.shape
            gate_up, act, expert_out = parts

            def per_slot(t: jax.Array) -> jax.Array:
                # [E, N, f] → the k selected experts per token: [b, t, k, f]
                per_token = jnp.moveaxis(t.reshape(e, batch, seq, t.shape[-1]), 0, 2)
                return jnp.take_along_axis(per_token, top_idx[..., None], axis=2)

            taps.update(
                router_logits=router_logits,
                expert_indices=top_idx.astype(jnp.int32),
                expert_weights=top_weights,
                expert_preact=per_slot(gate_up),
                expert_act=per_slot(act),
                expert_out=per_slot(expert_out),
                moe_output=out,
            )
        return out

    def _dense(
        self, x: jax.Array, top_idx: jax.Array, top_weights: jax.Array, taps: Outputs | None
    ) -> tuple[jax.Array, tuple[jax.Array, ...] | None]:
        """Every token through every expert, then the weighted sum with zero weight for unselected experts; returns
        the output and, if ``taps`` asks for them, the per-expert intermediates ``[E, N, f]``. Trade-off: each expert
        weight is read once and never copied per token (a per-token gather is ``[tokens, k, 2I, H]``), at ``E/k``
        (8×) the FLOPs of grouping tokens by expert. The expert axis is the *batch* axis of both matmuls
        (``[E, tokens, H] × [E, H, 2I]``), so no weight is transposed; bfloat16 experts go by ``CAST_SLICE_BYTES``."""
        e = self.cfg.num_local_experts
        batch, seq, hidden = x.shape
        flat = x.reshape(1, -1, hidden)
        dense_weights = jnp.sum(jax.nn.one_hot(top_idx, e, dtype=x.dtype) * top_weights[..., None], axis=-2)
        dense_weights = dense_weights.reshape(-1, e)
        decoded = (e, hidden, 2 * self.cfg.intermediate_size)  # the float32 gate_up weights of every expert
        slices = cast_slices(decoded, jnp.uint8 if self.mxfp4 else self.gate_up_bias.dtype, axis=0)
        per_slice: list[tuple[jax.Array, ...]] = []
        for experts in slices:
            tokens = jnp.broadcast_to(flat, (experts.stop - experts.start, *flat.shape[1:]))
            gate_up, act, expert_out = self._experts(tokens, self._expert_weights(experts))
            weights = dense_weights if len(slices) == 1 else dense_weights[:, experts]
            per_slice.append((gate_up, act, expert_out, jnp.einsum("ne,enh->nh", weights, expert_out)))
        out = functools.reduce(jnp.add, [moe for *_, moe in per_slice]).reshape(batch, seq, hidden)
        return out, (None if taps is None else tuple(_concat([p[j] for p in per_slice]) for j in range(3)))

    def _selected(self, x: jax.Array, top_idx: jax.Array, top_weights: jax.Array) -> jax.Array:
        """Only the selected experts: each (token, slot) pair gathers its expert's weights and computes one row.
        A decoding step of one token reads k experts instead of all of them (at 20b shapes 4 of 32)."""
        k = self.cfg.num_experts_per_tok
        batch, seq, hidden = x.shape
        tokens = jnp.broadcast_to(x.reshape(-1, 1, 1, hidden), (batch * seq, k, 1, hidden)).reshape(-1, 1, hidden)
        _, _, expert_out = self._experts(tokens, self._expert_weights(top_idx.reshape(-1)))  # [N·k, 1, H]
        weighted = expert_out.reshape(batch * seq, k, hidden) * top_weights.reshape(-1, k, 1)
        return jnp.sum(weighted, axis=1).reshape(batch, seq, hidden)

    def _expert_weights(self, experts: slice | jax.Array) -> tuple[jax.Array, ...]:
        """(gate_up kernel, gate_up bias, down kernel, down bias) of a slice of experts or of the experts at
        given indices (a gather), in the compute dtype. MXFP4 experts are decoded here, just these ones, into
        their stored ``[e, out, in]`` layout (the matmuls then contract the last axes)."""

        def pick(param: nnx.Param) -> jax.Array:
            # Unsigned indices: a plain Gather (signed ones get a Where fixing negative indices, over the weights).
            return param[experts] if isinstance(experts, slice) else param[...][experts.astype(jnp.uint32)]

        if self.mxfp4:
            gate_up = decode_mxfp4(pick(self.gate_up_blocks), pick(self.gate_up_scales))
            down = decode_mxfp4(pick(self.down_blocks), pick(self.down_scales))
        else:
            gate_up, down = pick(self.gate_up_kernel), pick(self.down_kernel)
        bias = (pick(self.gate_up_bias), pick(self.down_bias))
        return tuple(w.astype(COMPUTE_DTYPE) for w in (gate_up, bias[0], down, bias[1]))

    def _experts(self, tokens: jax.Array, weights: tuple[jax.Array, ...]) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Experts (``weights``, one per leading row) on ``tokens [e, N, H]``: (preactivation, activation, output)."""
        cfg = self.cfg
        gate_up_kernel, gate_up_bias, down_kernel, down_bias = weights
        gate_up = _expert_matmul(tokens, gate_up_kernel, self.mxfp4) + gate_up_bias[:, None, :]
        # Trap: gate_up columns are interleaved — even columns gate, odd columns linear.
        pairs = gate_up.reshape(*gate_up.shape[:-1], cfg.intermediate_size, 2)
        gate, linear = pairs[..., 0], pairs[..., 1]
        # Trap: the gate is clamped from above only, the linear part on both sides; then +1 on linear.
        limit = cfg.swiglu_limit
        gate = jnp.minimum(gate, limit)
        linear = jnp.clip(linear, -limit, limit)
        act = gate * jax.nn.sigmoid(cfg.swiglu_alpha * gate) * (linear + 1)
        expert_out = _expert_matmul(act, down_kernel, self.mxfp4) + down_bias[:, None, :]
        return gate_up, act, expert_out


def _concat(parts: list[jax.Array], axis: int = 0) -> jax.Array:
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _expert_matmul(x: jax.Array, w: jax.Array, out_major: bool = False) -> jax.Array:
    """``[E, N, in] × [E, in, out] → [E, N, out]`` with E as the batch dimension of one dot_general
    (``out_major``: the weights are ``[E, out, in]``, as MXFP4 experts decode)."""
    return jax.lax.dot_general(x, w, dimension_numbers=(((2,), (2 if out_major else 1,)), ((0,), (0,))))


def decode_mxfp4(blocks: jax.Array, scales: jax.Array) -> jax.Array:
    """MXFP4 ``blocks [..., G, 16]`` uint8 and ``scales [..., G]`` to float32 ``[..., G·32]``, exactly as
    :func:`gptoss.formats.mxfp4.decode`: each byte looks up its two values (trap: the low nibble is element 2i, the
    high nibble 2i+1; bit 3 of a nibble is the sign, so -0.0 stays -0.0) and each scale its factor 2^(s-127) (255
    is NaN), so JAX and the ONNX graph multiply bit-identical weights. Indexed by the unsigned bytes themselves:
    plain Gathers (``jnp.take``, or signed indices, guard every element with Where/Min/Max: seconds a 20b layer)."""
    pairs = jnp.asarray(mxfp4_format.FP4_PAIRS)[blocks]  # [..., G, 16, 2]
    factors = jnp.asarray(mxfp4_format.E8M0_VALUES)[scales]
    values = pairs.reshape(*scales.shape, -1) * factors[..., None]
    return values.reshape(*scales.shape[:-1], -1)


class Block(nnx.Module):
    """Pre-norm residual block: attention, then MoE."""

    def __init__(self, cfg: GptOssConfig, layer: int, dtype: jnp.dtype, mxfp4: bool = False) -> None:
        self.attn_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.attn = Attention(cfg, layer, dtype)
        self.mlp_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg, dtype, mxfp4)

    def __call__(
        self, x: jax.Array, positions: jax.Array, taps: Outputs | None, cache: Cache | None = None
    ) -> tuple[jax.Array, KeyValues]:
        """The block's output and its keys/values (past and new); with a ``cache`` (decoding) the MoE may run sparse."""
        normed = self.attn_norm(x)
        attn_out, present = self.attn(normed, positions, taps, cache)
        residual = x + attn_out
        mlp_normed = self.mlp_norm(residual)
        out = residual + self.mlp(mlp_normed, taps, sparse=cache is not None)
        if taps is not None:
            taps.update(
                input=x,
                attn_norm=normed,
                attn_output=attn_out,
                post_attn_residual=residual,
                mlp_norm=mlp_normed,
                output=out,
            )
        return out, present


class Embed(nnx.Module):
    def __init__(self, vocab: int, hidden: int, dtype: jnp.dtype) -> None:
        self.embedding = _param((vocab, hidden), dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        # Gather first, then cast: only the selected rows are converted.
        return jnp.take(self.embedding[...], ids, axis=0).astype(COMPUTE_DTYPE)
