"""One test per GPT-OSS trap (docs/gpt_oss/model.md) — each fails if the trap is mishandled, and shows that it would.

References are written here from that page (NumPy) or taken from transformers, never from gptoss code.
"""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp
import numpy as np
import pytest
from conftest import forward, random_params, require_torch

from gptoss.config import FULL, SLIDING, GptOssConfig, RopeScaling, yarn_concentration
from gptoss.formats import mxfp4
from gptoss.model.params import build_model, param_specs
from gptoss.model.rope import apply_rope, rope_tables, yarn_inv_freq

CFG = GptOssConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=32,
    num_hidden_layers=2,
    num_attention_heads=6,
    num_key_value_heads=2,
    head_dim=8,
    num_local_experts=4,
    num_experts_per_tok=2,
    sliding_window=4,
    layer_types=(SLIDING, FULL),
)
SEQ = 12  # 3x the window
E2M1 = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def hf_config(cfg: GptOssConfig, **rope_overrides):
    from transformers import GptOssConfig as HFConfig

    raw = {k: v for k, v in cfg.to_hf_dict().items() if k != "architectures"}
    raw["rope_scaling"] = {**raw["rope_scaling"], **rope_overrides}
    hf = HFConfig(**raw)
    hf._attn_implementation = "eager"
    hf._experts_implementation = "eager"
    return hf


def rel_diff(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / np.abs(b).max())


def model_with(params: dict, cfg: GptOssConfig = CFG):
    return build_model(cfg, params)


@pytest.fixture(scope="module")
def params() -> dict:
    p = random_params(param_specs(CFG), seed=1)
    rng = np.random.default_rng(2)
    for i in range(CFG.num_hidden_layers):
        # Sinks of order a few: comparable to the attention scores, so getting them wrong shows.
        p[f"layers.{i}.attn.sinks"] = (2.0 * rng.standard_normal(CFG.num_attention_heads)).astype(np.float32)
    return p


@pytest.fixture(scope="module")
def ids() -> np.ndarray:
    return np.random.default_rng(3).integers(0, CFG.vocab_size, size=(2, SEQ))


# --- attention: sinks, GQA, sliding window ------------------------------------------------------------------------


def reference_attention(
    q, k, v, sinks, window, sink_scale=1.0, renormalise=False, no_sink=False, gqa="h//group", extra_key=False
):
    """The attention of docs/gpt_oss/model.md in NumPy (float64) from rotated ``q [b,s,H,d]``,
    ``k, v [b,s,KV,d]``; returns ``[b,s,H*d]``.

    The keyword arguments switch on the classic mistakes, to show the test data tells them apart.
    """
    b, s, heads, d = q.shape
    kv = k.shape[2]
    group = heads // kv
    kv_of_head = np.arange(heads) // group if gqa == "h//group" else np.arange(heads) % kv
    kk, vv = k[:, :, kv_of_head].astype(np.float64), v[:, :, kv_of_head].astype(np.float64)
    scores = np.einsum("bqhd,bkhd->bhqk", q.astype(np.float64), kk) / math.sqrt(d)
    qpos, kpos = np.arange(s)[:, None], np.arange(s)[None, :]
    allowed = kpos <= qpos
    if window is not None:
        allowed &= qpos - kpos < window + (1 if extra_key else 0)
    scores = np.where(allowed, scores, -np.inf)
    sink_logit = np.full(heads, -np.inf) if no_sink else sinks.astype(np.float64) * sink_scale
    sink_col = np.broadcast_to(sink_logit[None, :, None, None], (b, heads, s, 1))
    logits = np.concatenate([scores, sink_col], axis=-1)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs = (probs / probs.sum(-1, keepdims=True))[..., :-1]
    if renormalise:
        probs = probs / probs.sum(-1, keepdims=True)
    return np.einsum("bhqk,bkhd->bqhd", probs, vv).reshape(b, s, heads * d)


