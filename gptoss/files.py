"""Files: written to a temporary name and renamed (a failed step never leaves a half-written artifact), free-space
checks before large writes, and sha256 digests."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
from collections.abc import Iterator
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


def sha256(path: Path, chunk: int = 16 * 1024 * 1024) -> str:
    """Hex sha256 of a file, streamed."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()
