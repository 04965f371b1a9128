"""Checkpoint and params I/O: our safetensors reader, the msgpack params format, synth, tokenizer, config parsing."""

from __future__ import annotations

import json
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import forward, require_modules
from flax import serialization
from safetensors.numpy import load_file, save_file

from gptoss.config import (
    FULL,
    SLIDING,
    GptOssConfig,
    ParamsConfig,
    RopeScaling,
    load_checkpoint_config,
    params_config_path,
)
from gptoss.errors import GptOssError
from gptoss.files import temporary_name
from gptoss.formats import params_file
from gptoss.formats.params_file import read_params, write_params
from gptoss.formats.safetensors_file import INDEX_NAME, SafetensorsFile, TensorStore
from gptoss.formats.synth import synthesize
from gptoss.formats.tokenizer import encode, load_tokenizer
from gptoss.model.convert import convert
from gptoss.model.params import build_model

BF16 = np.dtype(ml_dtypes.bfloat16)


def sample_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "f32": rng.standard_normal((3, 5)).astype(np.float32),
        "bf16": rng.standard_normal((4, 6)).astype(BF16),
        "f16": rng.standard_normal((7,)).astype(np.float16),
        "u8": rng.integers(0, 256, size=(2, 3, 16), dtype=np.uint8),
        "i64": rng.integers(-(2**40), 2**40, size=(5,), dtype=np.int64),
        "i32": rng.integers(-100, 100, size=(2, 2), dtype=np.int32),
        "scalar": np.array(2.5, np.float32),
        "empty": np.zeros((0, 3), np.float32),
    }


def assert_same(a: np.ndarray, b: np.ndarray) -> None:
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes()


# --- safetensors --------------------------------------------------------------------------------------------------


def test_safetensors_reader_matches_the_safetensors_library(tmp_path):
    arrays = sample_arrays()
    path = tmp_path / "x.safetensors"
    save_file(arrays, str(path), metadata={"format": "pt"})
    reference = load_file(str(path))
    ours = SafetensorsFile(path)
    assert sorted(ours.keys()) == sorted(reference) == sorted(arrays)
    assert ours.metadata == {"format": "pt"}
    for name, expected in reference.items():
        got = ours.get(name)
        assert ours.shape(name) == expected.shape and ours.dtype(name) == expected.dtype
        assert_same(np.asarray(got), expected)
        assert_same(np.asarray(got), arrays[name])
        got[...] = 0  # a tensor of our own, read from the file: changing it changes neither the file nor a re-read
        assert_same(np.asarray(ours.get(name)), expected)
    assert load_file(str(path)).keys() == reference.keys()


