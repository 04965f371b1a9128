"""Synthetic checkpoints as Hugging Face tools see them, and which files ``gptoss download`` fetches."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import file_sha256, require_torch, run_cli
from huggingface_hub.utils import filter_repo_objects
from safetensors import safe_open

from gptoss import cli
from gptoss.config import ParamsConfig, load_checkpoint_config, params_config_path
from gptoss.errors import GptOssError
from gptoss.formats import hub
from gptoss.formats.checkpoint_write import MXFP4_QUANTIZATION, write_checkpoint
from gptoss.formats.synth import preset_config, synthesize
from gptoss.formats.tokenizer import SYNTH_ROLES, encode, load_tokenizer

LAYERS = 2
PROMPTS = ["What is the capital of France?", "Sliding window attention looks at the most recent tokens only."]
# openai/gpt-oss-20b's files (the Hub's file list of the repository).
GPT_OSS_20B_FILES = [
    ".gitattributes",
    "LICENSE",
    "README.md",
    "USAGE_POLICY",
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "metal/model.bin",
    "model-00000-of-00002.safetensors",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "original/config.json",
    "original/dtypes.json",
    "original/model.safetensors",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
]
TOKENIZER_FILES = {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"}


def read_json(path: Path) -> dict:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> dict:
    """A toy checkpoint in each layout, each converted by the ``gptoss convert`` command line."""
    root = tmp_path_factory.mktemp("synth_hub")
    out: dict = {"root": root}
    for layout in ("hf", "original"):
        folder = root / layout
        synthesize(folder, "toy", LAYERS, seed=0, layout=layout)
        params = root / f"{layout}_params" / f"flax_params_{LAYERS}layers.msgpack"
        proc = run_cli("convert", "--checkpoint", folder, "--output", params)
        assert proc.returncode == 0, proc.stderr
        out[layout] = folder
        out[f"{layout}_params"] = params
    return out


# --- the files a synthetic checkpoint has -------------------------------------------------------------------------


def test_synth_hf_config_has_the_keys_of_the_real_repository(toy):
    """config.json: quantization_config (MXFP4 experts), token ids of the synthetic tokenizer, the HF-only keys;
    our own config parser still reads it as the preset."""
    raw = read_json(toy["hf"] / "config.json")
    assert raw["quantization_config"] == MXFP4_QUANTIZATION
    assert raw["quantization_config"]["quant_method"] == "mxfp4"
    tokenizer = load_tokenizer(toy["hf"] / "tokenizer.json")
    assert raw["eos_token_id"] == tokenizer.token_to_id(SYNTH_ROLES["eos_token"]) == 2
    assert raw["pad_token_id"] == tokenizer.token_to_id(SYNTH_ROLES["pad_token"]) == 0
    assert raw["experts_per_token"] == raw["num_experts_per_tok"] == 4
    assert raw["torch_dtype"] == "bfloat16"
    expected = {"hidden_act": "silu", "use_cache": True, "attention_dropout": 0.0, "output_router_logits": False}
    assert expected.items() <= raw.items()
    assert load_checkpoint_config(toy["hf"]) == preset_config("toy", LAYERS)


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_synth_writes_generation_and_tokenizer_configs_in_both_layouts(toy, layout):
    folder = toy[layout]
    tokenizer = load_tokenizer(folder / "tokenizer.json")
    ids = {role: tokenizer.token_to_id(token) for role, token in SYNTH_ROLES.items()}
    assert ids == {"bos_token": 1, "eos_token": 2, "pad_token": 0}
    generation = read_json(folder / "generation_config.json")
    assert generation == {"bos_token_id": 1, "do_sample": True, "eos_token_id": [2, 0], "pad_token_id": 0}
    config = read_json(folder / "tokenizer_config.json")
    assert {k: config[k] for k in SYNTH_ROLES} == SYNTH_ROLES
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == 131072
    added = {int(i): token["content"] for i, token in config["added_tokens_decoder"].items()}
    assert added == {0: "<|endoftext|>", 1: "<|start|>", 2: "<|end|>"}
    assert all(token["special"] for token in config["added_tokens_decoder"].values())
    assert read_json(folder / "special_tokens_map.json") == SYNTH_ROLES


def test_synth_original_layout_has_openai_files_only_under_original(toy):
    folder = toy["original"]
    top = sorted(p.name for p in folder.iterdir())
    assert top == [
        "generation_config.json",
        "original",
        "special_tokens_map.json",
        "synth.json",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert sorted(p.name for p in (folder / "original").iterdir()) == [
        "config.json",
        "dtypes.json",
        "model.safetensors",
    ]
    with safe_open(str(folder / "original" / "model.safetensors"), "np") as fh:
        names = set(fh.keys())
    dtypes = read_json(folder / "original" / "dtypes.json")
    assert set(dtypes) == names
    assert dtypes["block.0.mlp.mlp1_weight.blocks"] == "FP4" and dtypes["block.0.mlp.mlp1_weight.scales"] == "UE8"
    assert dtypes["embedding.weight"] == dtypes["block.1.attn.qkv.weight"] == "BF16"
    assert load_checkpoint_config(folder) == preset_config("toy", LAYERS)


def test_writer_config_follows_the_tensors_it_wrote(tmp_path):
    """Dense float32 experts: no quantization_config, torch_dtype float32, no token ids unless given."""
    cfg = preset_config("toy", 1)
    tensors = [
        ("model.embed_tokens.weight", np.zeros((4, 2), np.float32)),
        ("model.layers.0.mlp.experts.down_proj", np.zeros((2, 2, 2), np.float32)),
    ]
    write_checkpoint(tmp_path, cfg, iter(tensors))
    raw = read_json(tmp_path / "config.json")
    assert "quantization_config" not in raw and "eos_token_id" not in raw
    assert raw["torch_dtype"] == "float32"


# --- Hugging Face tools read it as the real thing -----------------------------------------------------------------


def test_convert_cli_reads_both_layouts_with_the_hf_keys(toy):
    """``gptoss convert`` (the command line, in the fixture) ignores the HF-only keys: both layouts give the same
    params, the architecture of the preset, and the synth origin."""
    assert file_sha256(toy["hf_params"]) == file_sha256(toy["original_params"])
    for layout in ("hf", "original"):
        params_cfg = ParamsConfig.read(params_config_path(toy[f"{layout}_params"]))
        assert params_cfg.model == preset_config("toy", LAYERS)
        assert params_cfg.origin == read_json(toy[layout] / "synth.json")
        assert params_cfg.tokenizer == str((toy[layout] / "tokenizer.json").resolve())


def test_transformers_from_pretrained_loads_every_tensor_and_matches_the_reference(toy):
    """``AutoModelForCausalLM.from_pretrained`` dequantizes the MXFP4 experts (nothing missing, unexpected or
    mismatched, no random init): its weights and logits equal ``gptoss.reference.hf_model``'s."""
    torch, transformers = require_torch()
    from gptoss.proof.reference import hf_model

    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        toy["hf"], dtype=torch.float32, output_loading_info=True
    )
    assert {k: sorted(v) for k, v in info.items()} == {
        "missing_keys": [],
        "unexpected_keys": [],
        "mismatched_keys": [],
        "error_msgs": [],
    }
    params_cfg = ParamsConfig.read(params_config_path(toy["hf_params"]))
    reference = hf_model(toy["hf"], params_cfg)
    ours, theirs = model.state_dict(), reference.state_dict()
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == torch.float32, name
        torch.testing.assert_close(ours[name], tensor, rtol=0, atol=0, msg=name)
    ids = torch.from_numpy(np.random.default_rng(0).integers(0, 700, size=(2, 19)))
    with torch.no_grad():
        got, expected = model(ids).logits, reference(ids).logits
    assert float((got - expected).abs().max()) <= 1e-5
    assert float(expected.abs().max()) > 1.0


