"""The model configuration: read from an HF ``config.json``, an ``original/config.json`` or our own params config."""

from __future__ import annotations

import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any

from gptoss.errors import GptOssError

# How a params file stores its weights (gptoss.model.layers.WEIGHT_FORMATS gives each its dtypes).
WEIGHT_FORMAT_NAMES = ("float32", "bfloat16", "mxfp4")

SLIDING = "sliding_attention"
FULL = "full_attention"


def default_layer_types(num_layers: int) -> tuple[str, ...]:
    """gpt-oss's pattern when a config names none: sliding attention on even layers, full on odd ones."""
    return tuple(SLIDING if i % 2 == 0 else FULL for i in range(num_layers))


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """YaRN parameters: fractional ramp boundaries (low/high) when ``truncate`` is false."""

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
        if bad := sorted(set(self.layer_types) - {SLIDING, FULL}):
            raise GptOssError(f"unknown layer_types {bad}; expected {SLIDING!r} or {FULL!r}")
        if self.num_experts_per_tok > self.num_local_experts:
            raise GptOssError(
                f"num_experts_per_tok={self.num_experts_per_tok} exceeds num_local_experts={self.num_local_experts}"
            )

    @property
    def max_position_embeddings(self) -> int:
        """The context YaRN stretches the original one to (131072 for gpt-oss)."""
        return int(self.rope_scaling.original_max_position_embeddings * self.rope_scaling.factor)

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

    def weight_bytes(self, weight_format: str) -> int:
        """Bytes of the weights stored as ``weight_format``: float32, bfloat16, or mxfp4 (experts as 4-bit codes
        plus one 8-bit scale per 32, every other weight bfloat16 — also the size of an HF checkpoint)."""
        if weight_format == "mxfp4":
            experts = self.num_hidden_layers * self.num_local_experts * 3 * self.hidden_size * self.intermediate_size
            return int(2 * (self.param_count() - experts) + experts * 17 / 32)
        return self.param_count() * {"float32": 4, "bfloat16": 2}[weight_format]

    def to_hf_dict(self) -> dict[str, Any]:
        """An HF-style ``config.json`` dict (transformers accepts it as ``GptOssConfig``)."""
        rs = self.rope_scaling
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            **{field: getattr(self, field) for field in CONFIG_KEYS},
            "layer_types": list(self.layer_types),
            "rope_scaling": {"rope_type": "yarn", **dataclasses.asdict(rs)},
            "attention_bias": True,
            "tie_word_embeddings": False,
            "max_position_embeddings": self.max_position_embeddings,
            "initial_context_length": rs.original_max_position_embeddings,
        }

    def to_original_dict(self) -> dict[str, Any]:
        """OpenAI's ``original/config.json`` form."""
        rope = {original: getattr(self.rope_scaling, field) for field, original in ROPE_ORIGINAL_KEYS.items()}
        return {original: getattr(self, field) for field, original in CONFIG_KEYS.items() if original} | rope

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any], source: str = "config.json") -> GptOssConfig:
        """Parse an HF ``config.json`` (``rope_scaling``+``rope_theta`` or the v5 ``rope_parameters`` form)."""
        arch = raw.get("architectures") or []
        model_type = raw.get("model_type")
        if model_type != "gpt_oss" and "GptOssForCausalLM" not in arch:
            raise GptOssError(f"{source}: not a GPT-OSS config (model_type={model_type!r}, architectures={arch!r})")
        rope = raw.get("rope_parameters") or raw.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "yarn"))
        if rope_type != "yarn":
            raise GptOssError(f"{source}: rope type {rope_type!r} is not supported (GPT-OSS uses 'yarn')")
        raw = {"rope_theta": rope.get("rope_theta"), **raw}  # v5 keeps theta among the rope parameters
        heads = _require(raw, "num_attention_heads", source)
        # transformers derives the kv head count and head size when a config leaves them out
        fields = _fields(raw, {f: f for f in CONFIG_KEYS}, source, derived=("num_key_value_heads", "head_dim"))
        fields.setdefault("num_key_value_heads", heads)
        fields.setdefault("head_dim", _require(raw, "hidden_size", source) // heads)
        layer_types = raw.get("layer_types") or default_layer_types(fields["num_hidden_layers"])
        scaling = _fields(rope, {field: field for field in ROPE_ORIGINAL_KEYS} | {"truncate": "truncate"}, source)
        return cls(**fields, layer_types=tuple(layer_types), rope_scaling=RopeScaling(**scaling))

    @classmethod
    def from_original_dict(cls, raw: dict[str, Any], source: str = "original/config.json") -> GptOssConfig:
        """Parse OpenAI's ``original/config.json`` (sliding window on even layers, no truncation of YaRN)."""
        fields = _fields(raw, {field: original for field, original in CONFIG_KEYS.items() if original}, source)
        scaling = _fields(raw, ROPE_ORIGINAL_KEYS, source)
        layer_types = default_layer_types(fields["num_hidden_layers"])
        return cls(**fields, layer_types=layer_types, rope_scaling=RopeScaling(**scaling, truncate=False))


# GptOssConfig field (HF's config.json key too) -> its original/config.json key, or None where original/ has none.
# Fields without a default are required in both files; the others fall back to the dataclass defaults.
ORIGINAL_RENAMES = {"num_local_experts": "num_experts", "num_experts_per_tok": "experts_per_token"}
CONFIG_KEYS = {
    f.name: None if f.name in ("rms_norm_eps", "swiglu_alpha") else ORIGINAL_RENAMES.get(f.name, f.name)
    for f in dataclasses.fields(GptOssConfig)
    if f.name not in ("layer_types", "rope_scaling")
}
# RopeScaling field -> original/config.json key (HF uses the field names). OpenAI's ntk_beta is the fast
# boundary, ntk_alpha the slow one.
ROPE_ORIGINAL_KEYS = {
    "factor": "rope_scaling_factor",
    "beta_fast": "rope_ntk_beta",
    "beta_slow": "rope_ntk_alpha",
    "original_max_position_embeddings": "initial_context_length",
}


def _fields(raw: dict[str, Any], keys: dict[str, str], source: str, derived: tuple[str, ...] = ()) -> dict[str, Any]:
    """Dataclass fields from ``raw`` through ``keys`` (field -> file key), typed like the field's default;
    a field without a default must be present (unless ``derived``), the others are omitted when absent."""
    found: dict[str, Any] = {}
    defaults = {f.name: f.default for f in dataclasses.fields(GptOssConfig) + dataclasses.fields(RopeScaling)}
    for field, key in keys.items():
        default = defaults[field]
        if raw.get(key) is not None:
            found[field] = type(default)(raw[key]) if default is not dataclasses.MISSING else raw[key]
        elif default is dataclasses.MISSING and field not in derived:
            _require(raw, key, source)
    return found


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
    weight_format: str  # a key of gptoss.model.layers.WEIGHT_FORMATS
    source_checkpoint: str
    tokenizer: str | None
    source_layers: int
    # Where the checkpoint comes from: the hub's download.json (repo_id, revision, resolved commit) or synth.json.
    origin: dict[str, Any] | None = None
    # bos_token_id, eos_token_id (a list), pad_token_id, do_sample: generation_config.json's, else config.json's.
    generation: dict[str, Any] | None = None

    @property
    def eos_token_ids(self) -> list[int]:
        """The checkpoint's end-of-sequence ids (what greedy parity suppresses so every step runs)."""
        return list((self.generation or {}).get("eos_token_id", []))

    def checkpoint_info(self) -> dict[str, Any]:
        """The source without this machine's folders: the origin file convert found (hub repo and commit, or
        synthetic preset and seed), else the folder relative to the working directory."""
        return dict(self.origin) if self.origin else {"local": os.path.relpath(self.source_checkpoint)}

    def to_dict(self) -> dict[str, Any]:
        return {
            **self.model.to_hf_dict(),
            "gptoss": {
                "layers": self.model.num_hidden_layers,
                "weight_format": self.weight_format,
                "source_checkpoint": self.source_checkpoint,
                "source_layers": self.source_layers,
                "tokenizer": self.tokenizer,
                "origin": self.origin,
                "generation": self.generation,
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
            weight_format=meta.get("weight_format", meta.get("dtype", "float32")),  # "dtype": older files
            source_checkpoint=meta.get("source_checkpoint", ""),
            tokenizer=meta.get("tokenizer"),
            source_layers=int(meta.get("source_layers", model.num_hidden_layers)),
            origin=meta.get("origin"),
            generation=meta.get("generation"),
        )


def generation_tokens(checkpoint_dir: Path) -> dict[str, Any] | None:
    """A checkpoint's special token ids and sampling default, as its ``generation_config.json`` gives them (else
    its ``config.json``); eos ids always as a list. None when neither names an eos id."""
    found: dict[str, Any] = {}
    for name in ("config.json", "generation_config.json"):  # the generation config wins
        path = checkpoint_dir / name
        if path.is_file():
            raw = read_json(path)
            found |= {k: raw[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "do_sample") if k in raw}
    if (eos := found.get("eos_token_id")) is None:
        return None
    return found | {"eos_token_id": eos if isinstance(eos, list) else [eos]}


def params_config_path(params_path: Path) -> Path:
    """``x/flax_params_2layers.msgpack`` → ``x/flax_params_2layers.config.json``."""
    return params_path.with_name(params_path.stem + ".config.json")


def yarn_concentration(rs: RopeScaling) -> float:
    """YaRN attention scaling ``0.1·ln(factor) + 1`` (multiplied into both cos and sin)."""
    return 0.1 * math.log(rs.factor) + 1.0 if rs.factor > 1.0 else 1.0
