"""MXFP4 (OCP microscaling FP4) decoding and encoding, in NumPy. ``blocks [..., G, 16]`` uint8 hold 32 FP4 E2M1
codes per group (trap: the **low nibble is element 2i, the high nibble element 2i+1**; bit 3 of a code is the sign,
bits 0-2 index ``[0, .5, 1, 1.5, 2, 3, 4, 6]``); ``scales [..., G]`` uint8 are E8M0, the group's factor ``2^(s-127)``
(255 is NaN). Decoding gives ``[..., G·32]``: for GPT-OSS experts ``[E, out, in]``."""

from __future__ import annotations

import numpy as np

FP4_VALUES = np.array(
    [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], dtype=np.float32
)
GROUP = 32
E8M0_BIAS = 127
E8M0_NAN = 255
# Both values of every byte: [low nibble's, high nibble's] (element 2i, then 2i+1), for lookups by the byte.
FP4_PAIRS = np.stack([FP4_VALUES[np.arange(256) & 0x0F], FP4_VALUES[np.arange(256) >> 4]], axis=-1)
# Every E8M0 scale's factor 2^(s-127), exactly (2^-127 is a float32 subnormal); 255 is NaN.
E8M0_VALUES = np.append(np.ldexp(1.0, np.arange(E8M0_NAN) - E8M0_BIAS).astype(np.float32), np.float32(np.nan))


def check_shapes(blocks: np.ndarray, scales: np.ndarray) -> None:
    """``ValueError`` unless ``blocks`` is ``[..., G, 16]`` and ``scales`` ``[..., G]`` with the same leading axes."""
    if blocks.shape[-1:] != (GROUP // 2,) or blocks.shape[:-1] != scales.shape:
        raise ValueError(
            f"MXFP4 blocks {blocks.shape} and scales {scales.shape} do not match ([..., G, 16] / [..., G])"
        )


def decode(blocks: np.ndarray, scales: np.ndarray, rows_per_chunk: int = 1 << 16) -> np.ndarray:
    """Dequantize MXFP4 ``blocks [..., G, 16]`` with ``scales [..., G]`` to float32 ``[..., G*32]``, in row chunks."""
    check_shapes(blocks, scales)
    *prefix, groups, _ = blocks.shape
    flat_blocks = np.asarray(blocks, dtype=np.uint8).reshape(-1, GROUP // 2)
    flat_scales = np.asarray(scales, dtype=np.uint8).reshape(-1)
    out = np.empty((flat_blocks.shape[0], GROUP), dtype=np.float32)
    for start in range(0, flat_blocks.shape[0], rows_per_chunk):
        stop = start + rows_per_chunk
        chunk = flat_blocks[start:stop]
        out[start:stop, 0::2] = FP4_VALUES[chunk & 0x0F]  # low nibble: even element
        out[start:stop, 1::2] = FP4_VALUES[chunk >> 4]  # high nibble: odd element
        with np.errstate(over="ignore"):  # a large scale times 6 is inf, which the callers' finiteness checks catch
            out[start:stop] *= E8M0_VALUES[flat_scales[start:stop]][:, None]
    return out.reshape(*prefix, groups * GROUP)


def encode(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize float ``[..., K]`` (K a multiple of 32) to MXFP4 ``(blocks [..., K/32, 16], scales [..., K/32])``:
    the shared exponent is ``floor(log2(amax)) - 2`` (E2M1's largest exponent), codes round to the nearest
    representable value (clipped at ±6), so ``decode(*encode(x)) == x`` wherever ``x`` is representable."""
    x = np.asarray(values, dtype=np.float32)
    if x.shape[-1] % GROUP:
        raise ValueError(f"last dimension {x.shape[-1]} is not a multiple of {GROUP}")
    grouped = x.reshape(*x.shape[:-1], x.shape[-1] // GROUP, GROUP)
    amax = np.abs(grouped).max(axis=-1)
    with np.errstate(divide="ignore"):
        exponent = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - 2, -E8M0_BIAS)
    exponent = np.clip(exponent, -E8M0_BIAS, 127).astype(np.int32)
    scaled = grouped / np.ldexp(np.float32(1.0), exponent)[..., None]
    magnitudes = FP4_VALUES[:8]
    idx = np.abs(np.abs(scaled)[..., None] - magnitudes).argmin(axis=-1).astype(np.uint8)
    codes = idx | np.where(np.signbit(scaled) & (idx > 0), 8, 0).astype(np.uint8)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    scales = (exponent + E8M0_BIAS).astype(np.uint8)
    return blocks, scales
