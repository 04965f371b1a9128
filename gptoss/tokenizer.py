"""The checkpoint's ``tokenizer.json`` read with ``tokenizers`` (offline), and a synthetic one for tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from gptoss.errors import GptOssError

SPECIAL_TOKENS = ["<|endoftext|>", "<|start|>", "<|end|>"]
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
