"""Validated reading of safetensors files (single or sharded), one tensor at a time, without torch (bf16 through
``ml_dtypes``): a tensor is read only when asked for, into a fresh array. Not memory-mapped: mapped pages a process
has touched count in its resident memory until it exits, for convert the whole checkpoint. Every structural problem
is a ``GptOssError`` naming the file."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import ml_dtypes
import numpy as np

from gptoss.errors import GptOssError

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64),
    "F32": np.dtype(np.float32),
    "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
MAX_HEADER = 100 * 1024 * 1024
INDEX_NAME = "model.safetensors.index.json"


class SafetensorsFile:
    """One safetensors file: its header, and its tensors read one at a time."""

    def __init__(self, path: Path) -> None:
        self.path = path
        size = path.stat().st_size
        if size < 8:
            raise GptOssError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        with path.open("rb") as fh:
            header_len = int.from_bytes(fh.read(8), "little")
            if header_len > min(MAX_HEADER, size - 8):
                raise GptOssError(f"{path}: corrupt or truncated safetensors header (length {header_len})")
            try:
                header = json.loads(fh.read(header_len))
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise GptOssError(f"{path}: corrupt safetensors header (not JSON)") from None
        if not isinstance(header, dict):
            raise GptOssError(f"{path}: corrupt safetensors header (not a JSON object)")
        self.metadata = header.pop("__metadata__", None) or {}
        self._data_start = 8 + header_len
        data_size = size - self._data_start
        self._entries: dict[str, tuple[np.dtype, tuple[int, ...], int, int]] = {}
        for name, info in header.items():
            try:
                dtype = DTYPES[info["dtype"]]
                shape = tuple(int(d) for d in info["shape"])
                begin, end = (int(o) for o in info["data_offsets"])
            except (KeyError, TypeError, ValueError):
                raise GptOssError(f"{path}: tensor {name!r} has an unsupported or malformed header entry") from None
            expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            if end - begin != expected:
                raise GptOssError(
                    f"{path}: tensor {name!r} claims shape {list(shape)} {info['dtype']} ({expected} bytes) "
                    f"but spans {end - begin} bytes"
                )
            if end > data_size:
                raise GptOssError(
                    f"{path}: truncated file: tensor {name!r} needs bytes up to {end} but the data section "
                    f"has {data_size}"
                )
            self._entries[name] = (dtype, shape, begin, end)

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, name: str) -> tuple[int, ...]:
        return self._entries[name][1]

    def dtype(self, name: str) -> np.dtype:
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        """One tensor, read from the file into a new array."""
        dtype, shape, begin, end = self._entries[name]
        raw = np.empty(end - begin, dtype=np.uint8)
        with self.path.open("rb") as fh:
            fh.seek(self._data_start + begin)
            if fh.readinto(memoryview(raw)) != raw.nbytes:
                raise GptOssError(f"{self.path}: truncated file while reading tensor {name!r}")
        return raw.view(dtype).reshape(shape)


class TensorStore:
    """All tensors of a checkpoint folder (``*.safetensors``, sharded or not), by name."""

    def __init__(self, files: list[SafetensorsFile]) -> None:
        self._where = {name: f for f in files for name in f.keys()}

    @classmethod
    def open(cls, folder: Path) -> TensorStore:
        if not folder.is_dir():
            raise GptOssError(f"{folder}: checkpoint folder not found")
        index = folder / INDEX_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise GptOssError(f"{index}: not a valid safetensors index (no 'weight_map')") from None
            names = sorted(set(weight_map.values()))
            if missing := [n for n in names if not (folder / n).is_file()]:
                raise GptOssError(f"{index}: lists shard {missing[0]} which is not in {folder}")
            paths = [folder / n for n in names]
        else:
            paths = sorted(folder.glob("*.safetensors"))
            if not paths and (folder / "original").is_dir():
                paths = sorted((folder / "original").glob("*.safetensors"))
        if not paths:
            raise GptOssError(f"{folder}: no *.safetensors files found")
        return cls([SafetensorsFile(p) for p in paths])

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def names(self) -> Iterator[str]:
        return iter(self._where)

    def file_of(self, name: str) -> Path:
        return self._where[name].path

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise GptOssError(f"checkpoint is missing tensor {name!r}")
        return self._where[name].get(name)
