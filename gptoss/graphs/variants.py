"""Quantized variants of the decoder graph (``q8``, ``q4``): the exact decoder's trace with its experts and dense
matmuls rewritten for ONNX Runtime's integer CPU kernels, its weights computed from the exact params.

* **Experts**: each MoE layer's routed-experts placeholder becomes one ``com.microsoft.QMoE`` (symmetric blocks of
  ``block_size`` along the input axis, zero point ``2^(bits-1)``, signed scales: ONNX Runtime's MatMulNBits grid;
  the scales float16 by default, which ONNX Runtime multiplies with float32 activations and a token reads half
  as many bytes of). With ``accuracy_level`` 4 the 4-bit experts multiply int8 activations (8-bit ones always
  do). It routes by the router's logits itself (top-k, softmax over the k: the model's routing), with the
  interleaved swiglu, its clamp and alpha 1.702 as attributes. MXFP4 experts held as int8 are **exact**: twice
  every E2M1 value is an integer in [-12, 12] and the block's factor a power of two (:func:`mxfp4_as_int8`); as
  int4 they are re-quantized (:func:`quantize_blocks` of the decoded values). Float experts are quantized.
* **Dense matmuls** (attention q/k/v/o and the unembedding): ``com.microsoft.MatMulNBits`` with the same blocks and
  ``accuracy_level`` (4: int8 activations, the fast CPU kernels). The router stays in float: a quantized router
  flips expert choices (llama.cpp keeps it unquantized too).
* Everything else (embedding, norms, biases, sinks, router) is the exact graph's.

The same rewrite of the whole-sequence graph with ``hidden_state_{i}`` outputs is the variant's *probe*, from which
the quality stage reads the top-1 agreement per block depth (:mod:`gptoss.proof.depth`). How far a variant is from
the exact model is measured by the quality stage, not assumed."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes

from gptoss.errors import GptOssError
from gptoss.formats import mxfp4 as mxfp4_format
from gptoss.graphs.names import is_data_input
from gptoss.graphs.passes import replace_output
from gptoss.graphs.routed_experts import DOMAIN, OP
from gptoss.stages import VARIANT_BITS

if TYPE_CHECKING:
    from gptoss.model.params import Params

log = logging.getLogger("gptoss.export")

MS_DOMAIN = "com.microsoft"
# Twice each E2M1 magnitude, indexed by a code's low three bits: the int8 that holds an MXFP4 value exactly.
DOUBLED_E2M1 = np.array([0, 1, 2, 3, 4, 6, 8, 12], dtype=np.int16)
# Weights whose matmuls stay in float (their names end so).
FLOAT_MATMULS = (".router.kernel",)
# The experts' scale dtypes QMoE multiplies with float32 activations.
# An int8-held MXFP4 block's factor is 2^(code - HALF_BIAS) (:func:`mxfp4_as_int8`).
HALF_BIAS = mxfp4_format.E8M0_BIAS + 1
SCALE_DTYPES = {"float16": (np.float16, ir.DataType.FLOAT16), "float32": (np.float32, ir.DataType.FLOAT)}


@dataclasses.dataclass(frozen=True)
class Variant:
    """A quantized variant: ``bits`` per weight in blocks of ``block_size`` along the input axis; ``accuracy_level``
    of MatMulNBits and QMoE (0: float32 activations, 4: int8 activations); ``expert_scales``: the dtype of the
    experts' block scales (``float16`` or ``float32``; the dense layers' are float32, as MatMulNBits requires)."""

    name: str
    bits: int
    block_size: int = 32
    accuracy_level: int = 4
    expert_scales: str = "float16"

    @property
    def zero_point(self) -> int:
        return 1 << (self.bits - 1)


def variant(name: str, block_size: int = 32, accuracy_level: int = 4, expert_scales: str = "float16") -> Variant:
    """The variant ``name`` (``q8`` or ``q4``) with its block size, accuracy level and expert scales' dtype, checked."""
    if name not in VARIANT_BITS:
        raise GptOssError(f"unknown variant {name!r}: choose one of {', '.join(VARIANT_BITS)}")
    if block_size < 16 or block_size & (block_size - 1):
        raise GptOssError(f"variant {name}: block size {block_size} is not a power of two >= 16")
    if accuracy_level not in (0, 1, 2, 3, 4):
        raise GptOssError(f"variant {name}: accuracy_level {accuracy_level} is not one of 0-4")
    if expert_scales not in SCALE_DTYPES:
        raise GptOssError(f"variant {name}: expert scales {expert_scales!r} are not one of {', '.join(SCALE_DTYPES)}")
    return Variant(name, VARIANT_BITS[name], block_size, accuracy_level, expert_scales)


