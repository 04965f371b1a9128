"""ONNX Runtime sessions and file hashes for the graphs we run."""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import onnxruntime as ort

from gptoss.errors import GptOssError


def ort_session(onnx_path: Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session; full graph optimisations (what a deployment would use)."""
    if not Path(onnx_path).is_file():
        raise GptOssError(f"{onnx_path}: ONNX file not found")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    # bfloat16 weights are cast to float32 at use. Constant folding would cast them all once at load time, i.e.
    # hold a float32 copy of every weight; the CPU arena would keep the cast buffers and grow with every run
    # (measured at 20b: 10 GB after one run, 15.8 GB after two; without it, 9.9 GB whatever the number of runs).
    bf16 = has_bfloat16_weights(onnx_path)
    disabled = ["ConstantFolding"] if bf16 else []
    options.enable_cpu_mem_arena = not bf16
    try:
        return ort.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled
        )
    except Exception as exc:  # onnxruntime raises its own exception types
        raise GptOssError(f"{onnx_path}: ONNX Runtime cannot load the graph ({str(exc).splitlines()[0]})") from None


def has_bfloat16_weights(onnx_path: Path) -> bool:
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    return any(t.data_type == onnx.TensorProto.BFLOAT16 for t in graph.initializer)


def sha256(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
