"""Oracle: our converted Flax model against Hugging Face transformers ``GptOssForCausalLM``.

Each case builds a tiny random HF model (experts exactly MXFP4-representable), writes it as a checkpoint,
runs the real ``gptoss convert`` command, loads the params and compares logits and per-block hidden states.
Sequences are 2-3x the sliding window, so the window (and its off-by-one) is exercised.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward, require_modules, require_torch, run_cli
from safetensors import safe_open

from gptoss.config import ParamsConfig, params_config_path
from gptoss.formats.params_file import read_params
from gptoss.formats.safetensors_file import INDEX_NAME
from gptoss.model.params import build_model

TOL = 2e-5  # Flax logits vs HF, fp32 — relative to max(1, max|reference|)

# name → OracleCase fields (hf_oracle imports torch, so the cases are built inside the fixture).
CASES = {
    "heads4_kv4_hf": dict(heads=4, kv_heads=4, window=4, seq=11),
    "heads6_kv2_hf": dict(heads=6, kv_heads=2, window=5, seq=13),
    "heads8_kv2_hf": dict(heads=8, kv_heads=2, window=6, seq=16),
    "heads6_kv2_bf16": dict(heads=6, kv_heads=2, window=4, seq=10, bf16=True),
    "heads8_kv2_original": dict(heads=8, kv_heads=2, window=4, seq=12, layout="original"),
    "heads4_kv1_dense": dict(heads=4, kv_heads=1, window=5, seq=14, layout="dense"),
    # experts kept as the checkpoint's MXFP4 blocks/scales, decoded in the forward pass; other weights bf16
    "heads8_kv2_mxfp4": dict(heads=8, kv_heads=2, window=5, seq=13, bf16=True, params_dtype="mxfp4"),
}


def bound(reference: np.ndarray) -> float:
    return TOL * max(1.0, float(np.abs(reference).max()))


def max_diff(a, b) -> float:
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def hf_forward(model, ids: np.ndarray) -> SimpleNamespace:
    """HF logits, ``output_hidden_states`` and each decoder layer's raw output (forward hooks)."""
    torch, _ = require_torch()
    captured: list = []
    hooks = [layer.register_forward_hook(lambda _m, _i, out: captured.append(out)) for layer in model.model.layers]
    try:
        with torch.no_grad():
            out = model(torch.from_numpy(ids), output_hidden_states=True)
    finally:
        for hook in hooks:
            hook.remove()
    block_outputs = [(c[0] if isinstance(c, tuple) else c).numpy() for c in captured]
    return SimpleNamespace(
        logits=out.logits.numpy(),
        hidden_states=[h.numpy() for h in out.hidden_states],
        block_outputs=block_outputs,
        embedding=model.model.embed_tokens(torch.from_numpy(ids)).detach().numpy(),
    )


def convert_and_run(checkpoint: Path, output: Path, ids: np.ndarray, *extra: str) -> SimpleNamespace:
    """``gptoss convert`` (subprocess) → read params + config → our model's outputs on ``ids``."""
    proc = run_cli("convert", "--checkpoint", checkpoint, "--output", output, *extra)
    assert proc.returncode == 0, proc.stderr
    params = read_params(output)
    params_cfg = ParamsConfig.read(params_config_path(output))
    model = build_model(params_cfg.model, params)
    outputs = forward(model, ids, emit_hidden_states=True)
    return SimpleNamespace(params=params, params_cfg=params_cfg, model=model, outputs=outputs)


def compare(name: str, ours: SimpleNamespace, hf: SimpleNamespace, layers: int, report: dict) -> None:
    """Logits, argmax and every block's hidden state; the max diffs go into the oracle report."""
    diffs = {"logits": max_diff(ours.outputs["logits"], hf.logits), "max|logit|": float(np.abs(hf.logits).max())}
    assert diffs["logits"] <= bound(hf.logits), f"{name}: logits max|diff| {diffs['logits']:.3g}"
    np.testing.assert_array_equal(ours.outputs["logits"].argmax(-1), hf.logits.argmax(-1))

    # transformers' output_hidden_states: [0] is the embedding, [i+1] the output of block i, except the last
    # entry, which is the *final-normed* output of the last block (verified here, not assumed).
    assert len(hf.hidden_states) == layers + 1
    np.testing.assert_array_equal(hf.hidden_states[0], hf.embedding)
    hidden = []
    for i in range(layers):
        ours_i = ours.outputs[f"hidden_state_{i}"]
        d = max_diff(ours_i, hf.block_outputs[i])
        assert d <= bound(hf.block_outputs[i]), f"{name}: hidden_state_{i} max|diff| {d:.3g}"
        if i < layers - 1:
            d_hs = max_diff(ours_i, hf.hidden_states[i + 1])
            assert d_hs <= bound(hf.hidden_states[i + 1]), f"{name}: hidden_states[{i + 1}] max|diff| {d_hs:.3g}"
        hidden.append((d, d / max(1.0, float(np.abs(hf.block_outputs[i]).max()))))
    final_normed = np.asarray(ours.model.norm(jnp.asarray(ours.outputs[f"hidden_state_{layers - 1}"])))
    diffs["final_norm"] = max_diff(final_normed, hf.hidden_states[layers])
    assert diffs["final_norm"] <= bound(hf.hidden_states[layers])
    diffs["hidden"] = max(d for d, _ in hidden)
    diffs["hidden_rel"] = max(r for _, r in hidden)
    report[name] = diffs
    print(f"\n{name}: " + ", ".join(f"{k} max|diff| {v:.2e}" for k, v in diffs.items()))