@pytest.mark.parametrize("layout", ["hf", "original"])
def test_auto_tokenizer_special_ids_agree_with_config_and_generation_config(toy, layout):
    _, transformers = require_torch()
    folder = toy[layout]
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    generation = read_json(folder / "generation_config.json")
    assert tokenizer.bos_token_id == generation["bos_token_id"]
    assert tokenizer.eos_token_id == generation["eos_token_id"][0]
    assert tokenizer.pad_token_id == generation["pad_token_id"]
    if layout == "hf":
        config = read_json(folder / "config.json")
        assert (tokenizer.eos_token_id, tokenizer.pad_token_id) == (config["eos_token_id"], config["pad_token_id"])
        assert transformers.GenerationConfig.from_pretrained(folder).to_diff_dict().items() >= generation.items()
    ours = load_tokenizer(folder / "tokenizer.json")
    for prompt in PROMPTS:
        assert tokenizer(prompt).input_ids == encode(ours, prompt)


# --- gptoss download: one layout ----------------------------------------------------------------------------------


def fetched(layout: str) -> set[str]:
    return set(filter_repo_objects(GPT_OSS_20B_FILES, allow_patterns=hub.ALLOW_PATTERNS[layout]))


def test_download_hf_layout_fetches_the_top_level_files_only():
    assert "original/model.safetensors" in set(filter_repo_objects(GPT_OSS_20B_FILES, allow_patterns="*.safetensors"))
    shards = {f"model-0000{i}-of-00002.safetensors" for i in range(3)}
    config = {"config.json", "generation_config.json", "model.safetensors.index.json"}
    assert fetched("hf") == shards | config | TOKENIZER_FILES


