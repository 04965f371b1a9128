"""The checkpoint's ``tokenizer.json`` read with ``tokenizers`` (offline), and a synthetic one for tests."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptoss.errors import GptOssError

# The tokenizer files of a checkpoint (the ones it has), downloaded with it and placed beside a decoder graph.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
SPECIAL_TOKENS = ["<|endoftext|>", "<|start|>", "<|end|>"]
# The roles openai/gpt-oss-* give their special tokens (bos <|startoftext|>, eos <|return|>, pad <|endoftext|>),
# taken by the synthetic tokenizer's own: the parity code pads with id 0 = <|endoftext|>.
SYNTH_ROLES = {"bos_token": "<|start|>", "eos_token": "<|end|>", "pad_token": "<|endoftext|>"}
_SENTENCES = [
    "What is the capital of France?",
    "The capital of France is Paris.",
    "Mixture-of-experts models route every token to a few experts.",
    "Sliding window attention looks at the most recent tokens only.",
    "Rotary position embeddings rotate queries and keys by their position.",
    "ONNX Runtime runs the exported graph on the CPU.",
    "Every difference is measured and written down.",
    "A quick brown fox jumps over the lazy dog.",
    "def forward(self, x):\n    return x @ self.kernel + self.bias\n",
    "Numbers like 3.14159, 2.71828 and 1.41421 appear in text too.",
]


def load_tokenizer(path: Path) -> Tokenizer:
    """Load a ``tokenizer.json``; a missing or unreadable file is a clear error naming it."""
    path = Path(path)
    if not path.is_file():
        raise GptOssError(f"{path}: tokenizer.json not found (pass --tokenizer or --token-ids)")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # tokenizers raises plain Exception subclasses
        raise GptOssError(f"{path}: not a valid tokenizer.json ({exc})") from None


def encode(tokenizer: Tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False).ids


def train_synthetic_tokenizer(vocab_size: int, seed: int) -> Tokenizer:
    """A small byte-level BPE, deterministic for a seed (its corpus is the fixed sentences in a seeded order)."""
    rng = np.random.default_rng(seed)
    corpus = [_SENTENCES[i] for i in rng.permutation(len(_SENTENCES))] * 4
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=SPECIAL_TOKENS,
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    return tok


@dataclasses.dataclass(frozen=True)
class SpecialTokenIds:
    """Ids of the special-token roles, as ``config.json`` and ``generation_config.json`` record them."""

    bos: int
    eos: int  # the tokenizer's eos_token, config.json's eos_token_id
    pad: int
    stop: tuple[int, ...]  # generation_config.json's eos_token_id: eos first, then the other end tokens


def special_token_ids(tokenizer: Tokenizer, roles: dict[str, str] = SYNTH_ROLES) -> SpecialTokenIds:
    """Resolve ``roles`` in ``tokenizer``; generation stops at eos and at pad (as gpt-oss stops at <|endoftext|>)."""
    ids = {}
    for role, token in roles.items():
        token_id = tokenizer.token_to_id(token)
        if token_id is None:
            raise GptOssError(f"the tokenizer has no {token!r} (wanted as {role})")
        ids[role] = token_id
    eos, pad = ids["eos_token"], ids["pad_token"]
    return SpecialTokenIds(bos=ids["bos_token"], eos=eos, pad=pad, stop=(eos, pad) if pad != eos else (eos,))


def hf_tokenizer_files(
    tokenizer: Tokenizer, model_max_length: int, roles: dict[str, str] = SYNTH_ROLES
) -> dict[str, dict[str, Any]]:
    """``tokenizer_config.json`` and ``special_tokens_map.json`` for ``tokenizer`` in the form openai/gpt-oss-*
    ships them, so that ``transformers.AutoTokenizer`` loads the folder with its special tokens set."""
    fields = ("content", "lstrip", "normalized", "rstrip", "single_word", "special")
    added = {
        str(token_id): {field: getattr(token, field) for field in fields}
        for token_id, token in sorted(tokenizer.get_added_tokens_decoder().items())
    }
    config = {
        "added_tokens_decoder": added,
        **roles,
        "clean_up_tokenization_spaces": False,
        "model_input_names": ["input_ids", "attention_mask"],
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    return {"tokenizer_config.json": config, "special_tokens_map.json": dict(roles)}


def write_hf_tokenizer(
    folder: Path, tokenizer: Tokenizer, model_max_length: int, roles: dict[str, str] = SYNTH_ROLES
) -> None:
    """Write ``tokenizer.json`` plus the :func:`hf_tokenizer_files` into ``folder``."""
    tokenizer.save(str(folder / "tokenizer.json"))
    for name, content in hf_tokenizer_files(tokenizer, model_max_length, roles).items():
        (folder / name).write_text(json.dumps(content, indent=2) + "\n")
