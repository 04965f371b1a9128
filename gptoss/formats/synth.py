"""Synthetic GPT-OSS checkpoints from a preset and a seed: the files openai/gpt-oss-* has (MXFP4 experts, bf16
elsewhere, configs, a small tokenizer), in the HF or ``original/`` layout. Weight scales keep the computation from
being degenerate: attention scores of order 1, routing that varies per token, and expert pre-activations large enough
that the swiglu clamps (gate ≤ 7, |linear| ≤ 7) engage for a few percent of the values."""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from gptoss.config import GptOssConfig, default_layer_types
from gptoss.errors import GptOssError
from gptoss.files import atomic_output, require_free_space
from gptoss.formats.checkpoint_write import write_checkpoint, write_generation_config
from gptoss.formats.mxfp4 import GROUP
from gptoss.formats.names import hf_source
from gptoss.formats.tokenizer import special_token_ids, train_synthetic_tokenizer, write_hf_tokenizer

BF16 = np.dtype(ml_dtypes.bfloat16)
FP4_RMS = math.sqrt(np.mean(np.array([0, 0.25, 1, 2.25, 4, 9, 16, 36])))  # RMS of a uniformly random E2M1 code
EXPERT_PREACT_STD = 4.0  # target std of expert pre-activations: clamps at 7 engage in the tails
DOWN_PROJ_GAIN = 0.2


def _real(num_layers: int, experts: int) -> dict:
    return dict(
        vocab_size=201088,
        hidden_size=2880,
        intermediate_size=2880,
        num_hidden_layers=num_layers,
        num_attention_heads=64,
        num_key_value_heads=8,
        head_dim=64,
        num_local_experts=experts,
        num_experts_per_tok=4,
        sliding_window=128,
    )


PRESETS: dict[str, dict] = {
    "toy": dict(
        vocab_size=8192,  # embedding and unembedding are 2 MB each: they go to the external .onnx.data
        hidden_size=64,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=8,
        num_key_value_heads=2,
        head_dim=16,
        num_local_experts=8,
        num_experts_per_tok=4,
        sliding_window=8,
    ),
    "gpt-oss-20b": _real(24, 32),
    "gpt-oss-120b": _real(36, 128),
}
TOKENIZER_VOCAB = 700
SYNTH_FILE = "synth.json"


def preset_config(preset: str, num_layers: int | None = None) -> GptOssConfig:
    if preset not in PRESETS:
        raise GptOssError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    fields = dict(PRESETS[preset])
    if num_layers is not None:
        if num_layers < 1:
            raise GptOssError(f"--layers must be at least 1, got {num_layers}")
        fields["num_hidden_layers"] = num_layers
    return GptOssConfig(layer_types=default_layer_types(fields["num_hidden_layers"]), **fields)


def hf(ours: str) -> str:
    """The Hub's name of our parameter ``ours``."""
    return hf_source(ours)[0]


