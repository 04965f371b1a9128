"""``gptoss download``: a pinned, resumable Hugging Face Hub snapshot of the files a conversion needs."""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path
from urllib.parse import urlsplit

from gptoss.errors import GptOssError
from gptoss.files import HashingFile, atomic_output, require_free_space, sha256
from gptoss.formats.tokenizer import TOKENIZER_FILES

log = logging.getLogger("gptoss.download")

# The Hub client's fnmatch lets ``*`` match ``/`` ("*.safetensors" would fetch original/'s copy of the weights
# too), so every pattern names one folder: the top level (HF layout) or original/ (OpenAI's layout).
ALLOW_PATTERNS: dict[str, list[str]] = {
    "hf": [
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "model-?????-of-?????.safetensors",
        "model.safetensors.index.json",
        *TOKENIZER_FILES,
    ],
    "original": ["original/*", "generation_config.json", *TOKENIZER_FILES],
}
REVISION_FILE = "download.json"
PARTIAL = ".gptoss-partial"  # output/.gptoss-partial/SHA256: an LFS file fetched so far (one version: its sha256)


def layout_files(info: object, layout: str) -> list:
    """The layout's files in the repository listing (``model_info(files_metadata=True).siblings``)."""
    from huggingface_hub.utils import filter_repo_objects

    siblings = getattr(info, "siblings", None) or []
    return list(filter_repo_objects(siblings, allow_patterns=ALLOW_PATTERNS[layout], key=lambda f: f.rfilename))


def in_place(output: Path, f: object) -> bool:
    """Whether listed file ``f`` is in ``output`` with its listed size."""
    return (output / f.rfilename).is_file() and (output / f.rfilename).stat().st_size == f.size


def fetched_bytes(output: Path, f: object) -> int:
    """How much of listed file ``f`` is in ``output``: all of it in place, else its partial's bytes (LFS files)."""
    partial = output / PARTIAL / getattr(getattr(f, "lfs", None), "sha256", "-")
    done = f.size if in_place(output, f) else partial.stat().st_size if partial.is_file() else 0
    return done if done <= (f.size or 0) else 0


def check_sha256(f: object, digest: str, start: float) -> bool:
    """Whether ``digest`` is the sha256 listed for LFS file ``f`` (huggingface_hub 2.4 checks only sizes), logged
    with the seconds since ``start`` the check took."""
    matches = digest == f.lfs.sha256
    log.info(f"{f.rfilename}: sha256 {'as listed' if matches else 'differs'} ({time.perf_counter() - start:.2f} s)")
    return matches


def kept(output: Path, f: object) -> bool:
    """Whether LFS file ``f`` is in ``output`` with its listed size and sha256; one that differs is deleted."""
    if not in_place(output, f):
        return False
    path, start = output / f.rfilename, time.perf_counter()
    if check_sha256(f, sha256(path), start):
        return True
    path.unlink()
    return False


def fetch(repo_id: str, commit: str, f: object, output: Path) -> bool:
    """LFS file ``f`` into its partial, with ``Range`` from the partial's size (what a former run left), hashed as
    it comes; then atomically into place if its sha256 is as listed, else the partial is deleted."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.file_download import http_get
    from huggingface_hub.utils import build_hf_headers

    partial, done = output / PARTIAL / f.lfs.sha256, fetched_bytes(output, f)
    partial.parent.mkdir(parents=True, exist_ok=True)
    (output / f.rfilename).parent.mkdir(parents=True, exist_ok=True)
    log.info(f"fetching {f.rfilename}: {f.size / 1e6:.1f} MB, resumed from {done / 1e6:.1f} MB")
    url, headers = hf_hub_url(repo_id, f.rfilename, revision=commit), build_hf_headers()
    location = get_hf_file_metadata(url, headers=headers).location  # past the Hub's redirect (to the CDN)
    if urlsplit(location).netloc != urlsplit(url).netloc:  # no token to the CDN, as in huggingface_hub
        headers.pop("authorization", None)
    out = HashingFile(partial, done)  # hashed while it comes
    try:
        http_get(location, out, resume_size=done, headers=headers, expected_size=f.size, displayed_filename=f.rfilename)
    finally:
        start, digest = time.perf_counter(), out.close()
    if matches := check_sha256(f, digest, start):
        partial.replace(output / f.rfilename)
    else:
        partial.unlink()
    return matches


def download(repo_id: str, revision: str, output: Path, retries: int = 3, layout: str = "hf") -> str:
    """Snapshot one layout of ``repo_id@revision`` into ``output`` (resumable: complete files are kept, LFS ones
    if their sha256 is as listed, and an interrupted LFS file continues from its partial).

    ``layout="hf"`` fetches the top-level ``config.json`` and ``model*.safetensors``; ``"original"`` fetches
    ``original/`` (OpenAI's names and config). Both fetch the top-level tokenizer and generation config files.
    ``snapshot_download`` fetches the small files; the LFS files come one at a time over plain HTTP (``fetch``),
    bypassing Xet when ``hf_xet`` is installed: a resume across runs and a sha256 check matter more than its speed.

    The token comes from the environment (``HF_TOKEN``) through ``huggingface_hub`` and is never logged.
    Returns the resolved commit hash, also written to ``output/download.json``.
    """
    if layout not in ALLOW_PATTERNS:
        raise GptOssError(f"unknown layout {layout!r}; choose one of {list(ALLOW_PATTERNS)}")
    from huggingface_hub import HfApi, snapshot_download

    # A killed run's partial small files: huggingface_hub 2.4 never resumes them (each download has its own file).
    for stale in (output / ".cache/huggingface/download").rglob("*.incomplete"):
        stale.unlink()
    last_error: Exception | None = None
    checked: dict[str, bool] = {}  # the LFS files in place (kept or fetched) with the listed sha256
    for attempt in range(1, retries + 1):
        try:
            info = HfApi().model_info(repo_id, revision=revision, files_metadata=True)
            commit, files = info.sha or revision, layout_files(info, layout)
            missing = sum((f.size or 0) - fetched_bytes(output, f) for f in files)  # partials count as fetched
            require_free_space(output, missing, f"{repo_id} ({layout} layout)")
            log.info(f"downloading {repo_id}@{revision} (commit {commit}, {layout}) into {output}, attempt {attempt}")
            lfs = [f for f in files if getattr(f, "lfs", None)]
            small = {"allow_patterns": ALLOW_PATTERNS[layout], "ignore_patterns": [f.rfilename for f in lfs]}
            snapshot_download(repo_id=repo_id, revision=commit, local_dir=str(output), **small)
            for f in lfs:  # in the main thread: Ctrl-C stops at once, and the partial stays for the next run
                if f.rfilename not in checked:
                    checked[f.rfilename] = kept(output, f) or fetch(repo_id, commit, f, output)
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
    if bad := [f for f in lfs if not checked[f.rfilename]]:
        raise GptOssError(
            f"{repo_id}: {bad[0].rfilename} does not match its sha256 {bad[0].lfs.sha256}: deleted, run again"
        )
    shutil.rmtree(output / PARTIAL, ignore_errors=True)
    origin = {"repo_id": repo_id, "revision": revision, "commit": commit, "layout": layout}
    with atomic_output(output / REVISION_FILE) as tmp:
        tmp.write_text(json.dumps(origin, indent=2) + "\n")
    return commit
