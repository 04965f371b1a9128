"""The experts of a MoE layer as functions of their arrays: every token through every expert (:func:`dense`), the
selected experts only (:func:`selected`), and the choice between them at run time as one primitive
(``routed_experts_p``) that JAX runs as that choice and that the export lowers to an ONNX graph computing each
expert once on the tokens routed to it (:mod:`gptoss.graphs.routed_experts`).

The arrays, in this order: MXFP4 experts ``(gate_up_blocks, gate_up_scales, gate_up_bias, down_blocks,
down_scales, down_bias)`` (blocks ``[E, out, in/32, 16]``, scales ``[E, out, in/32]``), other experts
``(gate_up_kernel, gate_up_bias, down_kernel, down_bias)`` (kernels ``[E, in, out]``)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import Primitive
from jax.interpreters import mlir

from gptoss.formats import mxfp4 as mxfp4_format

COMPUTE_DTYPE = jnp.float32
# Large bfloat16 weights are cast and used one slice at a time (experts along the expert axis, the unembedding
# along the vocabulary), so that the float32 casts alive at once stay under about this many bytes (XLA and ONNX
# Runtime alike free each slice's cast before making the next; docs/performance.md).
CAST_SLICE_BYTES = 256 * 2**20
# The most float32 expert weights the decoding path gathers for one layer (see :func:`sparse`).
SPARSE_BYTES = 2**30


@dataclasses.dataclass(frozen=True)
class ExpertMath:
    """The static numbers of a layer's experts (hashable: a primitive's parameter)."""

    experts: int
    top_k: int
    hidden: int
    intermediate: int
    swiglu_limit: float
    swiglu_alpha: float
    mxfp4: bool

    @property
    def max_pairs(self) -> int:
        """Up to how many (token, expert) pairs :func:`sparse` gathers the selected experts: up to half the experts
        and ``SPARSE_BYTES`` of their gathered float32 copies."""
        expert_bytes = 4 * 3 * self.hidden * self.intermediate
        return min(self.experts // 2, max(self.top_k, SPARSE_BYTES // expert_bytes))


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


def expert_weights(math: ExpertMath, arrays: tuple, experts: slice | jax.Array) -> tuple[jax.Array, ...]:
    """(gate_up kernel, gate_up bias, down kernel, down bias) of a slice of experts or of the experts at given
    indices (a gather), in the compute dtype. MXFP4 experts are decoded here, just these ones, into their stored
    ``[e, out, in]`` layout (the matmuls then contract the last axes)."""

    def pick(array: jax.Array) -> jax.Array:
        # Unsigned indices: a plain Gather (signed ones get a Where fixing negative indices, over the weights).
        return array[experts] if isinstance(experts, slice) else array[experts.astype(jnp.uint32)]

    if math.mxfp4:
        gu_blocks, gu_scales, gu_bias, down_blocks, down_scales, down_bias = arrays
        gate_up = decode_mxfp4(pick(gu_blocks), pick(gu_scales))
        down = decode_mxfp4(pick(down_blocks), pick(down_scales))
    else:
        gu_kernel, gu_bias, down_kernel, down_bias = arrays
        gate_up, down = pick(gu_kernel), pick(down_kernel)
    return tuple(w.astype(COMPUTE_DTYPE) for w in (gate_up, pick(gu_bias), down, pick(down_bias)))


def expert_outputs(
    math: ExpertMath, tokens: jax.Array, weights: tuple[jax.Array, ...]
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Experts (``weights``, one per leading row) on ``tokens [e, N, H]``: (preactivation, activation, output)."""
    gate_up_kernel, gate_up_bias, down_kernel, down_bias = weights
    gate_up = _expert_matmul(tokens, gate_up_kernel, math.mxfp4) + gate_up_bias[:, None, :]
    # Trap: gate_up columns are interleaved — even columns gate, odd columns linear.
    pairs = gate_up.reshape(*gate_up.shape[:-1], math.intermediate, 2)
    gate, linear = pairs[..., 0], pairs[..., 1]
    # Trap: the gate is clamped from above only, the linear part on both sides; then +1 on linear.
    limit = math.swiglu_limit
    gate = jnp.minimum(gate, limit)
    linear = jnp.clip(linear, -limit, limit)
    act = gate * jax.nn.sigmoid(math.swiglu_alpha * gate) * (linear + 1)
    expert_out = _expert_matmul(act, down_kernel, math.mxfp4) + down_bias[:, None, :]
    return gate_up, act, expert_out


