"""The decoder graph's contract with onnxruntime-genai (inputs and outputs: docs/gpt_oss/README.md): its
``genai_config.json`` and tokenizer files, and the checks that a folder's config agrees with its graph.

Every layer's ``present`` keeps every position (the sliding window is a mask in the graph), so ``genai_config.json``
has no ``sliding_window`` section: with one, onnxruntime-genai 0.18 hands those layers a ``present`` buffer capped
below ``total_sequence_length`` (on the toy: 24 positions for a window of 8, and the run fails at position 25).
``past_present_share_buffer`` is off, so ``present`` has exactly the shape the graph computes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from gptoss.config import ParamsConfig
from gptoss.errors import GptOssError
from gptoss.formats.tokenizer import TOKENIZER_FILES
from gptoss.graphs.names import MASK_NAME, PAST_KEY, PAST_PREFIX, PAST_VALUE, PRESENT_KEY, PRESENT_VALUE

GENAI_CONFIG = "genai_config.json"
TOTAL_LENGTH = "total_sequence_length"


def cache_names(layers: int, names: tuple[str, str] = (PAST_KEY, PAST_VALUE)) -> list[str]:
    """Every layer's cache input names (key, value), or output names with ``(PRESENT_KEY, PRESENT_VALUE)``."""
    return [name % i for i in range(layers) for name in names]


def genai_config(params_cfg: ParamsConfig, context_length: int, filename: str) -> dict[str, Any]:
    """``genai_config.json`` for the decoder graph: its shape, token ids, context length and sampling defaults."""
    cfg, tokens = params_cfg.model, params_cfg.generation or {}
    decoder = {
        "filename": filename,
        "head_size": cfg.head_dim,
        "hidden_size": cfg.hidden_size,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_key_value_heads,
        "num_hidden_layers": cfg.num_hidden_layers,
        "inputs": {
            "input_ids": "input_ids",
            "attention_mask": MASK_NAME,
            "past_key_names": PAST_KEY,
            "past_value_names": PAST_VALUE,
        },
        "outputs": {"logits": "logits", "present_key_names": PRESENT_KEY, "present_value_names": PRESENT_VALUE},
        "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
    }
    return {
        "model": {
            "type": "gptoss",
            "bos_token_id": tokens.get("bos_token_id"),
            "eos_token_id": params_cfg.eos_token_ids,
            "pad_token_id": tokens.get("pad_token_id", 0),
            "vocab_size": cfg.vocab_size,
            "context_length": context_length,
            "decoder": decoder,
        },
        "search": {
            "do_sample": bool(tokens.get("do_sample", False)),
            "max_length": context_length,
            "min_length": 0,
            "num_beams": 1,
            "num_return_sequences": 1,
            "past_present_share_buffer": False,
            "repetition_penalty": 1.0,
            "temperature": 1.0,
            "top_k": 50,
            "top_p": 1.0,
        },
    }


def write_companions(folder: Path, params_cfg: ParamsConfig, context_length: int, filename: str) -> list[Path]:
    """Write ``genai_config.json`` for the graph ``filename`` into ``folder``, with the checkpoint's tokenizer files."""
    written = [folder / GENAI_CONFIG]
    written[0].write_text(json.dumps(genai_config(params_cfg, context_length, filename), indent=2) + "\n")
    if params_cfg.tokenizer:
        source = Path(params_cfg.tokenizer).parent
        for name in TOKENIZER_FILES:
            if (source / name).is_file():
                written.append(Path(shutil.copyfile(source / name, folder / name)))
    return written


def graph_numbers(onnx_path: Path) -> dict[str, int]:
    """What the decoder graph itself says about the model (from its inputs, outputs and initializers)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph

    def dims(value) -> list[int | str]:
        return [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]

    past = [v for v in graph.input if v.name.startswith(PAST_PREFIX)]
    logits = next((v for v in graph.output if v.name == "logits"), None)
    if not past or logits is None:
        raise GptOssError(f"{onnx_path}: not a decoder graph (no past_key_values.* inputs or logits output)")
    key = dims(past[0])
    embedding = next((list(t.dims) for t in graph.initializer if t.name == "embed.embedding"), [0, 0])
    return {
        "num_hidden_layers": len(past) // 2,
        "num_key_value_heads": int(key[1]),
        "head_size": int(key[3]),
        "vocab_size": int(dims(logits)[-1]),
        "hidden_size": int(embedding[1]),
    }


def companion_files(folder: Path) -> list[Path]:
    """The files onnxruntime-genai reads beside a decoder graph: its config and the tokenizer files there."""
    return [folder / name for name in (GENAI_CONFIG, *TOKENIZER_FILES) if (folder / name).is_file()]


def check_folder(folder: Path) -> dict[str, Any]:
    """The folder's ``genai_config.json``, after checking that its numbers are the graph's."""
    config_path = folder / GENAI_CONFIG
    if not config_path.is_file():
        raise GptOssError(f"{config_path}: not found (onnxruntime-genai needs it beside the graph)")
    try:
        config = json.loads(config_path.read_text())
        model, decoder = config["model"], config["model"]["decoder"]
        stated = {key: decoder[key] for key in ("num_hidden_layers", "num_key_value_heads", "head_size", "hidden_size")}
        stated["vocab_size"] = model["vocab_size"]
        graph_file = folder / decoder["filename"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise GptOssError(f"{config_path}: not a decoder genai_config.json ({exc})") from None
    actual = graph_numbers(graph_file)
    wrong = {key: (value, actual[key]) for key, value in stated.items() if value != actual[key]}
    if wrong:
        detail = ", ".join(f"{key} {said} (the graph has {has})" for key, (said, has) in wrong.items())
        raise GptOssError(f"{config_path} disagrees with {graph_file.name}: {detail}")
    return config