@pytest.fixture(scope="module")
def attention_taps(params, ids):
    return forward(model_with(params), ids, emit_block_debug=True)


@pytest.mark.parametrize("layer", [0, 1], ids=["sliding", "full"])
def test_attention_matches_reference_sinks_window_gqa(params, attention_taps, layer):
    """Sinks are an extra softmax column (unscaled, unmasked, dropped, no renormalisation); GQA maps query head h
    to kv head h // (heads/kv_heads); sliding layers keep exactly ``window`` keys; full layers are causal."""
    taps = attention_taps
    q, k, v = (taps[f"block_{layer}_{t}"] for t in "qkv")
    sinks = params[f"layers.{layer}.attn.sinks"]
    window = CFG.sliding_window if CFG.layer_types[layer] == SLIDING else None
    o_kernel, o_bias = params[f"layers.{layer}.attn.o_proj.kernel"], params[f"layers.{layer}.attn.o_proj.bias"]
    ours = taps[f"block_{layer}_attn_output"]

    def project(heads_out):
        return heads_out @ o_kernel.astype(np.float64) + o_bias

    expected = project(reference_attention(q, k, v, sinks, window))
    assert rel_diff(ours, expected) < 1e-5

    wrong = {
        "sink scaled by 1/sqrt(d)": dict(sink_scale=1 / math.sqrt(CFG.head_dim)),
        "renormalised after dropping the sink": dict(renormalise=True),
        "no sink": dict(no_sink=True),
        "kv head h % kv_heads": dict(gqa="h%kv"),
    }
    if window is not None:
        wrong["window + 1 keys"] = dict(extra_key=True)
    for what, kwargs in wrong.items():
        assert rel_diff(ours, project(reference_attention(q, k, v, sinks, window, **kwargs))) > 1e-2, what


def test_sinks_absorb_probability_mass(params, ids):
    """A huge sink takes (almost) all the attention: the attention output collapses to the o_proj bias;
    a hugely negative sink leaves the plain (sink-free) softmax attention."""
    outputs = {}
    for value in (40.0, -1e4):
        p = dict(params)
        p["layers.0.attn.sinks"] = np.full(CFG.num_attention_heads, value, np.float32)
        outputs[value] = forward(model_with(p), ids, emit_block_debug=True)
    bias = params["layers.0.attn.o_proj.bias"]
    np.testing.assert_allclose(
        outputs[40.0]["block_0_attn_output"], np.broadcast_to(bias, (2, SEQ, CFG.hidden_size)), atol=1e-6
    )
    taps = outputs[-1e4]
    without_sink = reference_attention(*(taps[f"block_0_{t}"] for t in "qkv"), None, CFG.sliding_window, no_sink=True)
    expected = without_sink @ params["layers.0.attn.o_proj.kernel"] + bias
    assert rel_diff(taps["block_0_attn_output"], expected) < 1e-5
    assert np.abs(taps["block_0_attn_output"] - bias).max() > 0.1  # the softmax branch really contributes


def test_sliding_window_keeps_exactly_window_keys(params, ids):
    """Layer 0 is sliding (window 4): the token ``window - 1`` positions back influences the query,
    the one ``window`` back does not (a port that admits window + 1 keys fails here). Layer 1 is full."""
    w, q = CFG.sliding_window, 9
    model = model_with(params)
    base = forward(model, ids, emit_block_debug=True)

    def perturbed(position: int) -> dict:
        changed = ids.copy()
        changed[:, position] = (changed[:, position] + 17) % CFG.vocab_size
        return forward(model, changed, emit_block_debug=True)

    inside, outside = perturbed(q - (w - 1)), perturbed(q - w)
    delta_inside = np.abs(inside["block_0_attn_output"][:, q] - base["block_0_attn_output"][:, q]).max()
    assert delta_inside > 1e-3
    np.testing.assert_array_equal(outside["block_0_attn_output"][:, q], base["block_0_attn_output"][:, q])
    # The change is real: it moves the perturbed position itself, and the full layer 1 still sees it at q.
    assert np.abs(outside["block_0_attn_output"][:, q - w] - base["block_0_attn_output"][:, q - w]).max() > 1e-3
    assert np.abs(outside["block_1_attn_output"][:, q] - base["block_1_attn_output"][:, q]).max() > 1e-4
    # Causality: nothing before the perturbed position moves.
    np.testing.assert_array_equal(outside["block_1_output"][:, : q - w], base["block_1_output"][:, : q - w])