def quantize_blocks(
    weights: np.ndarray, bits: int, block_size: int, scale_dtype: type = np.float32
) -> tuple[np.ndarray, np.ndarray]:
    """Float ``[N, K]`` to symmetric blocks along K, as ONNX Runtime's MatMulNBits quantizer does: the block's
    largest-magnitude value maps to ``-2^(bits-1)`` (a signed scale), the others round to nearest, by the scale as
    held in ``scale_dtype``. Returns ``(codes [N, K/block, block·bits/8] uint8, scales [N, K/block])``; for 4 bits
    element 2i is the low nibble."""
    n, k = weights.shape
    if k % block_size:
        raise GptOssError(f"a weight of {k} inputs is not a whole number of {block_size}-blocks")
    blocks = np.asarray(weights, np.float32).reshape(n, k // block_size, block_size)
    extreme = np.take_along_axis(blocks, np.abs(blocks).argmax(-1)[..., None], -1)[..., 0]
    zero_point = 1 << (bits - 1)
    scales = (extreme / -zero_point).astype(scale_dtype)
    if not np.all(np.isfinite(scales)):
        largest = np.abs(extreme).max()
        raise GptOssError(f"a weight of magnitude {largest:g} has no finite {np.dtype(scale_dtype)} scale")
    safe = np.where(scales == 0, np.float32(1), scales.astype(np.float32))
    codes = np.clip(np.rint(blocks / safe[..., None]) + zero_point, 0, (1 << bits) - 1).astype(np.uint8)
    return pack(codes, bits), scales


def pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Codes ``[..., block]`` (one per byte) as stored: 4-bit codes two to a byte, element 2i in the low nibble."""
    return codes if bits == 8 else (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)


def dequantize_blocks(packed: np.ndarray, scales: np.ndarray, bits: int) -> np.ndarray:
    """The float32 ``[N, K]`` that blocks of :func:`quantize_blocks` (or :func:`mxfp4_as_int8`) stand for."""
    codes = packed if bits == 8 else np.stack([packed & 0x0F, packed >> 4], axis=-1).reshape(*packed.shape[:-1], -1)
    values = (codes.astype(np.float32) - (1 << (bits - 1))) * scales.astype(np.float32)[..., None]
    return values.reshape(scales.shape[0], -1)


def mxfp4_as_int8(blocks: np.ndarray, scales: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """MXFP4 ``blocks [N, G, 16]`` and ``scales [N, G]`` as 8-bit blocks of 32 with the same values, exactly:
    code ``128 + 2·v`` (in [116, 140]) and scale ``2^(s-128)``. Returns ``(codes [N, G, 32], scales [N, G])``."""
    mxfp4_format.check_shapes(blocks, scales)
    if np.any(scales == mxfp4_format.E8M0_NAN):
        raise GptOssError("MXFP4 scales hold the NaN code 255: no int8 block holds them")
    nibbles = np.stack([blocks & 0x0F, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], mxfp4_format.GROUP)
    doubled = DOUBLED_E2M1[nibbles & 0x07] * np.where(nibbles & 0x08, -1, 1).astype(np.int16)
    factors = np.ldexp(np.float32(1.0), scales.astype(np.int32) - HALF_BIAS).astype(np.float32)
    return (doubled + 128).astype(np.uint8), factors


def _lazy(func: Callable[[], np.ndarray], dtype: ir.DataType, shape: tuple[int, ...], name: str) -> ir.LazyTensor:
    return ir.LazyTensor(lambda: ir.Tensor(func(), name=name), dtype=dtype, shape=ir.Shape(shape), name=name)


def _initializer(graph: ir.Graph, name: str, tensor: ir.TensorProtocol) -> ir.Value:
    value = ir.Value(name=name, shape=tensor.shape, type=ir.TensorType(tensor.dtype), const_value=tensor)
    graph.register_initializer(value)
    return value


def _shared(compute: Callable[[], tuple[np.ndarray, np.ndarray]]) -> tuple[Callable[[], np.ndarray], ...]:
    """Two functions returning the two parts of one ``compute()`` (codes, scales): computed once for both, read in
    either order, and computed again if one is read twice."""
    cache: dict[int, np.ndarray] = {}

    def part(index: int) -> np.ndarray:
        if index not in cache:
            cache.clear()
            cache.update(enumerate(compute()))
        return cache.pop(index)

    return (lambda: part(0)), (lambda: part(1))


class _Quantizer:
    """Rewrites one traced decoder graph into a variant, reading the weights from the exact params on demand."""

    def __init__(self, graph: ir.Graph, params: Params, spec: Variant) -> None:
        self.graph, self.params, self.spec = graph, params, spec
        self.weights = {v.name: v for v in graph.inputs if not is_data_input(v.name)}

    def weight(self, value: ir.Value) -> str | None:
        return value.name if value.name in self.weights else None

    # --- experts -------------------------------------------------------------------------------------------------
    def exact_int8(self, prefix: str) -> bool:
        """Whether ``prefix``'s experts are MXFP4 that this variant holds exactly (8 bits, MXFP4's block of 32)."""
        held = self.spec.bits == 8 and self.spec.block_size == mxfp4_format.GROUP
        return held and f"{prefix}.gate_up_blocks" in self.params.index

    def scale_dtype(self, prefix: str) -> str:
        """The dtype of ``prefix``'s expert scales: the variant's, but float32 where an exact int8 block's power of
        two is no float16 (outside 2^-24 .. 2^15), so that q8 stays exact."""
        if self.spec.expert_scales == "float32" or not self.exact_int8(prefix):
            return self.spec.expert_scales
        for which in ("gate_up", "down"):
            powers = np.asarray(self.params.read(f"{prefix}.{which}_scales")).astype(np.int32) - HALF_BIAS
            if powers.size and (powers.min() < -24 or powers.max() > 15):
                log.warning("%s.%s_scales: powers of two 2^%d .. 2^%d are no float16: float32 scales keep them exact",
                            prefix, which, powers.min(), powers.max())  # fmt: skip
                return "float32"
        return self.spec.expert_scales

    def expert_codes(self, prefix: str, which: str, scale_dtype: str) -> tuple[Callable[[], np.ndarray], ...]:
        """Functions computing the ``which`` (gate_up or down) experts of ``prefix`` (``layers.{i}.mlp``): codes
        ``[E, N, K·bits/8]``, scales ``[E, N, K/block]`` of ``scale_dtype`` and bias ``[E, N]`` float32."""
        spec, params = self.spec, self.params
        mxfp4 = f"{prefix}.{which}_blocks" in params.index
        exact = self.exact_int8(prefix)
        dtype = SCALE_DTYPES[scale_dtype][0]

        def per_expert() -> list[tuple[np.ndarray, np.ndarray]]:
            if not mxfp4:
                kernels = params.read(f"{prefix}.{which}_kernel")  # [E, in, out]
                return [quantize_blocks(np.asarray(k, np.float32).T, spec.bits, spec.block_size, dtype)
                        for k in kernels]  # fmt: skip
            blocks, scales = params.read(f"{prefix}.{which}_blocks"), params.read(f"{prefix}.{which}_scales")
            if exact:
                held = (mxfp4_as_int8(b, s) for b, s in zip(blocks, scales, strict=True))
                return [(codes, factors.astype(dtype)) for codes, factors in held]
            return [
                quantize_blocks(mxfp4_format.decode(b, s), spec.bits, spec.block_size, dtype)
                for b, s in zip(blocks, scales, strict=True)
            ]

        def stacked() -> tuple[np.ndarray, np.ndarray]:
            pairs = per_expert()
            return np.stack([c.reshape(c.shape[0], -1) for c, _ in pairs]), np.stack([s for _, s in pairs])

        def bias() -> np.ndarray:
            return np.asarray(params.read(f"{prefix}.{which}_bias"), np.float32)

        return (*_shared(stacked), bias)

    def experts(self, node: ir.Node, index: int) -> None:
        """Replace one routed-experts placeholder by QMoE on the router logits its top-k was taken from."""
        x, top_idx = node.inputs[0], node.inputs[1]
        topk = top_idx
        while topk.producer() is not None and topk.producer().op_type != "TopK":
            topk = topk.producer().inputs[0]
        if topk.producer() is None:
            raise GptOssError("variant export: no TopK found above a MoE layer's expert indices")
        logits = topk.producer().inputs[0]
        prefix = node.inputs[3].name.rsplit(".", 1)[0]  # layers.{i}.mlp
        attrs = {a.name: a.value for a in node.attributes.values()}
        experts, hidden, inter = attrs["experts"], attrs["hidden"], attrs["intermediate"]
        block, per_byte = self.spec.block_size, 8 // self.spec.bits
        shapes = {"gate_up": (2 * inter, hidden), "down": (hidden, inter)}
        inputs: list[ir.Value] = []
        scale_dtype = self.scale_dtype(prefix)
        for which, (n_out, n_in) in shapes.items():
            codes, scales, bias = self.expert_codes(prefix, which, scale_dtype)
            base = f"{prefix}.{which}@{self.spec.name}"
            inputs += [
                _initializer(self.graph, f"{base}.codes",
                             _lazy(codes, ir.DataType.UINT8, (experts, n_out, n_in // per_byte), f"{base}.codes")),
                _initializer(self.graph, f"{base}.scales",
                             _lazy(scales, SCALE_DTYPES[scale_dtype][1], (experts, n_out, n_in // block),
                                   f"{base}.scales")),
                _initializer(self.graph, f"{base}.bias",
                             _lazy(bias, ir.DataType.FLOAT, (experts, n_out), f"{base}.bias")),
            ]  # fmt: skip
        shape = ir.node("Constant", [], attributes={"value": ir.tensor(np.array([-1, experts], np.int64))})
        router = ir.node("Reshape", [logits, shape.outputs[0]])
        qmoe = ir.node(
            "QMoE",
            [x, router.outputs[0], *inputs],
            domain=MS_DOMAIN,
            name=f"qmoe_{index}",
            attributes={
                "k": attrs["top_k"],
                "activation_type": "swiglu",
                "swiglu_fusion": 1,  # interleaved: even columns gate, odd linear
                "swiglu_limit": float(attrs["swiglu_limit"]),
                "activation_alpha": float(attrs["swiglu_alpha"]),
                "activation_beta": 1.0,  # (linear + 1)
                "normalize_routing_weights": 1,  # softmax over the k selected logits
                "expert_weight_bits": self.spec.bits,
                "block_size": block,
                "accuracy_level": self.spec.accuracy_level,
            },
        )
        for made in (shape, router):
            made.name = made.outputs[0].name = f"qmoe_{index}/{made.op_type}"
        node.graph.insert_before(node, [shape, router, qmoe])
        replace_output(node, qmoe.outputs[0])

    # --- dense matmuls -------------------------------------------------------------------------------------------
    def matmul(self, node: ir.Node, index: int) -> bool:
        """Replace ``MatMul(A, B)`` by MatMulNBits when B is a weight read through Cast/Slice only."""
        chain, value = [], node.inputs[1]
        while self.weight(value) is None and (producer := value.producer()) and producer.op_type in ("Cast", "Slice"):
            chain.append(producer)
            value = producer.inputs[0]
        name = self.weight(value)
        if name is None or name.endswith(FLOAT_MATMULS) or node.inputs[1].shape is None:
            return False
        k, n = (int(d) for d in node.inputs[1].shape)
        if k % self.spec.block_size:
            return False
        slices = []  # (starts, ends, axes?) of each Slice, from the weight to B (the Casts change no value's place)
        for op in reversed(chain):
            if op.op_type == "Slice":
                consts = [ir.convenience.get_const_tensor(v) for v in op.inputs[1:]]
                if any(c is None for c in consts) or (len(consts) > 3 and np.any(consts[3].numpy() != 1)):
                    return False  # not constant, or strided: left in float
                slices.append([c.numpy() for c in consts[:3]])
        params, spec = self.params, self.spec

        def b_matrix() -> np.ndarray:
            w = np.asarray(params.read(name))
            for arrays in slices:
                starts, ends, *rest = arrays
                axes = rest[0] if rest else range(len(starts))
                index_ = [slice(None)] * w.ndim
                for axis, start, end in zip(axes, starts, ends, strict=False):
                    index_[int(axis)] = slice(int(start), int(min(end, w.shape[int(axis)])))
                w = w[tuple(index_)]
            return np.asarray(w, np.float32)

        codes_of, scales_of = _shared(lambda: quantize_blocks(b_matrix().T, spec.bits, spec.block_size))
        base = f"{name}@{spec.name}.{index}"
        codes = _initializer(
            self.graph, f"{base}.codes",
            _lazy(codes_of, ir.DataType.UINT8,
                  (n, k // spec.block_size, spec.block_size * spec.bits // 8), f"{base}.codes"),
        )  # fmt: skip
        scales = _initializer(
            self.graph,
            f"{base}.scales",
            _lazy(lambda: scales_of().reshape(-1), ir.DataType.FLOAT, (n * k // spec.block_size,), f"{base}.scales"),
        )
        nbits = ir.node(
            "MatMulNBits",
            [node.inputs[0], codes, scales],
            domain=MS_DOMAIN,
            name=f"matmulnbits_{index}",
            attributes={"K": k, "N": n, "bits": spec.bits, "block_size": spec.block_size,
                        "accuracy_level": spec.accuracy_level},
        )  # fmt: skip
        node.graph.insert_before(node, nbits)
        replace_output(node, nbits.outputs[0])
        return True


def quantize_graph(model: ir.Model, params: Params, spec: Variant) -> None:
    """Rewrite the traced graph of ``model`` (the decoder, or the whole-sequence graph without block taps; its
    routed-experts placeholders not expanded, Einsums already MatMuls) into the variant ``spec``, then attach every
    weight it still reads from ``params``: float32 ones as constants, the narrower ones (bfloat16) as overridable
    inputs, as the exact graph holds them (constant, ONNX Runtime would fold their float32 casts into copies)."""
    graph = model.graph
    quantizer = _Quantizer(graph, params, spec)
    placeholders = [n for n in graph if n.op_type == OP and n.domain == DOMAIN]
    if not placeholders:
        raise GptOssError(f"variant {spec.name}: the traced graph has no routed-experts placeholder to rewrite")
    for index, node in enumerate(placeholders):
        quantizer.experts(node, index)
    matmuls = [n for n in graph if n.op_type == "MatMul"]
    quantized = sum(quantizer.matmul(node, index) for index, node in enumerate(matmuls))
    common_passes.RemoveUnusedNodesPass()(model)
    graph.opset_imports.pop(DOMAIN, None)
    graph.opset_imports[MS_DOMAIN] = 1
    log.info("%s: %d MoE layers as QMoE (%s scales), %d matmuls as MatMulNBits (%d-bit blocks of %d, "
             "accuracy_level %d)",
             spec.name, len(placeholders), spec.expert_scales, quantized, spec.bits, spec.block_size,
             spec.accuracy_level)  # fmt: skip
    used = {v.name for v in graph.inputs if v.uses() or v in graph.outputs}
    for v in list(graph.inputs):
        if is_data_input(v.name) or v.name not in used:
            continue
        name = v.name
        place = params.index[name]
        v.const_value = _lazy(lambda name=name: np.asarray(params.read(name)), v.dtype, tuple(place.shape), name)
        graph.register_initializer(v)
    graph.inputs[:] = [
        v for v in graph.inputs if is_data_input(v.name) or (v.name in used and v.dtype != ir.DataType.FLOAT)
    ]
