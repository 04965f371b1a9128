"""Write-to-temporary-then-rename, so a failed step never leaves a half-written artifact."""

from __future__ import annotations

import contextlib
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
    """Yield a temporary path; on success rename it to ``path``, on any error remove it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
        raise


def require_free_space(folder: Path, needed_bytes: int, what: str) -> None:
    """Fail before writing ``what`` if ``folder``'s filesystem has less than ``needed_bytes`` free."""
    folder = Path(folder)
    probe = folder if folder.exists() else next((p for p in folder.parents if p.exists()), Path("."))
    free = shutil.disk_usage(probe).free
    if free < needed_bytes:
        raise GptOssError(
            f"{folder}: not enough free disk space for {what}: needs {needed_bytes / 1e9:.1f} GB, "
            f"{free / 1e9:.1f} GB free"
        )