# --- RoPE / YaRN --------------------------------------------------------------------------------------------------


def rope_cfg(head_dim: int, **rope) -> GptOssConfig:
    return dataclasses.replace(CFG, head_dim=head_dim, rope_scaling=RopeScaling(**rope))


@pytest.mark.parametrize("head_dim", [8, 16, 64])
def test_yarn_inv_freq_and_concentration_match_transformers(head_dim):
    """Fractional low/high (``truncate: false``) and concentration ``0.1·ln(32) + 1`` as transformers computes."""
    require_torch()
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = rope_cfg(head_dim)
    hf_inv_freq, hf_scaling = ROPE_INIT_FUNCTIONS["yarn"](hf_config(cfg))
    ours = yarn_inv_freq(cfg)
    assert ours.shape == (head_dim // 2,)
    assert rel_diff(ours, hf_inv_freq.numpy()) <= 1e-6
    assert yarn_concentration(cfg.rope_scaling) == pytest.approx(hf_scaling, rel=1e-12)
    assert hf_scaling == pytest.approx(0.1 * math.log(32) + 1)

    # Sensitivity: flooring/ceiling the ramp boundaries gives different frequencies (and transformers agrees
    # with us when asked for truncation, so the difference is exactly that trap).
    truncated_cfg = rope_cfg(head_dim, truncate=True)
    truncated = yarn_inv_freq(truncated_cfg)
    assert rel_diff(truncated, hf_inv_freq.numpy()) > 1e-4
    hf_truncated, _ = ROPE_INIT_FUNCTIONS["yarn"](hf_config(truncated_cfg, truncate=True))
    assert rel_diff(truncated, hf_truncated.numpy()) <= 1e-6


def test_rope_tables_match_transformers_rotary_embedding():
    """cos/sin (both multiplied by the concentration) for positions 0..N against GptOssRotaryEmbedding."""
    torch, _ = require_torch()
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssRotaryEmbedding

    cfg = rope_cfg(64)
    positions = np.arange(0, 600).reshape(2, 300)
    cos, sin = rope_tables(cfg, jnp.asarray(positions))
    hf_cos, hf_sin = GptOssRotaryEmbedding(hf_config(cfg))(torch.zeros(1), torch.from_numpy(positions))
    np.testing.assert_allclose(np.asarray(cos), hf_cos.numpy(), rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(sin), hf_sin.numpy(), rtol=0, atol=2e-5)
    assert np.abs(np.asarray(cos)).max() > 1.2  # the concentration (~1.35) is really in the table


def test_apply_rope_pairs_halves_like_transformers():
    """Half-split (NeoX) pairing: element i rotates with i + D/2, not with its neighbour."""
    torch, _ = require_torch()
    from transformers.models.gpt_oss.modeling_gpt_oss import apply_rotary_pos_emb

    cfg = rope_cfg(16)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 7, 6, 16)).astype(np.float32)  # [b, s, heads, d]
    k = rng.standard_normal((2, 7, 2, 16)).astype(np.float32)
    positions = np.broadcast_to(np.arange(3, 10), (2, 7))
    cos, sin = rope_tables(cfg, jnp.asarray(positions))
    ours_q, ours_k = (np.asarray(apply_rope(jnp.asarray(x), cos, sin)) for x in (q, k))

    def to_hf(x: np.ndarray):  # [b, s, heads, d] → [b, heads, s, d]
        return torch.from_numpy(x).transpose(1, 2)

    hf_cos, hf_sin = torch.tensor(np.asarray(cos)), torch.tensor(np.asarray(sin))
    hf_q, hf_k = apply_rotary_pos_emb(to_hf(q), to_hf(k), hf_cos, hf_sin)
    np.testing.assert_allclose(ours_q, hf_q.transpose(1, 2).numpy(), atol=1e-6)
    np.testing.assert_allclose(ours_k, hf_k.transpose(1, 2).numpy(), atol=1e-6)

    # Sensitivity: adjacent-pair rotation of the same input is different.
    c, s = np.asarray(cos)[:, :, None, :], np.asarray(sin)[:, :, None, :]
    even, odd = q[..., 0::2], q[..., 1::2]
    adjacent = np.stack([even * c - odd * s, odd * c + even * s], axis=-1).reshape(q.shape)
    assert np.abs(adjacent - ours_q).max() > 0.1


