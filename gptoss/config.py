"""The model configuration: read from an HF ``config.json``, an ``original/config.json`` or our own params config."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from gptoss.errors import GptOssError

SLIDING = "sliding_attention"
FULL = "full_attention"


def default_layer_types(num_layers: int) -> tuple[str, ...]:
    """gpt-oss's pattern when a config names none: sliding attention on even layers, full on odd ones."""
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters (DESIGN §3): fractional low/high when ``truncate`` is false."""

    factor: float = 32.0
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    original_max_position_embeddings: int = 4096
    truncate: bool = False


@dataclasses.dataclass(frozen=True)
class GptOssConfig:
    """Architecture of a GPT-OSS model (the fields that change the computation)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    sliding_window: int
    layer_types: tuple[str, ...]
    rms_norm_eps: float = 1e-5
    rope_theta: float = 150000.0
    rope_scaling: RopeScaling = dataclasses.field(default_factory=RopeScaling)
    swiglu_limit: float = 7.0
    swiglu_alpha: float = 1.702

    def __post_init__(self) -> None:
        if self.num_attention_heads % self.num_key_value_heads:
            raise GptOssError(
                f"num_attention_heads={self.num_attention_heads} is not a multiple of "
                f"num_key_value_heads={self.num_key_value_heads}"
            )
        if len(self.layer_types) != self.num_hidden_layers:
            raise GptOssError(
                f"layer_types has {len(self.layer_types)} entries but num_hidden_layers={self.num_hidden_layers}"
            )
        bad = sorted(set(self.layer_types) - {SLIDING, FULL})
        if bad:
            raise GptOssError(f"unknown layer_types {bad}; expected {SLIDING!r} or {FULL!r}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise GptOssError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_local_experts={self.num_local_experts}"
            )

    def truncated(self, num_layers: int) -> GptOssConfig:
        """The same architecture with only the first ``num_layers`` blocks."""
        if not 1 <= num_layers <= self.num_hidden_layers:
            raise GptOssError(f"--layers {num_layers} is outside the checkpoint's 1..{self.num_hidden_layers} layers")
        return dataclasses.replace(self, num_hidden_layers=num_layers, layer_types=self.layer_types[:num_layers])

    def param_count(self) -> int:
        """Number of parameters (experts counted dequantized)."""
        h, i, e = self.hidden_size, self.intermediate_size, self.num_local_experts
        nq, nkv, d = self.num_attention_heads, self.num_key_value_heads, self.head_dim
        attn = h * nq * d + nq * d + 2 * (h * nkv * d + nkv * d) + nq * d * h + h + nq
        moe = h * e + e + e * (h * 2 * i + 2 * i + i * h + h)
        block = attn + moe + 2 * h
        return self.num_hidden_layers * block + 2 * self.vocab_size * h + h

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF-style ``config.json`` dict (transformers accepts it as ``GptOssConfig``)."""
        rs = self.rope_scaling
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "num_local_experts": self.num_local_experts,
            "num_experts_per_tok": self.num_experts_per_tok,
            "sliding_window": self.sliding_window,
            "layer_types": list(self.layer_types),
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": {"rope_type": "yarn", **dataclasses.asdict(rs)},
            "swiglu_limit": self.swiglu_limit,
            "attention_bias": True,
            "tie_word_embeddings": False,
            "max_position_embeddings": int(rs.original_max_position_embeddings * rs.factor),
            "initial_context_length": rs.original_max_position_embeddings,
        }

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> GptOssConfig:
        """Parse an HF ``config.json`` (``rope_scaling``+``rope_theta`` or the v5 ``rope_parameters`` form)."""
        arch = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if model_type != "gpt_oss" and "GptOssForCausalLM" not in arch:
            raise GptOssError(f"{source}: not a GPT-OSS config (model_type={model_type!r}, architectures={arch!r})")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        theta = raw.get("rope_theta", rope.get("rope_theta", 150000.0))
        rope_type = rope.get("rope_type", rope.get("type", "yarn"))
        if rope_type != "yarn":
            raise GptOssError(f"{source}: rope type {rope_type!r} is not supported (GPT-OSS uses 'yarn')")
        num_layers = _require(raw, "num_hidden_layers", source)
        layer_types = raw.get("layer_types") or default_layer_types(num_layers)
        defaults = RopeScaling()
        return cls(
            vocab_size=_require(raw, "vocab_size", source),
            hidden_size=_require(raw, "hidden_size", source),
            intermediate_size=_require(raw, "intermediate_size", source),
            num_hidden_layers=num_layers,
            num_attention_heads=_require(raw, "num_attention_heads", source),
            num_key_value_heads=raw.get("num_key_value_heads") or _require(raw, "num_attention_heads", source),
            head_dim=raw.get("head_dim")
            or _require(raw, "hidden_size", source) // _require(raw, "num_attention_heads", source),
            num_local_experts=_require(raw, "num_local_experts", source),
            num_experts_per_tok=_require(raw, "num_experts_per_tok", source),
            sliding_window=_require(raw, "sliding_window", source),
            layer_types=tuple(layer_types),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            rope_theta=float(theta),
            rope_scaling=RopeScaling(
                factor=float(rope.get("factor", defaults.factor)),
                beta_fast=float(rope.get("beta_fast", defaults.beta_fast)),
                beta_slow=float(rope.get("beta_slow", defaults.beta_slow)),
                original_max_position_embeddings=int(
                    rope.get("original_max_position_embeddings", defaults.original_max_position_embeddings)
                ),
                truncate=bool(rope.get("truncate", defaults.truncate)),
            ),
            swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
            swiglu_alpha=float(raw.get("swiglu_alpha", 1.702)),
        )

    @classmethod
    def from_original_dict(cls, raw: dict[str, Any], source: str = "original/config.json") -> GptOssConfig:
        """Parse OpenAI's ``original/config.json`` (sliding window on even layers)."""
        num_layers = _require(raw, "num_hidden_layers", source)
        return cls(
            vocab_size=_require(raw, "vocab_size", source),
            hidden_size=_require(raw, "hidden_size", source),
            intermediate_size=_require(raw, "intermediate_size", source),
            num_hidden_layers=num_layers,
            num_attention_heads=_require(raw, "num_attention_heads", source),
            num_key_value_heads=_require(raw, "num_key_value_heads", source),
            head_dim=_require(raw, "head_dim", source),
            num_local_experts=_require(raw, "num_experts", source),
            num_experts_per_tok=_require(raw, "experts_per_token", source),
            sliding_window=_require(raw, "sliding_window", source),
            layer_types=default_layer_types(num_layers),
            rope_theta=float(raw.get("rope_theta", 150000.0)),
            rope_scaling=RopeScaling(
                factor=float(raw.get("rope_scaling_factor", 32.0)),
                # OpenAI's ntk_beta is the fast boundary, ntk_alpha the slow one.
                beta_fast=float(raw.get("rope_ntk_beta", 32.0)),
                beta_slow=float(raw.get("rope_ntk_alpha", 1.0)),
                original_max_position_embeddings=int(raw.get("initial_context_length", 4096)),
                truncate=False,
            ),
            swiglu_limit=float(raw.get("swiglu_limit", 7.0)),
        )

    def to_original_dict(self) -> dict[str, Any]:
        """OpenAI's ``original/config.json`` form."""
        rs = self.rope_scaling
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "num_experts": self.num_local_experts,
            "experts_per_token": self.num_experts_per_tok,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": rs.original_max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling_factor": rs.factor,
            "rope_ntk_alpha": rs.beta_slow,
            "rope_ntk_beta": rs.beta_fast,
        }


