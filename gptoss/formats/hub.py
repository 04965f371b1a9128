"""``gptoss download``: a pinned, resumable Hugging Face Hub snapshot of the files a conversion needs."""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gptoss.errors import GptOssError
from gptoss.files import atomic_output, require_free_space, sha256

log = logging.getLogger("gptoss.download")

# The Hub client's fnmatch lets ``*`` match ``/`` ("*.safetensors" would fetch original/'s copy of the weights
# too), so every pattern names one folder: the top level (HF layout) or original/ (OpenAI's layout).
TOKENIZER_PATTERNS = ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja"]
ALLOW_PATTERNS: dict[str, list[str]] = {
    "hf": [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model-?????-of-?????.safetensors",
        "model.safetensors.index.json",
        *TOKENIZER_PATTERNS,
    ],
    "original": ["original/*", "generation_config.json", *TOKENIZER_PATTERNS],
}
REVISION_FILE = "download.json"


def layout_files(info: object, layout: str) -> list:
    """The layout's files in the repository listing (``model_info(files_metadata=True).siblings``)."""
    from huggingface_hub.utils import filter_repo_objects

    siblings = getattr(info, "siblings", None) or []
    return list(filter_repo_objects(siblings, allow_patterns=ALLOW_PATTERNS[layout], key=lambda f: f.rfilename))


def missing_bytes(info: object, output: Path, layout: str) -> int:
    """Bytes still to fetch: the layout's files in the repository listing, less those already complete in
    ``output`` (a resumed download)."""
    total = 0
    for f in layout_files(info, layout):
        size, local = f.size or 0, output / f.rfilename
        total += 0 if local.is_file() and local.stat().st_size == size else size
    return total


def verify(info: object, output: Path, layout: str, repo_id: str) -> None:
    """Each LFS file of the layout against the sha256 the Hub lists (huggingface_hub 2.4 checks only the size);
    one that differs is deleted, so the next run fetches it again."""
    start, files = time.perf_counter(), [f for f in layout_files(info, layout) if getattr(f, "lfs", None)]
    with ThreadPoolExecutor(max(1, min(8, len(files)))) as pool:  # hashlib and reads release the GIL
        digests = list(pool.map(lambda f: sha256(output / f.rfilename), files))
    for f, digest in zip(files, digests, strict=True):
        if digest != f.lfs.sha256:
            (output / f.rfilename).unlink()
            raise GptOssError(f"{repo_id}: {f.rfilename} does not match its sha256 {f.lfs.sha256}: deleted, run again")
    log.info(f"sha256 of {len(files)} LFS files as listed, checked in {time.perf_counter() - start:.2f} s")


def download(repo_id: str, revision: str, output: Path, retries: int = 3, layout: str = "hf") -> str:
    """Snapshot one layout of ``repo_id@revision`` into ``output`` (resumable: files already there are kept).

    ``layout="hf"`` fetches the top-level ``config.json`` and ``model*.safetensors``; ``"original"`` fetches
    ``original/`` (OpenAI's names and config). Both fetch the top-level tokenizer and generation config files.

    The token comes from the environment (``HF_TOKEN``) through ``huggingface_hub`` and is never logged.
    Returns the resolved commit hash, also written to ``output/download.json``.
    """
    if layout not in ALLOW_PATTERNS:
        raise GptOssError(f"unknown layout {layout!r}; choose one of {list(ALLOW_PATTERNS)}")
    from huggingface_hub import HfApi, snapshot_download

    # A killed run's partial files: huggingface_hub 2.4 never resumes them (each download has its own temp file).
    for stale in (output / ".cache/huggingface/download").rglob("*.incomplete"):
        stale.unlink()
    last_error: Exception | None = None
    for attempt in range(1, retries + 1):
        try:
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
            commit = info.sha or revision
            require_free_space(output, missing_bytes(info, output, layout), f"{repo_id} ({layout} layout)")
            log.info(
                f"downloading {repo_id}@{revision} (commit {commit}, {layout} layout) into {output}, attempt {attempt}"
            )
            snapshot_download(
                repo_id=repo_id, revision=commit, local_dir=str(output), allow_patterns=ALLOW_PATTERNS[layout]
            )
            break
        except GptOssError:
            raise
        except Exception as exc:  # noqa: BLE001 — network errors come from several libraries (httpx, requests, OS)
            status = getattr(getattr(exc, "response", None), "status_code", None)
            if status in (401, 403, 404):  # no retry: a missing, gated or private repo, or a wrong revision
                raise GptOssError(
                    f"{repo_id}@{revision}: HTTP {status} ({type(exc).__name__}): check the repo id and revision; "
                    "a gated or private repo needs HF_TOKEN set to a token with access"
                ) from None
            last_error = exc
            log.warning("download attempt %d failed: %s", attempt, str(exc).splitlines()[0])
    else:
        raise GptOssError(
            f"could not download {repo_id}@{revision} after {retries} attempts "
            f"({str(last_error).splitlines()[0] if last_error else 'unknown error'}); offline? "
            "try the synthetic toy workflow: --configfile config/toy.yaml"
        )
    verify(info, output, layout, repo_id)
    origin = {"repo_id": repo_id, "revision": revision, "commit": commit, "layout": layout}
    with atomic_output(output / REVISION_FILE) as tmp:
        tmp.write_text(json.dumps(origin, indent=2) + "\n")
    return commit