# --- MoE: routing, swiglu clamps, interleave ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def moe_case(params):
    """Layer-0 MoE with expert pre-activations of std ~8, so both clamps engage on many entries."""
    p = dict(params)
    p["layers.0.mlp.gate_up_kernel"] = p["layers.0.mlp.gate_up_kernel"] * 16
    x = np.random.default_rng(5).standard_normal((2, 16, CFG.hidden_size)).astype(np.float32)
    return p, x


def run_moe(p: dict, x: np.ndarray, cfg: GptOssConfig = CFG) -> tuple[np.ndarray, dict]:
    taps: dict = {}
    out = model_with(p, cfg).layers[0].mlp(jnp.asarray(x), taps)
    return np.asarray(out), {k: np.asarray(v) for k, v in taps.items()}


def hf_moe(p: dict, x: np.ndarray) -> np.ndarray:
    torch, _ = require_torch()
    from transformers.models.gpt_oss.modeling_gpt_oss import GptOssMLP

    mlp = GptOssMLP(hf_config(CFG)).eval()
    weights = {
        "router.weight": p["layers.0.mlp.router.kernel"].T,
        "router.bias": p["layers.0.mlp.router.bias"],
        "experts.gate_up_proj": p["layers.0.mlp.gate_up_kernel"],  # HF is input-major [E, hidden, 2I] too
        "experts.gate_up_proj_bias": p["layers.0.mlp.gate_up_bias"],
        "experts.down_proj": p["layers.0.mlp.down_kernel"],
        "experts.down_proj_bias": p["layers.0.mlp.down_bias"],
    }
    mlp.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()}, strict=True)
    with torch.no_grad():
        out, _ = mlp(torch.from_numpy(x))
    return out.numpy()


def test_moe_swiglu_clamps_and_interleave_match_transformers(moe_case):
    p, x = moe_case
    ours, taps = run_moe(p, x)
    reference = hf_moe(p, x)
    assert rel_diff(ours, reference) < 1e-5

    # The test data engages every clamp on the experts actually used.
    preact = taps["expert_preact"]  # [b, t, k, 2I]
    gate, linear = preact[..., 0::2], preact[..., 1::2]
    assert (gate > 7).mean() > 0.05 and (gate < -7).mean() > 0.05 and (np.abs(linear) > 7).mean() > 0.05

    # The activation, per docs/gpt_oss/model.md, from the pre-activations.
    g, lin = np.minimum(gate, 7.0), np.clip(linear, -7.0, 7.0)
    np.testing.assert_allclose(taps["expert_act"], g / (1 + np.exp(-1.702 * g)) * (lin + 1), rtol=1e-5, atol=1e-6)

    # Sensitivity. Swapped interleave (gate in odd columns): permute the columns our model reads.
    swapped = dict(p)
    for name in ("layers.0.mlp.gate_up_kernel", "layers.0.mlp.gate_up_bias"):
        w = p[name]
        swapped[name] = w.reshape(*w.shape[:-1], -1, 2)[..., ::-1].reshape(w.shape)
    assert rel_diff(run_moe(swapped, x)[0], reference) > 1e-2
    # No clamps at all.
    unclamped = dataclasses.replace(CFG, swiglu_limit=1e9)
    assert rel_diff(run_moe(p, x, unclamped)[0], reference) > 1e-2
    # Gate clamped on both sides (it must be clamped from above only): the small negative tail changes,
    # by far more than the tolerance of the activation check above.
    g_both = np.clip(gate, -7.0, 7.0)
    assert np.abs(g_both / (1 + np.exp(-1.702 * g_both)) * (lin + 1) - taps["expert_act"]).max() > 1e-4