@pytest.fixture(scope="module", params=list(CASES))
def oracle(request, tmp_path_factory, oracle_report) -> SimpleNamespace:
    require_torch()
    import hf_oracle

    name = request.param
    case = hf_oracle.OracleCase(name, **CASES[name])
    assert 2 * case.window <= case.seq <= 3 * case.window
    tmp = tmp_path_factory.mktemp(name)
    hf = hf_oracle.hf_model(case, seed=len(name))
    checkpoint = hf_oracle.write_case(hf, case, tmp / "checkpoint")
    ids = np.random.default_rng(7).integers(0, case.vocab, size=(2, case.seq))
    ours = convert_and_run(checkpoint, tmp / "params" / f"{name}.msgpack", ids, "--weight-format", case.params_dtype)
    return SimpleNamespace(name=name, case=case, checkpoint=checkpoint, ids=ids, ours=ours, hf=hf_forward(hf, ids))


def test_logits_and_hidden_states_match_transformers(oracle, oracle_report):
    compare(oracle.name, oracle.ours, oracle.hf, oracle.case.layers, oracle_report)


def safe_load(folder: Path, name: str) -> np.ndarray:
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "np") as fh:
            if name in fh.keys():
                return fh.get_tensor(name)
    raise KeyError(name)


def test_checkpoint_is_in_the_layout_the_case_claims(oracle):
    """Guards the oracle itself: each case really exercises its layout, dtype and sharding."""
    case, folder = oracle.case, oracle.checkpoint
    files = sorted(folder.glob("*.safetensors"))
    tensors = {}
    for path in files:
        with safe_open(str(path), "np") as fh:
            tensors.update({k: fh.get_slice(k).get_dtype() for k in fh.keys()})
    if len(files) > 1:
        weight_map = json.loads((folder / INDEX_NAME).read_text())["weight_map"]
        assert set(weight_map) == set(tensors)
    if case.layout == "original":
        assert "block.0.attn.qkv.weight" in tensors and "block.0.mlp.mlp1_weight.blocks" in tensors
        assert (folder / "config.json").is_file() and "experts_per_token" in json.loads(
            (folder / "config.json").read_text()
        )
    elif case.layout == "dense":
        assert "model.layers.0.mlp.experts.down_proj" in tensors
        assert not any(k.endswith("_blocks") for k in tensors)
        assert case.hidden == case.intermediate, "dense case must have a square down_proj (the transpose trap)"
    else:
        assert tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"] == "U8"
    assert tensors.get("model.embed_tokens.weight", tensors.get("embedding.weight")) == ("BF16" if case.bf16 else "F32")
    assert (
        oracle.ours.params_cfg.source_layers == case.layers
        and oracle.ours.params_cfg.weight_format == case.params_dtype
    )
    if case.params_dtype == "mxfp4":  # the experts are the checkpoint's bytes, not a decoded copy
        np.testing.assert_array_equal(
            oracle.ours.params["layers.0.mlp.gate_up_blocks"],
            safe_load(folder, "model.layers.0.mlp.experts.gate_up_proj_blocks"),
        )
    assert oracle.ours.params_cfg.model == case.config()


def test_some_oracle_checkpoint_is_sharded(tmp_path):
    """The dense case's experts exceed hf_oracle's 200 kB shard size: the reader must follow the index."""
    require_torch()
    import hf_oracle

    case = hf_oracle.OracleCase("sharded", **CASES["heads4_kv1_dense"])
    folder = hf_oracle.write_case(hf_oracle.hf_model(case), case, tmp_path / "checkpoint")
    index = json.loads((folder / INDEX_NAME).read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 1 and all((folder / s).is_file() for s in shards)


def test_layers_truncation_matches_a_truncated_transformers_model(tmp_path, oracle_report):
    """``convert --layers 2`` of a 3-layer checkpoint == HF with the first two layers of the same weights."""
    torch, _ = require_torch()
    import hf_oracle

    case = hf_oracle.OracleCase("truncate_3_to_2", heads=6, kv_heads=2, window=4, seq=11)
    full = hf_oracle.hf_model(case, seed=3)
    checkpoint = hf_oracle.write_case(full, case, tmp_path / "checkpoint")

    short_case = dataclasses.replace(case, layers=2)
    short = hf_oracle.hf_model(short_case, seed=99)  # random weights, replaced next
    kept = {k: v for k, v in full.state_dict().items() if not k.startswith("model.layers.2.")}
    short.load_state_dict(kept, strict=True)
    torch.testing.assert_close(short.lm_head.weight, full.lm_head.weight, rtol=0, atol=0)

    ids = np.random.default_rng(11).integers(0, case.vocab, size=(2, case.seq))
    ours = convert_and_run(checkpoint, tmp_path / "out" / "flax_params_2layers.msgpack", ids, "--layers", "2")
    assert ours.params_cfg.model.num_hidden_layers == 2 and ours.params_cfg.source_layers == 3
    assert not any(k.startswith("layers.2.") for k in ours.params)
    hf_short = hf_forward(short, ids)
    compare(case.name, ours, hf_short, 2, oracle_report)
    # Sensitivity: the 3-layer model's logits are far from the truncated ones.
    assert max_diff(ours.outputs["logits"], hf_forward(full, ids).logits) > 100 * bound(hf_short.logits)


def test_require_modules_skips_locally_and_fails_in_ci(monkeypatch):
    """The only allowed skip: torch/transformers missing outside CI. With CI=true it must fail."""
    missing = "gptoss_no_such_module_for_tests"
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception):
        require_modules(missing)
    monkeypatch.delenv("CI")
    with pytest.raises(pytest.skip.Exception):
        require_modules(missing)
    assert require_modules("json") == [json]
