"""Top-1 agreement per block depth (``gptoss quality --probe``): a logit lens on the exact model and a variant.

For each block depth ``d`` the hidden state after block ``d`` (``hidden_state_{d}``) goes through the exact model's
head, its final RMSNorm and unembedding read from the params in float32, on both sides: the exact model (JAX,
streamed, in a process of its own) and the variant's *probe* (the whole-sequence graph with hidden-state outputs,
rewritten as the variant: ``gptoss export --stage debug --variant V``). The statistic is the share of scored
positions whose argmax agrees, on the quality stage's chunks and scored positions. The head is the same on both
sides, so the last depth's value is ``top1_agreement`` but for the variant's own (quantized) head.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from gptoss.errors import GptOssError
from gptoss.files import sha256
from gptoss.graphs.names import INPUT_NAME, data_path
from gptoss.proof.quality import text_chunks

if TYPE_CHECKING:
    from gptoss.model.params import Params

log = logging.getLogger("gptoss.quality")

STATISTIC = "top1_agreement_depth"
COLUMN_BLOCK = 4096  # vocabulary columns per float32 block of the lens (positions x 4096 x 4 bytes)
# The quantized kernels' settings a probe must share with its variant's decoder.
KERNEL_SETTINGS = ("bits", "expert_weight_bits", "block_size", "accuracy_level")


@dataclass(frozen=True)
class Head:
    """The exact model's head as the lens applies it: RMSNorm ``scale [hidden]`` and ``eps``, ``kernel
    [hidden, vocab]`` as stored (each block of columns is cast to float32 when it is used)."""

    scale: np.ndarray
    kernel: np.ndarray
    eps: float


def read_head(params: Params) -> Head:
    """The final norm and the unembedding of ``params``."""
    scale = np.asarray(params.read("norm.scale"), np.float32)
    return Head(scale, params.read("unembed.kernel"), params.model_config.rms_norm_eps)


def lens_top1(hidden: np.ndarray, head: Head) -> np.ndarray:
    """The argmax over the vocabulary of ``unembed(norm(hidden))`` for each row of ``hidden [N, hidden]``, float32
    (the model's RMSNorm), in blocks of :data:`COLUMN_BLOCK` columns; ties go to the lowest id, as ``np.argmax``."""
    x = np.asarray(hidden, np.float32)
    normed = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + np.float32(head.eps)) * head.scale
    best, top = np.full(len(x), -np.inf, np.float32), np.zeros(len(x), np.int64)
    rows = np.arange(len(x))
    for start in range(0, head.kernel.shape[1], COLUMN_BLOCK):
        logits = normed @ np.asarray(head.kernel[:, start : start + COLUMN_BLOCK], np.float32)
        local = logits.argmax(axis=-1)
        value = logits[rows, local]
        better = value > best
        best[better], top[better] = value[better], local[better] + start
    return top


def chunk_top1(states: list[np.ndarray], first: int, head: Head) -> np.ndarray:
    """``[depths, L - first]``: the lens argmax of positions ``first`` .. ``L - 1`` of each depth's ``[L, hidden]``."""
    scored = np.concatenate([np.asarray(s[first:], np.float32) for s in states])
    return lens_top1(scored, head).reshape(len(states), -1)


