"""Flax-compatible msgpack params files: exactly what ``flax.serialization.msgpack_serialize`` makes of the nested
params dict (arrays as msgpack ext type 1 holding ``(shape, dtype name, raw bytes)``, those over 1 GiB in flax's
chunked form), but never built as one ``bytes`` object: the writer streams each array to disk, the reader indexes
where each array's bytes are (one pass over the headers) and reads an array straight into its buffer when asked for."""

from __future__ import annotations

import dataclasses
import struct
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

import ml_dtypes
import msgpack
import numpy as np

from gptoss.errors import GptOssError
from gptoss.files import atomic_output

EXT_NDARRAY = 1
MAX_CHUNK_BYTES = 2**30  # flax.serialization.MAX_CHUNK_SIZE
CHUNKED_KEY = "__msgpack_chunked_array__"


def _build_tree(names: Iterable[str]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for name in names:
        *parents, leaf = name.split(".")
        node = tree
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = name
    return tree


def _write_array(fh: IO[bytes], packer: msgpack.Packer, arr: np.ndarray) -> None:
    arr = np.ascontiguousarray(arr)
    if arr.nbytes > MAX_CHUNK_BYTES:
        _write_chunked(fh, packer, arr)
        return
    head = packer.pack(list(arr.shape)) + packer.pack(arr.dtype.name)
    inner = b"\x93" + head + b"\xc6" + struct.pack(">I", arr.nbytes)
    fh.write(b"\xc9" + struct.pack(">Ib", len(inner) + arr.nbytes, EXT_NDARRAY) + inner)
    fh.write(memoryview(arr.reshape(-1).view(np.uint8)))  # a uint8 view: bfloat16 has no buffer format


def _write_chunked(fh: IO[bytes], packer: msgpack.Packer, arr: np.ndarray) -> None:
    # flax's chunked form: {"__msgpack_chunked_array__": True, "shape": {"0": d0, ...}, "chunks": {"0": a0, ...}}
    flat = arr.reshape(-1)
    per_chunk = max(1, MAX_CHUNK_BYTES // arr.dtype.itemsize)
    starts = range(0, flat.size, per_chunk)
    fh.write(packer.pack_map_header(3) + packer.pack(CHUNKED_KEY) + packer.pack(True))
    fh.write(packer.pack("shape") + packer.pack({str(i): d for i, d in enumerate(arr.shape)}))
    fh.write(packer.pack("chunks") + packer.pack_map_header(len(starts)))
    for i, start in enumerate(starts):
        fh.write(packer.pack(str(i)))
        _write_array(fh, packer, flat[start : start + per_chunk])


def write_params(
    path: Path, names: Iterable[str], read: Callable[[str], np.ndarray], progress: Callable[[str], None] | None = None
) -> None:
    """Write params to ``path`` atomically; ``read(name)`` is called once per name, in tree order."""
    tree = _build_tree(names)
    packer = msgpack.Packer(use_bin_type=True)

    def write_node(fh: IO[bytes], node: dict[str, Any]) -> None:
        fh.write(packer.pack_map_header(len(node)))
        for key, value in node.items():
            fh.write(packer.pack(key))
            if isinstance(value, dict):
                write_node(fh, value)
            else:
                _write_array(fh, packer, read(value))
                if progress:
                    progress(value)

    with atomic_output(path) as tmp, open(tmp, "wb") as fh:
        write_node(fh, tree)


ALIGNMENT = 64


def aligned_empty(shape: Sequence[int], dtype: np.dtype) -> np.ndarray:
    """An uninitialised array whose data starts on a 64-byte boundary: JAX on CPU adopts it without a copy (it
    copies a merely 16-byte-aligned one, as ``np.empty`` gives, on first use; docs/performance.md)."""
    nbytes = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    raw = np.empty(nbytes + ALIGNMENT, dtype=np.uint8)
    start = -raw.ctypes.data % ALIGNMENT
    return raw[start : start + nbytes].view(dtype).reshape(shape)


@dataclasses.dataclass(frozen=True)
class StoredArray:
    """Where an array's bytes are in a params file: ``(offset, bytes)`` segments (several for a chunked one)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    segments: tuple[tuple[int, int], ...]


class _Indexer:
    """A minimal msgpack reader for the subset ``write_params`` and flax produce: it passes over every array's
    bytes (a seek), noting where they are."""

    def __init__(self, fh: IO[bytes], path: Path) -> None:
        self.fh, self.path = fh, path
        self.index: dict[str, StoredArray] = {}

    def _read(self, n: int) -> bytes:
        data = self.fh.read(n)
        if len(data) != n:
            raise GptOssError(f"{self.path}: truncated params file")
        return data

    def _uint(self, n: int) -> int:
        return int.from_bytes(self._read(n), "big")

    def value(self) -> Any:
        """The next value; an array is passed over and comes back as its :class:`StoredArray`."""
        b = self._read(1)[0]
        if b <= 0x7F:
            return b
        if 0x80 <= b <= 0x8F:
            return self._map(b & 0x0F)
        if 0x90 <= b <= 0x9F:
            return [self.value() for _ in range(b & 0x0F)]
        if 0xA0 <= b <= 0xBF:
            return self._read(b & 0x1F).decode()
        simple = {0xC0: None, 0xC2: False, 0xC3: True}
        if b in simple:
            return simple[b]
        sized = {0xC4: 1, 0xC5: 2, 0xC6: 4, 0xD9: 1, 0xDA: 2, 0xDB: 4}
        if b in sized:
            raw = self._read(self._uint(sized[b]))
            return raw if b <= 0xC6 else raw.decode()
        if b in (0xCC, 0xCD, 0xCE, 0xCF):
            return self._uint(1 << (b - 0xCC))
        if b in (0xDC, 0xDD):
            return [self.value() for _ in range(self._uint(2 if b == 0xDC else 4))]
        if b in (0xDE, 0xDF):
            return self._map(self._uint(2 if b == 0xDE else 4))
        if b in (0xC7, 0xC8, 0xC9) or 0xD4 <= b <= 0xD8:
            return self._array(b)
        raise GptOssError(f"{self.path}: not a params msgpack file (unexpected byte 0x{b:02x})")

    def _map(self, n: int) -> dict[str, Any]:
        return {str(self.value()): self.value() for _ in range(n)}

    def _array(self, marker: int) -> StoredArray:
        """An ndarray ext entry, parsed up to its raw bytes, which are passed over."""
        if not (marker in (0xC7, 0xC8, 0xC9) or 0xD4 <= marker <= 0xD8):
            raise GptOssError(f"{self.path}: expected an array entry (byte 0x{marker:02x})")
        length = self._uint({0xC7: 1, 0xC8: 2, 0xC9: 4}[marker]) if marker <= 0xC9 else 1 << (marker - 0xD4)
        code = struct.unpack("b", self._read(1))[0]
        if code != EXT_NDARRAY:
            raise GptOssError(f"{self.path}: unsupported msgpack ext type {code}")
        start = self.fh.tell()
        if self._read(1)[0] != 0x93:
            raise GptOssError(f"{self.path}: malformed array entry")
        shape = self.value()
        dtype_name = self.value()
        dtype_name = dtype_name.decode() if isinstance(dtype_name, bytes) else dtype_name
        nbytes = self._uint({0xC4: 1, 0xC5: 2, 0xC6: 4}[self._read(1)[0]])
        dtype = np.dtype(ml_dtypes.bfloat16) if dtype_name == "bfloat16" else np.dtype(dtype_name)
        if int(np.prod(shape, dtype=np.int64)) * dtype.itemsize != nbytes or self.fh.tell() - start + nbytes != length:
            raise GptOssError(f"{self.path}: array entry size does not match its shape {shape} {dtype_name}")
        offset = self.fh.seek(nbytes, 1) - nbytes
        return StoredArray(tuple(shape), dtype, ((offset, nbytes),))

    def _chunked(self, size: int) -> StoredArray:
        """flax's chunked array (after its first key): the whole shape, the chunks' places in order."""
        self.value()  # the marker's value (True)
        shape: tuple[int, ...] | None = None
        chunks: list[StoredArray] = []
        for _ in range(size - 1):
            key = str(self.value())
            if key == "shape":
                dims = self.value()
                shape = tuple(dims[str(i)] for i in range(len(dims)))
            elif key == "chunks" and shape is not None:
                for _ in range(self._map_header() or 0):
                    self.value()  # chunk index
                    chunks.append(self._array(self._read(1)[0]))
            else:
                raise GptOssError(f"{self.path}: malformed chunked array (unexpected key {key!r})")
        count = sum(int(np.prod(c.shape, dtype=np.int64)) for c in chunks)
        if shape is None or not chunks or count != int(np.prod(shape, dtype=np.int64)):
            raise GptOssError(f"{self.path}: malformed chunked array")
        return StoredArray(shape, chunks[0].dtype, tuple(s for c in chunks for s in c.segments))

    def _map_header(self) -> int | None:
        """If the next value is a map, consume its header and return its size; otherwise consume nothing."""
        b = self._read(1)[0]
        if 0x80 <= b <= 0x8F:
            return b & 0x0F
        if b in (0xDE, 0xDF):
            return self._uint(2 if b == 0xDE else 4)
        self.fh.seek(-1, 1)
        return None

    def leaves(self, prefix: str = "", size: int | None = None) -> None:
        """Walk the nested map (whose header, if already read, gave ``size``), noting every array by dotted name."""
        if size is None:
            size = self._map_header()
        if size is None:
            raise GptOssError(f"{self.path}: not a params msgpack file (expected a map at {prefix or 'the top'})")
        for i in range(size):
            key = str(self.value())
            if i == 0 and key == CHUNKED_KEY:
                self.index[prefix.rstrip(".")] = self._chunked(size)
                return
            name = f"{prefix}{key}"
            nested = self._map_header()
            if nested is not None:
                self.leaves(name + ".", nested)
                continue
            value = self.value()
            if not isinstance(value, StoredArray):
                raise GptOssError(f"{self.path}: params entry {name!r} is not an array")
            self.index[name] = value


def index_params(path: Path) -> dict[str, StoredArray]:
    """Name → place of every array, from one pass over the headers (no array is read)."""
    if not path.is_file():
        raise GptOssError(f"{path}: params file not found")
    with open(path, "rb") as fh:
        indexer = _Indexer(fh, path)
        indexer.leaves()
        end, size = fh.tell(), path.stat().st_size
    if end > size:
        raise GptOssError(f"{path}: truncated params file ({size} bytes, its arrays end at {end})")
    if end < size:
        raise GptOssError(f"{path}: trailing bytes after the params map")
    return indexer.index


def read_stored(path: Path, stored: StoredArray) -> np.ndarray:
    """One array read from its place (into a 64-byte aligned buffer that JAX adopts without a copy)."""
    out = aligned_empty(stored.shape, stored.dtype)
    flat = out.reshape(-1).view(np.uint8)
    with open(path, "rb") as fh:
        position = 0
        for offset, nbytes in stored.segments:
            fh.seek(offset)
            if fh.readinto(memoryview(flat[position : position + nbytes])) != nbytes:
                raise GptOssError(f"{path}: truncated params file")
            position += nbytes
    return out


def read_params(path: Path) -> dict[str, np.ndarray]:
    """Read a whole params msgpack into flat dotted names → arrays."""
    return {name: read_stored(path, stored) for name, stored in index_params(path).items()}