def test_router_softmax_over_selected_top_k(moe_case):
    """Top-k on the raw router logits, softmax over the k selected logits only."""
    p, x = moe_case
    _, taps = run_moe(p, x)
    logits = x @ p["layers.0.mlp.router.kernel"] + p["layers.0.mlp.router.bias"]
    top = np.argsort(-logits, axis=-1)[..., : CFG.num_experts_per_tok]
    np.testing.assert_array_equal(np.sort(taps["expert_indices"], -1), np.sort(top, -1))
    selected = np.take_along_axis(logits, taps["expert_indices"], -1)
    expected = np.exp(selected) / np.exp(selected).sum(-1, keepdims=True)
    np.testing.assert_allclose(taps["expert_weights"], expected, rtol=1e-5)
    full_softmax = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    assert np.abs(np.take_along_axis(full_softmax, taps["expert_indices"], -1) - expected).max() > 1e-2


def test_rmsnorm_eps_in_float32(params):
    """eps = 1e-5 inside the rsqrt; with inputs of rms ~1e-3 eps dominates, so 1e-6 would be visibly wrong."""
    norm = model_with(params).layers[0].attn_norm
    x = (1e-3 * np.random.default_rng(0).standard_normal((2, 3, CFG.hidden_size))).astype(np.float32)
    scale = params["layers.0.attn_norm.scale"]

    def reference(eps):
        return x / np.sqrt((x.astype(np.float64) ** 2).mean(-1, keepdims=True) + eps) * scale

    ours = np.asarray(norm(jnp.asarray(x)))
    assert rel_diff(ours, reference(1e-5)) < 1e-5
    assert rel_diff(ours, reference(1e-6)) > 0.1


# --- MXFP4 --------------------------------------------------------------------------------------------------------


def test_mxfp4_nibble_order_sign_and_scale_by_hand():
    """Low nibble is element 2i, high nibble 2i+1; bit 3 is the sign; E8M0 scale 2^(s-127); 255 is NaN."""
    blocks = np.zeros((3, 1, 16), np.uint8)  # 3 rows of one 32-element group
    blocks[:, 0, 0] = 0x21  # low 1 → 0.5, high 2 → 1.0
    blocks[:, 0, 1] = 0x9A  # low 0xA → -1.0, high 0x9 → -0.5
    blocks[:, 0, 2] = 0x7F  # low 0xF → -6.0, high 7 → 6.0
    blocks[:, 0, 3] = 0x5C  # low 0xC → -2.0, high 5 → 3.0
    scales = np.array([[127], [130], [120]], np.uint8)
    out = mxfp4.decode(blocks, scales)
    assert out.shape == (3, 32) and out.dtype == np.float32
    head = np.array([0.5, 1.0, -1.0, -0.5, -6.0, 6.0, -2.0, 3.0], np.float32)
    for row, factor in enumerate([1.0, 8.0, 2.0**-7]):
        np.testing.assert_array_equal(out[row, :8], head * np.float32(factor))
        np.testing.assert_array_equal(out[row, 8:], 0)
    assert np.isnan(mxfp4.decode(blocks[:1], np.array([[255]], np.uint8))).all()