def test_download_original_layout_fetches_original_and_the_tokenizer():
    original = {"original/config.json", "original/dtypes.json", "original/model.safetensors"}
    assert fetched("original") == original | {"generation_config.json"} | TOKENIZER_FILES


def test_download_cli_passes_the_layout_and_records_it(tmp_path, monkeypatch):
    """``--layout`` reaches the Hub client's allow_patterns (default hf) and ``download.json`` (no network)."""
    import huggingface_hub

    calls: list[dict] = []

    sizes = {"config.json": 2000, "model-00000-of-00002.safetensors": 4_600_000_000}
    sizes["original/model.safetensors"] = 13_800_000_000  # listed, never fetched with the hf layout

    class FakeApi:
        def model_info(self, repo_id: str, revision: str, files_metadata: bool = False):
            siblings = [type("File", (), {"rfilename": name, "size": size})() for name, size in sizes.items()]
            return type("Info", (), {"sha": "0" * 40, "siblings": siblings})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kwargs: calls.append(kwargs))
    for layout in ("hf", "original"):
        out = tmp_path / layout
        args = ["download", "--repo-id", "openai/gpt-oss-20b", "--output", str(out)]
        assert cli.main(args + ([] if layout == "hf" else ["--layout", layout])) == 0
        assert calls[-1]["allow_patterns"] == hub.ALLOW_PATTERNS[layout]
        assert calls[-1]["revision"] == "0" * 40
        assert read_json(out / hub.REVISION_FILE)["layout"] == layout
    with pytest.raises(GptOssError, match="unknown layout 'both'"):
        hub.download("openai/gpt-oss-20b", "main", tmp_path / "both", layout="both")

    # Not enough disk for the files the layout fetches: one message with the path, the bytes needed and free,
    # before anything is fetched (and no retry: it is not a network error).
    sizes["model-00001-of-00002.safetensors"] = 10**18
    before = len(calls)
    with pytest.raises(GptOssError, match=r"full: not enough free disk space for openai/gpt-oss-20b \(hf layout\)"):
        hub.download("openai/gpt-oss-20b", "main", tmp_path / "full", retries=3)
    assert len(calls) == before
