"""Rotary position embedding with YaRN scaling, as GPT-OSS uses it."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from gptoss.config import GptOssConfig, yarn_concentration


def yarn_inv_freq(cfg: GptOssConfig) -> np.ndarray:
    """Inverse frequencies ``[head_dim/2]`` (float32) blended between interpolation and extrapolation. Trap:
    GPT-OSS uses ``truncate: false``, so the ramp boundaries ``low``/``high`` stay **fractional** (a port that
    floors/ceils them shifts the blend by up to one frequency bin)."""
    rs = cfg.rope_scaling
    dim, base = cfg.head_dim, cfg.rope_theta
    pos_freqs = base ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (rs.factor * pos_freqs)

    def correction_dim(num_rotations: float) -> float:
        return (
            dim * math.log(rs.original_max_position_embeddings / (num_rotations * 2 * math.pi)) / (2 * math.log(base))
        )

    low, high = correction_dim(rs.beta_fast), correction_dim(rs.beta_slow)
    if rs.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0.0), min(high, dim - 1.0)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
    extrapolation_weight = 1.0 - ramp
    inv_freq = interpolation * (1.0 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq.astype(np.float32)


def rope_tables(cfg: GptOssConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``cos, sin`` of shape ``[batch, seq, head_dim/2]`` for integer ``positions [batch, seq]``. Trap: the YaRN
    concentration ``0.1·ln(factor) + 1`` multiplies **both** cos and sin."""
    inv_freq = jnp.asarray(yarn_inv_freq(cfg))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    concentration = np.float32(yarn_concentration(cfg.rope_scaling))
    return jnp.cos(angles) * concentration, jnp.sin(angles) * concentration


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate ``x [batch, seq, heads, head_dim]``; trap: **half-split (NeoX) pairing**, i with i + D/2, not i + 1."""
    half = x.shape[-1] // 2
    first, second = x[..., :half], x[..., half:]
    cos = cos[:, :, None, :].astype(x.dtype)
    sin = sin[:, :, None, :].astype(x.dtype)
    return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
