"""Files: written to a temporary name and renamed (a failed step never leaves a half-written artifact), free-space
checks before large writes, and sha256 digests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gptoss.errors import GptOssError


def temporary_name(path: Path) -> Path:
    """``dir/.name.partial``: hidden, next to the target (same filesystem, so the rename is atomic)."""
    return path.with_name(f".{path.name}.partial")


@contextlib.contextmanager
def atomic_output(path: Path) -> Iterator[Path]:
    """Yield a temporary path for a file, or for a folder the caller creates; on success it replaces ``path``
    (an existing folder too), on any error it is removed. A temporary left by a killed run is cleared first."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    _remove(tmp)
    try:
        yield tmp
        if tmp.is_dir() and path.is_dir():
            # os.replace cannot replace a non-empty folder: move the old one aside, swap, then delete it.
            old = path.with_name(f".{path.name}.old")
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def require_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Fail before writing ``what`` if ``folder``'s filesystem has less than ``needed_bytes`` free."""
    folder = Path(folder)
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("."))
    if (free := shutil.disk_usage(probe).free) < needed_bytes:
        raise GptOssError(
            f"{folder}: not enough free disk space for {what}: needs {needed_bytes / 1e9:.1f} GB, "
            f"{free / 1e9:.1f} GB free"
        )


def sha256(path: Path) -> str:
    """Hex sha256 of a file, streamed."""
    return _hash_into(hashlib.sha256(), path).hexdigest()


def _hash_into(digest: hashlib._Hash, path: Path, size: int | None = None, chunk: int = 16 * 2**20) -> hashlib._Hash:
    """``digest`` updated with the first ``size`` bytes of ``path`` (all of them if None)."""
    with open(path, "rb") as fh:
        left = os.fstat(fh.fileno()).st_size if size is None else size
        while left > 0 and (block := fh.read(min(chunk, left))):
            digest.update(block)
            left -= len(block)
    return digest


class HashingFile:
    """A file being written whose sha256 follows its bytes, hashed on a thread of its own so that hashing overlaps
    the writing (one chunk in flight); the ``keep`` bytes it already holds are hashed first. It has the file methods
    a download uses: write and truncate (a restarted download keeps a prefix, hashed again), tell and seek."""

    def __init__(self, path: Path, keep: int) -> None:
        self.fh, self.pool, self.pending = open(path, "r+b" if keep else "w+b"), ThreadPoolExecutor(1), None
        self.truncate(keep)

    def truncate(self, size: int | None = None) -> int:
        if self.pending:
            self.pending.result()
        size = self.fh.tell() if size is None else size
        self.fh.truncate(size)
        self.fh.seek(size)
        self.digest = hashlib.sha256()
        self.pending = self.pool.submit(_hash_into, self.digest, Path(self.fh.name), size)
        return size

    def write(self, data: bytes) -> int:
        self.pending.result()
        self.pending = self.pool.submit(self.digest.update, data)
        return self.fh.write(data)

    def __getattr__(self, name: str) -> object:  # tell, seek: the file's own
        return getattr(self.fh, name)

    def close(self) -> str:
        """Close the file once its last bytes are hashed; the hex sha256."""
        self.pending.result()
        self.pool.shutdown()
        self.fh.close()
        return self.digest.hexdigest()