def test_tensor_store_follows_a_sharded_index(tmp_path):
    arrays = sample_arrays()
    names = sorted(arrays)
    shards = {"model-00001-of-00002.safetensors": names[:4], "model-00002-of-00002.safetensors": names[4:]}
    for shard, keys in shards.items():
        save_file({k: arrays[k] for k in keys}, str(tmp_path / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (tmp_path / INDEX_NAME).write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "stray.safetensors").write_bytes(b"not listed in the index, never opened")
    store = TensorStore.open(tmp_path)
    assert sorted(store.names()) == names
    for name in names:
        assert store.file_of(name).name == weight_map[name]
        assert_same(np.asarray(store.get(name)), arrays[name])
    with pytest.raises(GptOssError, match="missing tensor 'nope'"):
        store.get("nope")


# --- params msgpack -----------------------------------------------------------------------------------------------


def nested(flat: dict[str, np.ndarray]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def flatten(tree: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = np.asarray(value)
    return out


PARAMS = {
    "embed.embedding": np.arange(12, dtype=np.float32).reshape(4, 3),
    "layers.0.attn.q_proj.kernel": np.linspace(-1, 1, 15, dtype=np.float32).reshape(3, 5),
    "layers.0.attn.sinks": np.array([0.5, -2.0], BF16),
    "layers.1.mlp.gate_up_kernel": np.arange(24, dtype=np.float32).reshape(2, 3, 4).astype(BF16),
    "layers.1.blocks": np.arange(32, dtype=np.uint8).reshape(2, 16),
    "norm.scale": np.ones(3, np.float32),
}


def test_params_round_trip_and_flax_compatibility(tmp_path):
    path = tmp_path / "p.msgpack"
    calls = []
    write_params(path, list(PARAMS), lambda name: calls.append(name) or PARAMS[name])
    assert sorted(calls) == sorted(PARAMS)  # each tensor fetched exactly once

    ours = read_params(path)
    assert sorted(ours) == sorted(PARAMS)
    for name, value in PARAMS.items():
        assert_same(ours[name], value)

    # flax reads our file: nested dicts of the same arrays.
    restored = serialization.msgpack_restore(path.read_bytes())
    assert set(restored) == {"embed", "layers", "norm"} and set(restored["layers"]) == {"0", "1"}
    for name, value in flatten(restored).items():
        assert_same(value, PARAMS[name])
    assert sorted(flatten(restored)) == sorted(PARAMS)

    # and we read flax's file.
    flax_path = tmp_path / "flax.msgpack"
    flax_path.write_bytes(serialization.msgpack_serialize(nested(PARAMS)))
    for name, value in read_params(flax_path).items():
        assert_same(value, PARAMS[name])


def test_params_reader_accepts_map_headers_of_any_width(tmp_path):
    """msgpack lets a writer use a map16 header even for one entry; the reader must not assume the shortest."""
    inner = serialization.msgpack_serialize({"b": PARAMS["norm.scale"]})
    assert inner[0] == 0x81  # fixmap of one entry
    path = tmp_path / "wide.msgpack"
    path.write_bytes(b"\x81\xa1a" + b"\xde\x00\x01" + inner[1:])  # {"a": <map16 of one entry>}
    (name, value), *rest = read_params(path).items()
    assert name == "a.b" and not rest
    assert_same(value, PARAMS["norm.scale"])


def test_params_chunked_arrays_round_trip_with_flax(tmp_path, monkeypatch):
    """Arrays over flax's chunk size (1 GiB in real use) are written in flax's chunked form; a small chunk size
    exercises the same path."""
    big = {"a.big": np.random.default_rng(0).standard_normal((50, 41)).astype(np.float32), "a.small": np.ones(3)}
    monkeypatch.setattr(params_file, "MAX_CHUNK_BYTES", 1000)
    path = tmp_path / "chunked.msgpack"
    write_params(path, list(big), big.__getitem__)
    assert b"__msgpack_chunked_array__" in path.read_bytes()
    restored = serialization.msgpack_restore(path.read_bytes())
    assert_same(np.asarray(restored["a"]["big"]), big["a.big"])
    assert_same(read_params(path)["a.big"], big["a.big"])

    monkeypatch.setattr(serialization, "MAX_CHUNK_SIZE", 1000)
    flax_path = tmp_path / "flax_chunked.msgpack"
    flax_path.write_bytes(serialization.msgpack_serialize(nested(big)))
    assert b"__msgpack_chunked_array__" in flax_path.read_bytes()
    assert_same(read_params(flax_path)["a.big"], big["a.big"])


def test_params_write_failure_leaves_nothing(tmp_path):
    def get(name: str) -> np.ndarray:
        if name == "norm.scale":
            raise GptOssError("boom")
        return PARAMS[name]

    with pytest.raises(GptOssError, match="boom"):
        write_params(tmp_path / "p.msgpack", list(PARAMS), get)
    assert list(tmp_path.iterdir()) == []


def test_read_params_rejects_truncated_file(tmp_path):
    path = tmp_path / "p.msgpack"
    write_params(path, list(PARAMS), PARAMS.__getitem__)
    path.write_bytes(path.read_bytes()[:-7])
    with pytest.raises(GptOssError, match="truncated"):
        read_params(path)


# --- synth --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("synth") / "toy_seed0"
    synthesize(folder, "toy", None, 0)
    return folder


def test_synth_is_deterministic_per_seed(toy, tmp_path):
    synthesize(tmp_path / "again", "toy", None, 0)
    synthesize(tmp_path / "other", "toy", None, 1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (toy / name).read_bytes() == (tmp_path / "again" / name).read_bytes(), name
    assert (toy / "model.safetensors").read_bytes() != (tmp_path / "other" / "model.safetensors").read_bytes()
    # (The tokenizer may coincide across seeds: BPE merges do not depend on the corpus order the seed shuffles.)


def test_synth_clears_a_stale_temporary_and_replaces_an_old_folder(tmp_path):
    """A killed run's ``.partial`` folder is not reused (stale shards would survive), and an existing output
    folder is replaced as a whole."""
    out = tmp_path / "checkpoint"
    stale = temporary_name(out)
    stale.mkdir()
    (stale / "model-00009-of-00009.safetensors").write_bytes(b"stale")
    out.mkdir()
    (out / "old.txt").write_text("from an earlier run")
    synthesize(out, "toy", 1)
    names = {p.name for p in out.iterdir()}
    assert "old.txt" not in names and "model-00009-of-00009.safetensors" not in names
    assert "config.json" in names and "tokenizer.json" in names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint"]


def test_synth_writes_a_real_hf_checkpoint(toy):
    cfg = load_checkpoint_config(toy)
    tensors = load_file(str(toy / "model.safetensors"))
    assert tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"].dtype == np.uint8
    assert tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"].shape == (
        cfg.num_local_experts,
        2 * cfg.intermediate_size,
        cfg.hidden_size // 32,
        16,
    )
    assert tensors["model.layers.0.mlp.experts.down_proj_scales"].shape == (
        cfg.num_local_experts,
        cfg.hidden_size,
        cfg.intermediate_size // 32,
    )
    assert tensors["model.embed_tokens.weight"].dtype == BF16
    assert not np.array_equal(tensors["model.embed_tokens.weight"], tensors["lm_head.weight"])  # untied


def test_synth_toy_engages_clamps_and_routes_every_expert(toy, tmp_path):
    """The synthetic weights make the swiglu clamps engage and routing vary across tokens."""
    out = tmp_path / "toy.msgpack"
    params_cfg = convert(toy, out)
    cfg = params_cfg.model
    model = build_model(cfg, read_params(out))
    ids = np.random.default_rng(0).integers(0, cfg.vocab_size, size=(2, 32))  # 64 tokens
    taps = forward(model, ids, emit_block_debug=True)
    for i in range(cfg.num_hidden_layers):
        preact = taps[f"block_{i}_expert_preact"]
        gate, linear = preact[..., 0::2], preact[..., 1::2]
        assert (gate > 7).mean() > 0.01, f"block {i}: gate clamp never engages"
        assert (np.abs(linear) > 7).mean() > 0.01, f"block {i}: linear clamp never engages"
        assert (np.abs(linear) < 7).mean() > 0.5, f"block {i}: linear saturated everywhere"
        chosen = taps[f"block_{i}_expert_indices"].reshape(-1, cfg.num_experts_per_tok)
        assert set(chosen.ravel().tolist()) == set(range(cfg.num_local_experts)), f"block {i}: unused experts"
        distinct_sets = {tuple(sorted(row)) for row in chosen.tolist()}
        assert len(distinct_sets) >= 8, f"block {i}: routing barely varies ({len(distinct_sets)} expert sets)"
    assert np.isfinite(taps["logits"]).all() and taps["logits"].std() > 0.1


def test_synth_tokenizer_fits_the_model_vocab(toy, tmp_path):
    cfg = load_checkpoint_config(toy)
    tokenizer = load_tokenizer(toy / "tokenizer.json")
    assert 256 < tokenizer.get_vocab_size() <= cfg.vocab_size
    assert max(tokenizer.get_vocab().values()) < cfg.vocab_size
    ids = encode(tokenizer, "What is the capital of France? Ünïcödé and 3.14159 too.")
    assert ids and max(ids) < cfg.vocab_size
    assert tokenizer.decode(ids) == "What is the capital of France? Ünïcödé and 3.14159 too."
    # convert records where the tokenizer is.
    params_cfg = convert(toy, tmp_path / "p.msgpack", num_layers=1)
    assert Path(params_cfg.tokenizer) == (toy / "tokenizer.json").resolve()
    assert ParamsConfig.read(params_config_path(tmp_path / "p.msgpack")) == params_cfg


# --- config parsing -----------------------------------------------------------------------------------------------

# openai/gpt-oss-20b config.json (rope_scaling + rope_theta form, transformers 4.55), abridged quantization_config.
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"],
    "attention_bias": True,
    "attention_dropout": 0.0,
    "eos_token_id": 200002,
    "experts_per_token": 4,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2880,
    "initial_context_length": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072,
    "model_type": "gpt_oss",
    "num_attention_heads": 64,
    "num_experts_per_tok": 4,
    "num_hidden_layers": 24,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "output_router_logits": False,
    "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": ["model.layers.*.self_attn"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "beta_fast": 32.0,
        "beta_slow": 1.0,
        "factor": 32.0,
        "original_max_position_embeddings": 4096,
        "rope_type": "yarn",
        "truncate": False,
    },
    "rope_theta": 150000,
    "router_aux_loss_coef": 0.9,
    "sliding_window": 128,
    "swiglu_limit": 7.0,
    "tie_word_embeddings": False,
    "transformers_version": "4.55.0.dev0",
    "use_cache": True,
    "vocab_size": 201088,
}
# openai/gpt-oss-20b original/config.json
GPT_OSS_20B_ORIGINAL = {
    "num_hidden_layers": 24,
    "num_experts": 32,
    "experts_per_token": 4,
    "vocab_size": 201088,
    "hidden_size": 2880,
    "intermediate_size": 2880,
    "swiglu_limit": 7.0,
    "head_dim": 64,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "sliding_window": 128,
    "initial_context_length": 4096,
    "rope_theta": 150000,
    "rope_scaling_factor": 32.0,
    "rope_ntk_alpha": 1,
    "rope_ntk_beta": 32,
}
EXPECTED_20B = GptOssConfig(
    vocab_size=201088,
    hidden_size=2880,
    intermediate_size=2880,
    num_hidden_layers=24,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=64,
    num_local_experts=32,
    num_experts_per_tok=4,
    sliding_window=128,
    layer_types=(SLIDING, FULL) * 12,
    rms_norm_eps=1e-5,
    rope_theta=150000.0,
    rope_scaling=RopeScaling(
        factor=32.0, beta_fast=32.0, beta_slow=1.0, original_max_position_embeddings=4096, truncate=False
    ),
    swiglu_limit=7.0,
)


def write_json(path: Path, raw: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(raw))
    return path


def test_config_from_hf_config_json_rope_scaling_form(tmp_path):
    write_json(tmp_path / "config.json", GPT_OSS_20B)
    assert load_checkpoint_config(tmp_path) == EXPECTED_20B
    assert EXPECTED_20B.param_count() == pytest.approx(20.9e9, rel=0.01)  # gpt-oss-20b: 20.9 B parameters


def test_config_from_original_config_json(tmp_path):
    write_json(tmp_path / "original" / "config.json", GPT_OSS_20B_ORIGINAL)
    assert load_checkpoint_config(tmp_path) == EXPECTED_20B
    assert load_checkpoint_config(tmp_path / "original") == EXPECTED_20B


def test_config_from_transformers_v5_rope_parameters_form(tmp_path):
    """What transformers v5 writes: ``rope_parameters`` (with ``rope_theta`` inside), no top-level rope_theta."""
    (transformers,) = require_modules("transformers")
    rope = dict(rope_type="yarn", factor=16.0, beta_fast=24.0, beta_slow=2.0, truncate=False)
    hf = transformers.GptOssConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=16,
        max_position_embeddings=16 * 2048,
        rope_parameters={**rope, "original_max_position_embeddings": 2048, "rope_theta": 10000.0},
        swiglu_limit=5.0,
    )
    hf.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert "rope_parameters" in raw and "rope_theta" not in raw and "rope_scaling" not in raw
    cfg = load_checkpoint_config(tmp_path)
    assert cfg == GptOssConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=2,
        sliding_window=16,
        layer_types=(SLIDING, FULL, SLIDING),
        rope_theta=10000.0,
        rope_scaling=RopeScaling(factor=16.0, beta_fast=24.0, beta_slow=2.0, original_max_position_embeddings=2048),
        swiglu_limit=5.0,
    )
    # And our own HF-style dict is accepted by transformers with the same meaning.
    back = transformers.GptOssConfig(**cfg.to_hf_dict())
    assert back.rope_parameters["rope_theta"] == 10000.0 and back.rope_parameters["factor"] == 16.0