def dense(
    math: ExpertMath, arrays: tuple, x: jax.Array, top_idx: jax.Array, top_weights: jax.Array, parts: bool = False
) -> tuple[jax.Array, tuple[jax.Array, ...] | None]:
    """Every token of ``x [b, s, H]`` through every expert, then the weighted sum with zero weight for unselected
    experts; returns the output and, if ``parts``, the per-expert intermediates ``[E, N, f]``. Trade-off: each expert
    weight is read once and never copied per token (a per-token gather is ``[tokens, k, 2I, H]``), at ``E/k`` (8×)
    the FLOPs of grouping tokens by expert. The expert axis is the *batch* axis of both matmuls (``[E, tokens, H] ×
    [E, H, 2I]``), so no weight is transposed; bfloat16 experts go by ``CAST_SLICE_BYTES``."""
    e = math.experts
    batch, seq, hidden = x.shape
    flat = x.reshape(1, -1, hidden)
    dense_weights = jnp.sum(jax.nn.one_hot(top_idx, e, dtype=x.dtype) * top_weights[..., None], axis=-2)
    dense_weights = dense_weights.reshape(-1, e)
    decoded = (e, hidden, 2 * math.intermediate)  # the float32 gate_up weights of every expert
    gate_up_bias = arrays[2 if math.mxfp4 else 1]
    slices = cast_slices(decoded, jnp.uint8 if math.mxfp4 else gate_up_bias.dtype, axis=0)
    per_slice: list[tuple[jax.Array, ...]] = []
    for experts in slices:
        tokens = jnp.broadcast_to(flat, (experts.stop - experts.start, *flat.shape[1:]))
        gate_up, act, expert_out = expert_outputs(math, tokens, expert_weights(math, arrays, experts))
        weights = dense_weights if len(slices) == 1 else dense_weights[:, experts]
        per_slice.append((gate_up, act, expert_out, jnp.einsum("ne,enh->nh", weights, expert_out)))
    out = functools.reduce(jnp.add, [moe for *_, moe in per_slice]).reshape(batch, seq, hidden)
    return out, (tuple(concat([p[j] for p in per_slice]) for j in range(3)) if parts else None)


def selected(math: ExpertMath, arrays: tuple, x: jax.Array, top_idx: jax.Array, top_weights: jax.Array) -> jax.Array:
    """Only the selected experts: each (token, slot) pair gathers its expert's weights and computes one row.
    A decoding step of one token reads k experts instead of all of them (at 20b shapes 4 of 32)."""
    k = math.top_k
    batch, seq, hidden = x.shape
    tokens = jnp.broadcast_to(x.reshape(-1, 1, 1, hidden), (batch * seq, k, 1, hidden)).reshape(-1, 1, hidden)
    _, _, expert_out = expert_outputs(math, tokens, expert_weights(math, arrays, top_idx.reshape(-1)))  # [N·k, 1, H]
    weighted = expert_out.reshape(batch * seq, k, hidden) * top_weights.reshape(-1, k, 1)
    return jnp.sum(weighted, axis=1).reshape(batch, seq, hidden)


def sparse(math: ExpertMath, arrays: tuple, x: jax.Array, top_idx: jax.Array, top_weights: jax.Array) -> jax.Array:
    """:func:`selected` for few (token, expert) pairs (``math.max_pairs``), else :func:`dense`. A count from the
    data, not the shape: the choice is made at run time, so one program serves prefill and decoding."""
    pairs = jnp.sum(jnp.ones_like(top_idx))
    return jax.lax.cond(
        pairs <= math.max_pairs,
        lambda: selected(math, arrays, x, top_idx, top_weights),
        lambda: dense(math, arrays, x, top_idx, top_weights)[0],
    )


# The experts of a layer without taps, as one primitive: JAX runs :func:`sparse`; the export lowers it to a graph
# that computes each expert once, on the tokens routed to it (gptoss.graphs.routed_experts).
routed_experts_p = Primitive("gptoss_routed_experts")
routed_experts_p.def_impl(lambda x, top_idx, top_weights, *arrays, math: sparse(math, arrays, x, top_idx, top_weights))
routed_experts_p.def_abstract_eval(lambda x, *_, math: jax.core.ShapedArray(x.shape, x.dtype))
mlir.register_lowering(
    routed_experts_p,
    mlir.lower_fun(lambda x, top_idx, top_weights, *arrays, math: sparse(math, arrays, x, top_idx, top_weights), False),
)


def routed(math: ExpertMath, arrays: tuple, x: jax.Array, top_idx: jax.Array, top_weights: jax.Array) -> jax.Array:
    """The MoE output ``[b, s, H]`` of ``x`` routed to ``top_idx`` with ``top_weights`` (``[b, s, k]``)."""
    return routed_experts_p.bind(x, top_idx, top_weights, *arrays, math=math)


def concat(parts: list[jax.Array], axis: int = 0) -> jax.Array:
    return parts[0] if len(parts) == 1 else jnp.concatenate(parts, axis=axis)


def _expert_matmul(x: jax.Array, w: jax.Array, out_major: bool = False) -> jax.Array:
    """``[E, N, in] × [E, in, out] → [E, N, out]`` with E as the batch dimension of one dot_general
    (``out_major``: the weights are ``[E, out, in]``, as MXFP4 experts decode)."""
    return jax.lax.dot_general(x, w, dimension_numbers=(((2,), (2 if out_major else 1,)), ((0,), (0,))))