def test_mxfp4_decode_matches_transformers_convert_moe_packed_tensors():
    torch, _ = require_torch()
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, size=(3, 10, 4, 16), dtype=np.uint8)  # [E, out, G, 16]
    scales = rng.integers(110, 140, size=(3, 10, 4), dtype=np.uint8)
    hf = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales), dtype=torch.float32)
    ours = mxfp4.decode(blocks, scales)  # [E, out, in]
    assert tuple(hf.shape) == (3, 128, 10)  # transformers returns input-major [E, in, out]
    np.testing.assert_array_equal(ours.transpose(0, 2, 1), hf.numpy())
    # Sensitivity: swapping the nibbles changes the decoded values.
    swapped = (blocks >> 4) | (blocks << 4)
    assert not np.array_equal(mxfp4.decode(swapped, scales), ours)


def test_mxfp4_encode_decode_round_trip_on_representable_values():
    rng = np.random.default_rng(1)
    shape = (4, 6, 3, 32)  # 3 groups of 32 per row
    magnitudes = np.array(E2M1, np.float32)[rng.integers(0, 8, size=shape)]
    magnitudes[..., rng.integers(0, 32)] = 6.0  # each group reaches the top of E2M1
    values = magnitudes * rng.choice([-1.0, 1.0], size=shape).astype(np.float32)
    values *= np.ldexp(np.float32(1), rng.integers(-8, 4, size=shape[:-1]))[..., None].astype(np.float32)
    values = values.reshape(4, 6, 96)
    blocks, scales = mxfp4.encode(values)
    assert blocks.shape == (4, 6, 3, 16) and scales.shape == (4, 6, 3)
    np.testing.assert_array_equal(mxfp4.decode(blocks, scales), values)


# --- dequantized experts are input-major (the square down_proj trap) ----------------------------------------------


@pytest.mark.parametrize("layout", ["hf", "dense"])
def test_expert_kernels_are_input_major_even_when_square(tmp_path, layout):
    """MXFP4 decodes to [E, out, in] and must be transposed; dequantized HF experts are already [E, in, out]
    and must not be. down_proj is square here (hidden == intermediate), so only the values can tell."""
    torch, _ = require_torch()
    import hf_oracle

    from gptoss.formats.params_file import read_params
    from gptoss.model.convert import convert

    case = hf_oracle.OracleCase(f"square_{layout}", heads=4, kv_heads=2, window=4, seq=10, layers=2, layout=layout)
    assert case.hidden == case.intermediate
    hf = hf_oracle.hf_model(case, seed=5)
    checkpoint = hf_oracle.write_case(hf, case, tmp_path / "checkpoint")
    out = tmp_path / "params.msgpack"
    convert(checkpoint, out)
    params = read_params(out)
    hf_down = hf.model.layers[0].mlp.experts.down_proj.detach().numpy()
    hf_gate_up = hf.model.layers[0].mlp.experts.gate_up_proj.detach().numpy()
    assert np.abs(hf_down - hf_down.transpose(0, 2, 1)).max() > 0.1  # not symmetric: a transpose would show
    np.testing.assert_array_equal(params["layers.0.mlp.down_kernel"], hf_down)
    np.testing.assert_array_equal(params["layers.0.mlp.gate_up_kernel"], hf_gate_up)

    ids = np.random.default_rng(0).integers(0, case.vocab, size=(2, case.seq))
    with torch.no_grad():
        reference = hf(torch.from_numpy(ids)).logits.numpy()
    tol = 2e-5 * max(1.0, float(np.abs(reference).max()))
    logits = forward(build_model(case.config(), params), ids)["logits"]
    assert np.abs(logits - reference).max() <= tol
    transposed = dict(params)
    for i in range(case.layers):
        transposed[f"layers.{i}.mlp.down_kernel"] = params[f"layers.{i}.mlp.down_kernel"].transpose(0, 2, 1)
    wrong = forward(build_model(case.config(), transposed), ids)["logits"]
    assert np.abs(wrong - reference).max() > 100 * tol
