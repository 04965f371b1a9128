"""The model's parameters: their names, shapes and storage (``WEIGHT_FORMATS``), without allocating any."""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss.config import GptOssConfig
from gptoss.errors import GptOssError
from gptoss.model.gpt_oss import GptOss


def _path_to_name(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def abstract_model(cfg: GptOssConfig, weight_format: str = "float32") -> GptOss:
    """The model's structure with shape-only parameters (nothing allocated)."""
    return nnx.eval_shape(lambda: GptOss(cfg, weight_format))


def flat_param_specs(state: nnx.State) -> list[tuple[tuple, str, jax.ShapeDtypeStruct]]:
    """``(path, dotted name, shape/dtype)`` of every parameter of an abstract model's state, in state order."""
    return [(path, _path_to_name(path), var.get_value()) for path, var in nnx.to_flat_state(state)]


def param_specs(cfg: GptOssConfig, weight_format: str = "float32") -> dict[str, jax.ShapeDtypeStruct]:
    """Expected name → shape/dtype of every parameter, without allocating any."""
    return {name: spec for _, name, spec in flat_param_specs(nnx.state(abstract_model(cfg, weight_format)))}


def weight_format_of(params: Mapping[str, np.ndarray | jax.Array]) -> str:
    """The ``WEIGHT_FORMATS`` key that params are in (from their names and dtypes)."""
    if any(name.endswith("gate_up_blocks") for name in params):
        return "mxfp4"
    embedding = params.get("embed.embedding")
    return "bfloat16" if embedding is not None and embedding.dtype == jnp.bfloat16 else "float32"


def build_model(cfg: GptOssConfig, params: Mapping[str, np.ndarray | jax.Array]) -> GptOss:
    """A model holding ``params`` (flat dotted names, see the module docstring), checked name by name."""
    graphdef, state = nnx.split(abstract_model(cfg, weight_format_of(params)))
    flat = flat_param_specs(state)
    names = {name for _, name, _ in flat}
    missing = sorted(names - set(params))
    extra = sorted(set(params) - names)
    if missing or extra:
        raise GptOssError(f"params do not match the config: missing {missing[:3]}, unexpected {extra[:3]}")
    values = []
    for path, name, spec in flat:
        value = params[name]
        if tuple(value.shape) != tuple(spec.shape):
            raise GptOssError(f"param {name!r} has shape {list(value.shape)} but the config expects {list(spec.shape)}")
        values.append((path, jnp.asarray(value, dtype=spec.dtype)))
    return nnx.merge(graphdef, nnx.from_flat_state(values))
