"""The two runtimes the stages compare: the Flax model in JAX (weights read from the params file one block at a
time, outputs per prompt spilled to disk) and ONNX Runtime sessions on the exported graphs."""

from __future__ import annotations

import logging
import multiprocessing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import onnxruntime as ort
from flax import nnx

from gptoss.config import ParamsConfig, params_config_path
from gptoss.errors import GptOssError
from gptoss.model import abstract_model, flat_param_specs, forward, output_names
from gptoss.params_io import index_params, read_stored
from gptoss.prompts import Prompt, padded

T = TypeVar("T")


class StreamedModel:
    """The Flax model with its weights left in the params file: each piece (the embedding, block ``i``, the final
    norm, the unembedding) is read when it is used and dropped after, so the process holds one block's weights
    at a time, whatever the depth. :func:`gptoss.model.forward` and :func:`gptoss.model.decode_step` run it."""

    def __init__(self, params: Path, params_cfg: ParamsConfig) -> None:
        self.path, self.cfg = params, params_cfg.model
        self.index = index_params(params)
        self.skeleton = abstract_model(self.cfg, params_cfg.dtype)
        specs = {name: spec for _, name, spec in flat_param_specs(nnx.state(self.skeleton))}
        missing, extra = sorted(set(specs) - set(self.index)), sorted(set(self.index) - set(specs))
        if missing or extra:
            raise GptOssError(f"params do not match the config: missing {missing[:3]}, unexpected {extra[:3]}")
        for name, spec in specs.items():
            stored = self.index[name]
            if stored.shape != tuple(spec.shape) or stored.dtype != spec.dtype:
                raise GptOssError(
                    f"param {name!r} is {list(stored.shape)} {stored.dtype}, the config expects "
                    f"{list(spec.shape)} {jnp.dtype(spec.dtype)}"
                )

    def _load(self, module: nnx.Module, prefix: str) -> nnx.Module:
        # On CPU, `jax.device_put` adopts each freshly read (64-byte aligned) buffer without a copy.
        graphdef, state = nnx.split(module)
        values = [
            (path, jax.device_put(read_stored(self.path, self.index[prefix + name])))
            for path, name, _ in flat_param_specs(state)
        ]
        return nnx.merge(graphdef, nnx.from_flat_state(values))

    @property
    def embed(self) -> nnx.Module:
        return self._load(self.skeleton.embed, "embed.")

    @property
    def layers(self) -> Sequence[nnx.Module]:
        return _Blocks(self)

    @property
    def norm(self) -> nnx.Module:
        return self._load(self.skeleton.norm, "norm.")

    @property
    def unembed(self) -> nnx.Module:
        return self._load(self.skeleton.unembed, "unembed.")


class _Blocks(Sequence):
    """``StreamedModel.layers``: block ``i`` is read when it is asked for."""

    def __init__(self, model: StreamedModel) -> None:
        self.model = model

    def __len__(self) -> int:
        return len(self.model.skeleton.layers)

    def __getitem__(self, i: int) -> nnx.Module:
        if not -len(self) <= i < len(self):
            raise IndexError(i)
        i %= len(self)
        return self.model._load(self.model.skeleton.layers[i], f"layers.{i}.")


def load_model(params: Path, config: Path | None = None) -> tuple[ParamsConfig, StreamedModel]:
    """Params + config as a :class:`StreamedModel`; a mismatch between the two is one clear error."""
    config = config or params_config_path(params)
    params_cfg = ParamsConfig.read(config)
    try:
        return params_cfg, StreamedModel(params, params_cfg)
    except GptOssError as exc:
        raise GptOssError(f"{params} does not match {config}: {exc}") from None


def in_fresh_process(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a new process (spawned, so it shares nothing), its result or its exception returned here:
    the memory that a runtime keeps after a run goes back to the system when that process ends."""
    context = multiprocessing.get_context("spawn")
    with context.Pool(1, initializer=_child_logging, initargs=(logging.getLogger("gptoss").level,)) as pool:
        return pool.apply(fn, args)


def _child_logging(level: int) -> None:
    logging.basicConfig(format="%(asctime)s %(name)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    logging.getLogger("gptoss").setLevel(level)


def spill_jax_outputs(
    params: Path,
    config: Path | None,
    prompts: list[Prompt],
    sequence_length: int | None,
    hidden: bool,
    debug: bool,
    spill: Path,
    generate_tokens: int = 0,
    suppress: Sequence[int] = (),
) -> None:
    """Run the Flax model on every prompt: write ``spill/{prompt_id}.npz`` (the forward pass's outputs, unless
    ``sequence_length`` is None) and, with ``generate_tokens``, its greedy generation with the KV cache to
    ``spill/{prompt_id}.generation.npz``.

    The stages run it :func:`in_fresh_process`, because what JAX holds after a run (compiled programs, buffers
    its allocator keeps) stays with the process: on the 24-layer 20b that was 3 GB under the ONNX Runtime side
    that follows.
    """
    from gptoss.generation import jax_generate

    params_cfg, model = load_model(params, config)
    names = output_names(params_cfg.model, hidden, debug)
    for prompt in prompts:
        if sequence_length is not None:
            outputs = forward(model, jnp.asarray(padded(prompt, sequence_length)), hidden, debug)
            np.savez(spill / f"{prompt.prompt_id}.npz", **{n: np.asarray(outputs[n]) for n in names})
            del outputs
        if generate_tokens:
            generation = jax_generate(model, prompt.ids, generate_tokens, suppress)
            generation.save(spill / f"{prompt.prompt_id}.generation.npz")


def ort_session(onnx_path: Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session as a deployment (and onnxruntime-genai) makes it: full graph optimisations, memory arena.

    Weights that are not float32 (bfloat16, MXFP4) are overridable graph inputs (see
    ``gptoss.export.attach_weights``), so constant folding leaves their float32 casts and decodes to run time
    instead of keeping a float32 copy of every one.
    """
    if not Path(onnx_path).is_file():
        raise GptOssError(f"{onnx_path}: ONNX file not found")
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        return ort.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise GptOssError(f"{onnx_path}: ONNX Runtime cannot load the graph ({str(exc).splitlines()[0]})") from None
