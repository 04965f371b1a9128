"""The model's parameters: their names, shapes and storage (``WEIGHT_FORMATS``), without allocating any; and a
params file opened against them (:class:`Params`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from gptoss.config import GptOssConfig, ParamsConfig, params_config_path
from gptoss.errors import GptOssError
from gptoss.formats.params_file import StoredArray, index_params, read_stored
from gptoss.model.gpt_oss import GptOss


def abstract_model(cfg: GptOssConfig, weight_format: str = "float32") -> GptOss:
    """The model's structure with shape-only parameters (nothing allocated)."""
    return nnx.eval_shape(lambda: GptOss(cfg, weight_format))


def flat_param_specs(state: nnx.State) -> list[tuple[tuple, str, jax.ShapeDtypeStruct]]:
    """``(path, dotted name, shape/dtype)`` of every parameter of an abstract model's state, in state order."""
    return [(path, ".".join(str(p) for p in path), var.get_value()) for path, var in nnx.to_flat_state(state)]


def param_specs(cfg: GptOssConfig, weight_format: str = "float32") -> dict[str, jax.ShapeDtypeStruct]:
    """Expected name → shape/dtype of every parameter, without allocating any."""
    return {name: spec for _, name, spec in flat_param_specs(nnx.state(abstract_model(cfg, weight_format)))}


def weight_format_of(params: Mapping[str, np.ndarray | jax.Array]) -> str:
    """The ``WEIGHT_FORMATS`` key that params are in (from their names and dtypes)."""
    if any(name.endswith("gate_up_blocks") for name in params):
        return "mxfp4"
    embedding = params.get("embed.embedding")
    return "bfloat16" if embedding is not None and embedding.dtype == jnp.bfloat16 else "float32"


def mismatch(
    found: Mapping[str, tuple[tuple[int, ...], np.dtype | None]], cfg: GptOssConfig, weight_format: str
) -> str:
    """What is wrong with ``found`` (name → shape, dtype; dtype None: any) against the model's parameters, or ''."""
    specs = param_specs(cfg, weight_format)
    missing, extra = sorted(set(specs) - set(found)), sorted(set(found) - set(specs))
    if missing or extra:
        return f"missing {missing[:3]}, unexpected {extra[:3]}"
    for name, spec in specs.items():
        shape, dtype = found[name]
        want = (tuple(spec.shape), np.dtype(spec.dtype))
        if tuple(shape) != want[0] or (dtype is not None and np.dtype(dtype) != want[1]):
            stored = f"{list(shape)}" + (f" {np.dtype(dtype)}" if dtype is not None else "")
            return f"{name!r} is {stored}, the config expects {list(want[0])} {want[1]}"
    return ""


@dataclasses.dataclass(frozen=True)
class Params:
    """A params file opened once: its config (``X.config.json`` beside it unless given) and the place of every
    array in it, checked against the parameters that config's model has. Every stage takes one."""

    path: Path
    config_path: Path
    config: ParamsConfig
    index: dict[str, StoredArray]

    @classmethod
    def open(cls, path: Path, config: Path | None = None) -> Params:
        path = Path(path)
        if not path.is_file():
            raise GptOssError(f"{path}: params file not found")
        config_path = Path(config) if config else params_config_path(path)
        params_cfg = ParamsConfig.read(config_path)
        index = index_params(path)
        found = {name: (stored.shape, stored.dtype) for name, stored in index.items()}
        if problem := mismatch(found, params_cfg.model, params_cfg.weight_format):
            raise GptOssError(f"{path} does not match {config_path}: {problem}")
        return cls(path, config_path, params_cfg, index)

    @property
    def model_config(self) -> GptOssConfig:
        return self.config.model

    def read(self, name: str) -> np.ndarray:
        """One array, read from its place in the file."""
        return read_stored(self.path, self.index[name])


def build_model(cfg: GptOssConfig, params: Mapping[str, np.ndarray | jax.Array]) -> GptOss:
    """A model holding ``params`` (flat dotted names, see :mod:`gptoss.model.layers`), checked name by name."""
    weight_format = weight_format_of(params)
    if problem := mismatch({name: (value.shape, None) for name, value in params.items()}, cfg, weight_format):
        raise GptOssError(f"params do not match the config: {problem}")
    graphdef, state = nnx.split(abstract_model(cfg, weight_format))
    values = [(path, jnp.asarray(params[name], dtype=spec.dtype)) for path, name, spec in flat_param_specs(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(values))