def test_config_rejects_other_architectures(tmp_path):
    llama = {**GPT_OSS_20B, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    write_json(tmp_path / "config.json", llama)
    with pytest.raises(GptOssError, match=r"config\.json.*not a GPT-OSS config"):
        load_checkpoint_config(tmp_path)


@pytest.mark.parametrize("field", ["hidden_size", "num_local_experts", "sliding_window", "vocab_size"])
def test_config_missing_field_is_named(tmp_path, field):
    raw = {k: v for k, v in GPT_OSS_20B.items() if k != field}
    write_json(tmp_path / "config.json", raw)
    with pytest.raises(GptOssError, match=f"config.json: missing required field '{field}'"):
        load_checkpoint_config(tmp_path)


def test_config_invalid_json_and_inconsistent_values(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt_oss",')
    with pytest.raises(GptOssError, match="config.json: not valid JSON"):
        load_checkpoint_config(tmp_path)
    write_json(tmp_path / "config.json", {**GPT_OSS_20B, "num_key_value_heads": 7})
    with pytest.raises(GptOssError, match="not a multiple"):
        load_checkpoint_config(tmp_path)
    write_json(tmp_path / "config.json", {**GPT_OSS_20B, "layer_types": ["sliding_attention"] * 3})
    with pytest.raises(GptOssError, match="layer_types has 3 entries"):
        load_checkpoint_config(tmp_path)
    with pytest.raises(GptOssError, match="no config.json"):
        load_checkpoint_config(tmp_path / "elsewhere")