def exact_top1(params: Params, tokens: np.ndarray, length: int) -> np.ndarray:
    """The exact model's lens argmax ``[depths, positions]`` on every chunk's scored positions: JAX's forward pass
    with the weights streamed from the params file, one chunk at a time (run it in a process of its own)."""
    import jax.numpy as jnp

    from gptoss.model.gpt_oss import forward
    from gptoss.runtimes.jax_model import StreamedModel

    model, head = StreamedModel(params), read_head(params)
    depths, parts = params.model_config.num_hidden_layers, []
    for ids in text_chunks(tokens, length):
        out = forward(model, jnp.asarray(ids, jnp.int32), emit_hidden_states=True)
        parts.append(chunk_top1([np.asarray(out[f"hidden_state_{d}"][0]) for d in range(depths)], length // 2, head))
        del out
    return np.concatenate(parts, axis=1)


def probe_top1(session, probe: Path, head: Head, tokens: np.ndarray, length: int, depths: int) -> np.ndarray:
    """The variant's lens argmax ``[depths, positions]``: its probe graph (an ONNX Runtime session) on each chunk."""
    names = [f"hidden_state_{d}" for d in range(depths)]
    parts = []
    for c, ids in enumerate(text_chunks(tokens, length)):
        states = [s[0] for s in session.run(names, {INPUT_NAME: ids.astype(np.int32)})]
        if not all(np.isfinite(s).all() for s in states):
            raise GptOssError(f"{probe}: NaN/Inf hidden states in chunk {c} of the evaluation text")
        parts.append(chunk_top1(states, length // 2, head))
    return np.concatenate(parts, axis=1)


def kernel_settings(onnx_path: Path) -> set[tuple]:
    """The quantized kernels' settings of a graph (op, bits, block size, accuracy level), read without its weights."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    kernels = [n for n in graph.node if n.domain == "com.microsoft" and n.op_type in ("QMoE", "MatMulNBits")]
    return {
        (
            n.op_type,
            *sorted((a.name, onnx.helper.get_attribute_value(a)) for a in n.attribute if a.name in KERNEL_SETTINGS),
        )
        for n in kernels
    }


def open_probe(folder: Path, variant_onnx: Path, params: Params, length: int) -> Path:
    """Check a probe folder before anything runs: its graph has every ``hidden_state_{d}``, takes chunks of
    ``length`` tokens and holds the same quantized kernels as the variant's decoder. Returns the graph's path."""
    import onnx

    probe = Path(folder) / "model.onnx"
    if not probe.is_file():
        raise GptOssError(f"{probe}: --probe folder has no graph (gptoss export --stage debug --variant V)")
    graph = onnx.load(str(probe), load_external_data=False).graph
    missing = {f"hidden_state_{d}" for d in range(params.model_config.num_hidden_layers)}
    missing -= {o.name for o in graph.output}
    if missing:
        raise GptOssError(f"{probe}: not a probe of these params (no {sorted(missing)[0]} output)")
    dims = [d.dim_value or d.dim_param for d in graph.input[0].type.tensor_type.shape.dim]
    if dims[1:] != [length]:
        raise GptOssError(f"{probe}: takes sequences of {dims[1:]} tokens, the quality chunks are {length}: "
                          f"export it with --sequence-length {length}")  # fmt: skip
    if kernel_settings(probe) != kernel_settings(variant_onnx):
        raise GptOssError(f"{probe}: its quantized kernels are not those of {variant_onnx} (another variant?)")
    return probe


def depth_agreement(params: Params, probe: Path, tokens: np.ndarray, length: int, threads: int | None) -> np.ndarray:
    """The top-1 agreement of each block depth (:func:`open_probe`'s checked ``probe``): the exact side first, in
    a process of its own, then the probe's session; one value per depth."""
    from gptoss.runtimes.onnx_runtime import ort_session
    from gptoss.runtimes.process import in_fresh_process

    start, depths = time.perf_counter(), params.model_config.num_hidden_layers
    log.info("top-1 per block depth: the exact model's logit lens (JAX) on %d chunks", (len(tokens) - 1) // length)
    exact = in_fresh_process(exact_top1, params, tokens, length)
    log.info("top-1 per block depth: the probe's logit lens (%s), %.1f s", probe, time.perf_counter() - start)
    session = ort_session(probe, threads)
    variant = probe_top1(session, probe, read_head(params), tokens, length, depths)
    del session
    return (exact == variant).mean(axis=1)


def probe_provenance(probe: Path) -> dict[str, str]:
    """The probe's columns of the CSV: the sha256 of its graph and weights file."""
    return {"probe_onnx_sha256": sha256(probe), "probe_data_sha256": sha256(data_path(probe))}
