"""Bad input to ``gptoss convert``: one clear line on stderr, no traceback, no half-written artifact.

Each case corrupts a copy of a synthetic toy checkpoint and runs the real command line in a subprocess.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import ml_dtypes
import numpy as np
import pytest
from conftest import assert_one_clean_error, error_lines, run_cli
from safetensors.numpy import load_file, save_file

from gptoss.errors import GptOssError
from gptoss.formats.synth import synthesize
from gptoss.formats.tokenizer import load_tokenizer

WEIGHTS = "model.safetensors"


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("toy") / "checkpoint"
    synthesize(folder, "toy", 2, seed=0)
    return folder


def edit_tensors(folder: Path, edit: Callable[[dict[str, np.ndarray]], None]) -> None:
    tensors = load_file(str(folder / WEIGHTS))
    edit(tensors)
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})


def run_convert(checkpoint: Path, tmp_path: Path, *extra: str):
    out_dir = tmp_path / "out"
    proc = run_cli("convert", "--checkpoint", checkpoint, "--output", out_dir / "flax_params.msgpack", *extra)
    return proc, out_dir


@pytest.fixture
def bad(toy, tmp_path) -> Path:
    """A private copy of the toy checkpoint to corrupt."""
    folder = tmp_path / "checkpoint"
    shutil.copytree(toy, folder)
    return folder


def test_the_toy_checkpoint_converts_cleanly(toy, tmp_path):
    """Control: the uncorrupted copy converts, so the failures below come from the corruption."""
    proc, out_dir = run_convert(toy, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert error_lines(proc.stderr) == []
    assert sorted(p.name for p in out_dir.iterdir()) == ["flax_params.config.json", "flax_params.msgpack"]


def test_truncated_safetensors(bad, tmp_path):
    data = (bad / WEIGHTS).read_bytes()
    (bad / WEIGHTS).write_bytes(data[: len(data) * 2 // 3])
    proc, out_dir = run_convert(bad, tmp_path)
    line = assert_one_clean_error(proc, out_dir, str(bad / WEIGHTS))
    assert "truncated" in line


@pytest.mark.parametrize("where", ["json", "length"])
def test_corrupt_safetensors_header(bad, tmp_path, where):
    data = bytearray((bad / WEIGHTS).read_bytes())
    if where == "json":
        data[8:40] = b"\xff\x00garbage{[" + bytes(21)
    else:
        data[0:8] = (2**62).to_bytes(8, "little")
    (bad / WEIGHTS).write_bytes(bytes(data))
    proc, out_dir = run_convert(bad, tmp_path)
    line = assert_one_clean_error(proc, out_dir, str(bad / WEIGHTS))
    assert "header" in line


def test_missing_tensor(bad, tmp_path):
    edit_tensors(bad, lambda t: t.pop("model.layers.1.self_attn.sinks"))
    proc, out_dir = run_convert(bad, tmp_path)
    assert_one_clean_error(proc, out_dir, "model.layers.1.self_attn.sinks", "missing")


@pytest.mark.parametrize(
    "tensor, named",
    [
        (
            "model.layers.0.self_attn.q_proj.weight",
            "q_proj",
        ),  # transposed: [hidden, heads*d] instead of [heads*d, hidden]
        ("model.layers.1.self_attn.sinks", "sinks"),  # one entry too many
        ("model.layers.0.mlp.experts.gate_up_proj_scales", "gate_up_proj_scales"),  # does not match the blocks
    ],
)
def test_wrong_shape(bad, tmp_path, tensor, named):
    def edit(t: dict[str, np.ndarray]) -> None:
        value = t[tensor]
        if value.ndim == 2:
            t[tensor] = np.ascontiguousarray(value.T)
        else:
            t[tensor] = np.concatenate([value, value[..., :1]], axis=-1)

    edit_tensors(bad, edit)
    proc, out_dir = run_convert(bad, tmp_path)
    line = assert_one_clean_error(proc, out_dir, named, str(bad))
    assert "shape" in line or "do not match" in line


@pytest.mark.parametrize("where", ["embedding", "mxfp4_scale"])
def test_nan_weights(bad, tmp_path, where):
    def edit(t: dict[str, np.ndarray]) -> None:
        if where == "embedding":
            value = t["model.embed_tokens.weight"].copy()
            value[3, 5] = np.nan
            t["model.embed_tokens.weight"] = value.astype(ml_dtypes.bfloat16)
        else:  # E8M0 scale 255 is NaN
            value = t["model.layers.1.mlp.experts.down_proj_scales"].copy()
            value[2, 7, 0] = 255
            t["model.layers.1.mlp.experts.down_proj_scales"] = value

    edit_tensors(bad, edit)
    proc, out_dir = run_convert(bad, tmp_path)
    named = "embed" if where == "embedding" else "layers.1.mlp.down"
    line = assert_one_clean_error(proc, out_dir, named, str(bad))
    assert "NaN" in line


@pytest.mark.parametrize("layers", ["3", "0"])
def test_layers_outside_the_checkpoint(toy, tmp_path, layers):
    proc, out_dir = run_convert(toy, tmp_path, "--layers", layers)
    assert_one_clean_error(proc, out_dir, f"--layers {layers}", "1..2")


def test_missing_checkpoint_folder(tmp_path):
    missing = tmp_path / "no_such_checkpoint"
    proc, out_dir = run_convert(missing, tmp_path)
    assert_one_clean_error(proc, out_dir, str(missing), "not found")


def test_invalid_config(bad, tmp_path):
    raw = json.loads((bad / "config.json").read_text())
    del raw["num_local_experts"]
    (bad / "config.json").write_text(json.dumps(raw))
    proc, out_dir = run_convert(bad, tmp_path)
    assert_one_clean_error(proc, out_dir, str(bad / "config.json"), "num_local_experts")


def test_missing_or_invalid_tokenizer(tmp_path):
    missing = tmp_path / "checkpoint" / "tokenizer.json"
    with pytest.raises(GptOssError, match="tokenizer.json not found") as excinfo:
        load_tokenizer(missing)
    assert str(missing) in str(excinfo.value) and "\n" not in str(excinfo.value)
    broken = tmp_path / "tokenizer.json"
    broken.write_text('{"version": "1.0", "model": 42}')
    with pytest.raises(GptOssError, match="not a valid tokenizer.json") as excinfo:
        load_tokenizer(broken)
    assert str(broken) in str(excinfo.value)


def test_deprecated_dtype_flag_still_converts_with_one_warning(toy, tmp_path):
    """``--dtype`` is the old name of ``--weight-format``: it works, and says so in one line."""
    out = tmp_path / "p.msgpack"
    proc = run_cli("convert", "--checkpoint", toy, "--output", out, "--dtype", "bfloat16")
    assert proc.returncode == 0, proc.stderr
    deprecated = [line for line in proc.stderr.splitlines() if "deprecated" in line]
    assert len(deprecated) == 1 and "--dtype is deprecated: use --weight-format bfloat16" in deprecated[0]
    assert json.loads(out.with_name("p.config.json").read_text())["gptoss"]["weight_format"] == "bfloat16"
