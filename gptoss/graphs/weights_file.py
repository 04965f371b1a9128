"""The weights file every graph of a model shares (``model.onnx.data`` beside the graphs): where each weight goes,
streaming the large ones into it (one tensor at a time), and turning a traced graph's weight inputs into
initializers that point into it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from gptoss.errors import GptOssError
from gptoss.files import atomic_output, require_free_space
from gptoss.formats.params_file import StoredArray
from gptoss.graphs.names import is_data_input, viewed_weight

if TYPE_CHECKING:
    from gptoss.model.params import Params

EXTERNAL_THRESHOLD_BYTES = 1024 * 1024
DATA_ALIGNMENT = 64 * 1024


@dataclass(frozen=True)
class Placed:
    """A weight's place in the weights file: ``offset`` and ``nbytes`` there, or ``None`` (small: in the graph)."""

    name: str
    stored: StoredArray
    offset: int | None
    nbytes: int


def weights_layout(params: Params) -> tuple[list[Placed], int]:
    """Where each weight of ``params`` goes, and the weights file's size. Tensors over ``EXTERNAL_THRESHOLD_BYTES``
    go to the file, in the params' order, each at a 64 KiB-aligned offset so ONNX Runtime can memory-map it. A
    function of the params alone, so every graph of a model shares one weights file."""
    layout, end = [], 0
    for name, place in params.index.items():
        nbytes = sum(n for _, n in place.segments)
        offset = None if nbytes <= EXTERNAL_THRESHOLD_BYTES else end + (-end % DATA_ALIGNMENT)
        layout.append(Placed(name, place, offset, nbytes))
        end = end if offset is None else offset + nbytes
    return layout, end


def write_weights(params: Params, layout: list[Placed], data_file: Path) -> None:
    """Stream the large weights into ``data_file`` (a temporary renamed into place), one tensor at a time."""
    require_free_space(data_file.parent, params.path.stat().st_size, data_file.name)
    with atomic_output(data_file) as tmp, open(tmp, "wb") as fh:
        for placed in (p for p in layout if p.offset is not None):
            fh.write(b"\0" * (placed.offset - fh.tell()))
            fh.write(memoryview(params.read(placed.name).reshape(-1).view(np.uint8)))


def attach_weights(onnx_model: ir.Model, params: Params, layout: list[Placed], size: int, data_file: Path) -> None:
    """Turn the weight inputs into initializers by their ``layout`` (:func:`weights_layout`): the large ones point
    into ``data_file`` (written by :func:`write_weights`, or an earlier export's: it is checked to have the
    layout's ``size``), the small ones are read into the graph."""
    graph = onnx_model.graph
    inputs = {v.name: v for v in graph.inputs if not is_data_input(v.name)}
    if not data_file.is_file() or data_file.stat().st_size != size:
        found = f"{data_file.stat().st_size} bytes" if data_file.is_file() else "no file"
        raise GptOssError(f"{data_file}: {found}, but the weights of {params.path} take {size}: export them first")
    placed_by_name = {placed.name: placed for placed in layout}

    def external(placed: Placed, value: ir.Value, offset: int, nbytes: int) -> ir.ExternalTensor:
        return ir.ExternalTensor(
            data_file.name, offset, nbytes, value.dtype, shape=value.shape, name=value.name, base_dir=data_file.parent
        )

    for name, value in inputs.items():
        view = viewed_weight(name)
        placed = placed_by_name[view[0] if view else name]
        if view is not None:  # one expert's bytes: a slice of the weight's, in the file or read
            experts = placed.stored.shape[0]
            nbytes = placed.nbytes // experts
            if placed.offset is None:
                value.const_value = ir.Tensor(params.read(placed.name)[view[1]], name=name)
            else:
                value.const_value = external(placed, value, placed.offset + view[1] * nbytes, nbytes)
        elif placed.offset is None:
            value.const_value = ir.Tensor(params.read(placed.name), name=placed.name)
        else:
            value.const_value = external(placed, value, placed.offset, placed.nbytes)
    # Weights that are not float32 (bfloat16, MXFP4 blocks and scales) stay graph inputs too, with their initializers
    # as defaults: ONNX Runtime never constant-folds an overridable initializer (folded, their float32 casts and MXFP4
    # decodes would be kept from load on, 4-8x their size; onnxruntime-genai cannot switch folding off). Float32
    # weights, expert views included, are constants: ONNX Runtime pre-packs them for their MatMul or Gemm once, at
    # load, in place of the mapped bytes (the 2-layer float32 decoder's prefill of 32 tokens: 0.63 s against 0.83 s
    # with every call packing its expert views).
    graph.inputs[:] = [v for v in graph.inputs if is_data_input(v.name) or v.dtype != ir.DataType.FLOAT]
    for value in inputs.values():
        graph.register_initializer(value)