class _Generator:
    """Random weights, drawn tensor by tensor in the Hub checkpoint's order."""

    def __init__(self, cfg: GptOssConfig, seed: int) -> None:
        self.cfg = cfg
        self.rng = np.random.default_rng(seed)

    def normal(self, shape: tuple[int, ...], std: float, mean: float = 0.0) -> np.ndarray:
        out = self.rng.standard_normal(shape, dtype=np.float32)
        out *= np.float32(std)
        out += np.float32(mean)
        return out.astype(BF16)

    def mxfp4(self, experts: int, rows: int, cols: int, target_std: float) -> tuple[np.ndarray, np.ndarray]:
        """Random E2M1 codes with E8M0 scales giving elements of about ``target_std`` (±1 binade jitter)."""
        blocks = self.rng.integers(0, 256, size=(experts, rows, cols // GROUP, GROUP // 2), dtype=np.uint8)
        exponent = round(math.log2(target_std / FP4_RMS))
        jitter = self.rng.integers(-1, 1, size=(experts, rows, cols // GROUP), endpoint=True)
        scales = (127 + exponent + jitter).astype(np.uint8)
        return blocks, scales

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        cfg = self.cfg
        h, i, e = cfg.hidden_size, cfg.intermediate_size, cfg.num_local_experts
        nq, nkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        yield hf("embed.embedding"), self.normal((cfg.vocab_size, h), 1.0)
        for layer in range(cfg.num_hidden_layers):
            p = f"layers.{layer}."
            yield hf(p + "attn_norm.scale"), self.normal((h,), 0.1, 1.0)
            for name, rows in (("q_proj", nq * d), ("k_proj", nkv * d), ("v_proj", nkv * d)):
                yield hf(f"{p}attn.{name}.kernel"), self.normal((rows, h), 1 / math.sqrt(h))
                yield hf(f"{p}attn.{name}.bias"), self.normal((rows,), 0.1)
            yield hf(p + "attn.o_proj.kernel"), self.normal((h, nq * d), 1 / math.sqrt(nq * d))
            yield hf(p + "attn.o_proj.bias"), self.normal((h,), 0.1)
            yield hf(p + "attn.sinks"), self.normal((nq,), 1.0)
            yield hf(p + "mlp_norm.scale"), self.normal((h,), 0.1, 1.0)
            # Router logits with std ~2: the top-k differs from token to token.
            yield hf(p + "mlp.router.kernel"), self.normal((e, h), 2 / math.sqrt(h))
            yield hf(p + "mlp.router.bias"), self.normal((e,), 0.5)
            blocks, scales = self.mxfp4(e, 2 * i, h, EXPERT_PREACT_STD / math.sqrt(h))
            yield hf(p + "mlp.gate_up_blocks"), blocks
            yield hf(p + "mlp.gate_up_scales"), scales
            yield hf(p + "mlp.gate_up_bias"), self.normal((e, 2 * i), 0.5)
            # Down projection small enough that the MoE output stays of the residual stream's order (activations ≤ 7·8).
            blocks, scales = self.mxfp4(e, h, i, DOWN_PROJ_GAIN / math.sqrt(i))
            yield hf(p + "mlp.down_blocks"), blocks
            yield hf(p + "mlp.down_scales"), scales
            yield hf(p + "mlp.down_bias"), self.normal((e, h), 0.1)
        yield hf("norm.scale"), self.normal((h,), 0.1, 1.0)
        yield hf("unembed.kernel"), self.normal((cfg.vocab_size, h), 1 / math.sqrt(h))


def synthesize(
    output: Path, preset: str = "toy", num_layers: int | None = None, seed: int = 0, layout: str = "hf"
) -> GptOssConfig:
    """Write a synthetic checkpoint folder atomically and return its config."""
    cfg = preset_config(preset, num_layers)
    for dim, what in ((cfg.hidden_size, "hidden_size"), (cfg.intermediate_size, "intermediate_size")):
        if dim % GROUP:
            raise GptOssError(f"{what}={dim} is not a multiple of {GROUP} (MXFP4 groups)")
    require_free_space(output.parent, int(cfg.weight_bytes("mxfp4") * 1.1), f"the {preset} checkpoint")
    tokenizer = train_synthetic_tokenizer(min(TOKENIZER_VOCAB, cfg.vocab_size), seed)
    special = special_token_ids(tokenizer)
    with atomic_output(output) as tmp:
        write_checkpoint(tmp, cfg, _Generator(cfg, seed).tensors(), layout=layout, special=special)
        write_generation_config(tmp, special)
        write_hf_tokenizer(tmp, tokenizer, cfg.max_position_embeddings)
        origin = {"synthetic": True, "preset": preset, "layers": cfg.num_hidden_layers, "seed": seed, "layout": layout}
        (tmp / SYNTH_FILE).write_text(json.dumps(origin, indent=2) + "\n")
    return cfg
