"""The layers of GPT-OSS in Flax NNX, faithful to Hugging Face ``GptOssForCausalLM``
(the traps each computation handles are listed in docs/gpt_oss/model.md).
Our parameter names and shapes: docs/gpt_oss/model.md, "Parameters"; every linear kernel is ``[in, out]``.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss.config import SLIDING, GptOssConfig
from gptoss.formats import mxfp4 as mxfp4_format
from gptoss.model.experts import COMPUTE_DTYPE, ExpertMath, cast_slices, concat, dense, routed
from gptoss.model.rope import apply_rope, rope_tables

Outputs = dict[str, jax.Array]
KeyValues = tuple[jax.Array, jax.Array]

# Weights may be stored as bfloat16 (half the memory), but every computation runs in float32 (COMPUTE_DTYPE):
# ONNX Runtime's CPU kernels (TopK, Softmax, ...) have no bfloat16 versions, and parity then compares like with like.
# How weights are stored: the dtype of the weights, and whether the experts stay MXFP4 blocks and scales (uint8,
# decoded to float32 where they are multiplied; the other weights then stay bfloat16, as checkpoints store them).
WEIGHT_FORMATS = {"float32": (jnp.float32, False), "bfloat16": (jnp.bfloat16, False), "mxfp4": (jnp.bfloat16, True)}


def _compute(param: nnx.Param | jax.Array) -> jax.Array:
    """A weight in the compute dtype (a no-op for float32 weights; a Cast at use for bfloat16 ones)."""
    return param[...].astype(COMPUTE_DTYPE)


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
        y = concat([x @ _compute(kernel[:, cols]) for cols in columns], axis=-1)
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
    """Router (linear with bias) → top-k on raw logits → softmax over the k selected → clamped swiglu experts
    (:mod:`gptoss.model.experts`): for every expert with taps, else routed (decoding: the selected ones only)."""

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

    @property
    def math(self) -> ExpertMath:
        cfg = self.cfg
        return ExpertMath(
            cfg.num_local_experts,
            cfg.num_experts_per_tok,
            cfg.hidden_size,
            cfg.intermediate_size,
            float(cfg.swiglu_limit),
            float(cfg.swiglu_alpha),
            self.mxfp4,
        )

    def arrays(self) -> tuple[jax.Array, ...]:
        """The experts' arrays in :mod:`gptoss.model.experts`' order."""
        if self.mxfp4:
            names = ("gate_up_blocks", "gate_up_scales", "gate_up_bias", "down_blocks", "down_scales", "down_bias")
        else:
            names = ("gate_up_kernel", "gate_up_bias", "down_kernel", "down_bias")
        return tuple(getattr(self, name)[...] for name in names)

    def __call__(self, x: jax.Array, taps: Outputs | None) -> jax.Array:
        """Without ``taps`` the experts are routed (:func:`gptoss.model.experts.routed`: in ONNX each expert runs
        once on its tokens; in JAX the selected ones for few tokens, else all); with them, dense."""
        e, k = self.cfg.num_local_experts, self.cfg.num_experts_per_tok
        router_logits = self.router(x)
        # Trap: top-k on the raw logits, softmax over the k selected logits only.
        top_logits, top_idx = jax.lax.top_k(router_logits, k)
        top_weights = jax.nn.softmax(top_logits.astype(jnp.float32), axis=-1).astype(x.dtype)
        if taps is None:
            return routed(self.math, self.arrays(), x, top_idx, top_weights)
        out, parts = dense(self.math, self.arrays(), x, top_idx, top_weights, parts=taps is not None)
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
        """The block's output and its keys/values (past and new)."""
        normed = self.attn_norm(x)
        attn_out, present = self.attn(normed, positions, taps, cache)
        residual = x + attn_out
        mlp_normed = self.mlp_norm(residual)
        out = residual + self.mlp(mlp_normed, taps)
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
