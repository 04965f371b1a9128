"""The two runtimes the stages compare: the Flax model in JAX (params read into memory, forward pass per
prompt spilled to disk) and ONNX Runtime sessions on the exported graphs."""

from __future__ import annotations

import gc
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import onnx
import onnxruntime as ort

from gptoss.config import ParamsConfig, params_config_path
from gptoss.errors import GptOssError
from gptoss.model import GptOss, build_model, forward, output_names
from gptoss.params_io import iter_params
from gptoss.prompts import Prompt, padded


def load_model(params: Path, config: Path | None = None) -> tuple[ParamsConfig, GptOss]:
    """Read params + config and build the Flax model; mismatches become one clear error."""
    config = config or params_config_path(params)
    params_cfg = ParamsConfig.read(config)
    # On CPU, `jax.device_put` adopts each freshly read (64-byte aligned) numpy buffer without a copy, so the
    # params are in memory once (`jnp.asarray` would copy each one: +1.2 GB peak at 20b bf16).
    arrays = {name: jax.device_put(arr) for name, arr in iter_params(params)}
    try:
        model = build_model(params_cfg.model, arrays)
    except GptOssError as exc:
        raise GptOssError(f"{params} does not match {config}: {exc}") from None
    return params_cfg, model


def spill_jax_outputs(
    params: Path,
    config: Path | None,
    prompts: list[Prompt],
    sequence_length: int,
    hidden: bool,
    debug: bool,
    spill: Path,
    generate_tokens: int = 0,
    suppress: Sequence[int] = (),
) -> None:
    """Run the Flax model on every prompt; write ``spill/{prompt_id}.npz`` and, with ``generate_tokens``, its
    greedy generation with the KV cache to ``spill/{prompt_id}.generation.npz``."""
    from gptoss.generation import jax_generate

    params_cfg, model = load_model(params, config)
    names = output_names(params_cfg.model, hidden, debug)
    for prompt in prompts:
        outputs = forward(model, jnp.asarray(padded(prompt, sequence_length)), hidden, debug)
        np.savez(spill / f"{prompt.prompt_id}.npz", **{n: np.asarray(outputs[n]) for n in names})
        del outputs
        if generate_tokens:
            jax_generate(model, prompt.ids, generate_tokens, suppress).save(
                spill / f"{prompt.prompt_id}.generation.npz"
            )
    del model
    gc.collect()


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