def _require(raw: dict[str, Any], key: str, source: str) -> Any:
    if key not in raw or raw[key] is None:
        raise GptOssError(f"{source}: missing required field {key!r}")
    return raw[key]


def read_json(path: Path) -> dict[str, Any]:
    """Read a JSON object, with a clear error naming the file."""
    if not path.is_file():
        raise GptOssError(f"{path}: file not found")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GptOssError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise GptOssError(f"{path}: expected a JSON object")
    return raw


def load_checkpoint_config(checkpoint_dir: Path) -> GptOssConfig:
    """The config of a checkpoint folder: ``config.json`` (HF) or ``original/config.json`` / ``config.json``
    in OpenAI's form (recognised by ``experts_per_token`` without HF's ``model_type``/``architectures``: the real
    HF ``config.json`` of gpt-oss carries ``experts_per_token`` too)."""
    for candidate in (checkpoint_dir / "config.json", checkpoint_dir / "original" / "config.json"):
        if candidate.is_file():
            raw = read_json(candidate)
            if "experts_per_token" in raw and "model_type" not in raw and "architectures" not in raw:
                return GptOssConfig.from_original_dict(raw, str(candidate))
            return GptOssConfig.from_hf_dict(raw, str(candidate))
    raise GptOssError(f"{checkpoint_dir}: no config.json (nor original/config.json) found")


@dataclasses.dataclass(frozen=True)
class ParamsConfig:
    """What ``gptoss convert`` writes next to the params: the architecture plus where it came from."""

    model: GptOssConfig
    dtype: str
    source_checkpoint: str
    tokenizer: str | None
    source_layers: int
    # How the checkpoint was made: the hub's download.json (repo_id, revision, resolved commit) or synth.json.
    origin: dict[str, Any] | None = None

    def checkpoint_info(self) -> dict[str, Any]:
        """Where the params came from: the folder and, for hub checkpoints, repo and resolved commit."""
        return {"path": self.source_checkpoint, **(self.origin or {})}

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.model.to_hf_dict(),
            "gptoss": {
                "layers": self.model.num_hidden_layers,
                "dtype": self.dtype,
                "source_checkpoint": self.source_checkpoint,
                "source_layers": self.source_layers,
                "tokenizer": self.tokenizer,
                "origin": self.origin,
            },
        }

    @classmethod
    def read(cls, path: Path) -> ParamsConfig:
        raw = read_json(path)
        meta = raw.get("gptoss")
        if not isinstance(meta, dict):
            raise GptOssError(f"{path}: not a params config written by `gptoss convert` (no 'gptoss' section)")
        model = GptOssConfig.from_hf_dict(raw, str(path))
        return cls(
            model=model,
            dtype=meta.get("dtype", "float32"),
            source_checkpoint=meta.get("source_checkpoint", ""),
            tokenizer=meta.get("tokenizer"),
            source_layers=int(meta.get("source_layers", model.num_hidden_layers)),
            origin=meta.get("origin"),
        )


def params_config_path(params_path: Path) -> Path:
    """``x/flax_params_2layers.msgpack`` → ``x/flax_params_2layers.config.json`` (the seed's naming)."""
    return params_path.with_name(params_path.stem + ".config.json")


def yarn_concentration(rs: RopeScaling) -> float:
    """YaRN attention scaling ``0.1·ln(factor) + 1`` (multiplied into both cos and sin)."""
    return 0.1 * math.log(rs.factor) + 1.0 if rs.factor > 1.0 else 1.0
