"""A Hugging Face Hub on 127.0.0.1 for the download tests: the endpoints that huggingface_hub 2.4's
``HfApi.model_info`` and ``snapshot_download`` call, with the Hub's headers, serving repositories from local files.

olah (the self-hosted Hub mirror on PyPI, 0.5.4) can serve local git repositories offline (``mirrors-path``), but
its local-mirror GET ignores ``Range`` (a resume gets the whole file again), its HEAD of an LFS file reads the whole
object into memory to hash it and sends no ``X-Linked-Etag``/``X-Linked-Size``, it brings about 20 dependencies
(fastapi, uvicorn, GitPython, ...) and it cannot inject faults. So this server is written for the tests.

Endpoints (the Hub origin, ``endpoint``), pinned to what huggingface_hub 2.4 sends:

- ``GET /api/models/{repo}/revision/{rev}[?blobs=True]`` (``model_info``): ``id``, ``sha`` (the commit the
  revision resolves to), ``siblings`` (``rfilename``; with ``blobs``: ``size``, ``blobId``, ``lfs`` with
  ``sha256``, ``size``, ``pointerSize``).
- ``GET /api/models/{repo}/tree/{rev}[/{path}]?recursive=True&expand=False`` (``list_repo_tree``, which
  ``snapshot_download`` calls once per commit): files ``{type, oid, size, path, lfs: {oid, size, pointerSize}}``
  and folders, in one page (the Hub pages at 1000 entries with a ``Link`` header; these repositories are smaller).
- ``HEAD|GET /{repo}/resolve/{rev}/{path}``: a regular file answers 200 with ``ETag`` (its git blob sha1),
  ``X-Repo-Commit``, ``Content-Length``; an LFS file answers 302 to the CDN origin with ``X-Repo-Commit``,
  ``X-Linked-Etag`` (its sha256), ``X-Linked-Size`` and ``ETag`` (the pointer's sha1), like the Hub.
- ``GET /api/agent-harnesses`` (huggingface_hub's agent detection, once per process): an empty registry.
- Errors with the Hub's ``X-Error-Code``: an unknown repository 401 ``RepoNotFound`` (404 when a token is sent),
  an unknown revision 404 ``RevisionNotFound``, a missing file 404 ``EntryNotFound``; a gated repository lists its
  files and answers ``resolve`` with 401 ``GatedRepo`` (403 with a token that is not the repository's).

The CDN origin (a second port, so the client drops ``Authorization`` on the redirect as with the real CDN):
``HEAD|GET /lfs/{sha256}``: 200, or 206 with ``Content-Range`` for ``Range: bytes=N-``/``bytes=N-M``, 416 past
the end; ``ETag`` (the sha256), ``Accept-Ranges``, ``Content-Disposition`` with the file name (the client names the
file in its size-check error from it).

Not covered: Xet (no ``X-Xet-*`` headers: huggingface_hub falls back to these plain HTTP downloads, as for any
repository not stored on Xet), uploads, ``paths-info``, ``refs`` and commit listings.

Faults, each set by the test and deterministic (no timing): ``stall_after[path] = n`` sends n bytes of the file's
first GET, sets ``stalled`` and waits (at most ``STALL_S``) before closing, so a test kills the client mid-file;
``drop_after[path] = n`` closes the first GET after n bytes (a dropped connection); ``corrupt`` flips one byte of
every body of those files (the size stays); ``short[path] = n`` serves n bytes with ``Content-Length: n``.
``sent[path]`` counts the body bytes served per file, ``requests`` logs ``(method, path, Range, status)``.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

CHUNK = 1 << 20
STALL_S = 60.0  # the longest a stalled response waits for the test before closing by itself
LIFETIME_S = 900.0  # the server shuts itself down after this, whatever the test does
LFS_SUFFIXES = (".safetensors", ".bin", ".msgpack")
POINTER_SIZE = 134


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            digest.update(block)
    return digest.hexdigest()


@dataclass
class Blob:
    path: str  # in the repository
    source: Path  # on disk
    size: int
    oid: str  # git blob sha1 (of the LFS pointer for an LFS file)
    sha256: str | None  # LFS files only

    @classmethod
    def of(cls, path: str, source: Path) -> Blob:
        size = source.stat().st_size
        if path.endswith(LFS_SUFFIXES) or path == "tokenizer.json":
            sha = file_sha256(source)
            pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n".encode()
            return cls(path, source, size, git_blob_sha1(pointer), sha)
        return cls(path, source, size, git_blob_sha1(source.read_bytes()), None)

    def sibling(self, blobs: bool) -> dict:
        if not blobs:
            return {"rfilename": self.path}
        lfs = {"sha256": self.sha256, "size": self.size, "pointerSize": POINTER_SIZE} if self.sha256 else None
        return {"rfilename": self.path, "size": self.size, "blobId": self.oid, **({"lfs": lfs} if lfs else {})}

    def tree_entry(self) -> dict:
        entry = {"type": "file", "oid": self.oid, "size": self.size, "path": self.path}
        if self.sha256:
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": POINTER_SIZE}
        return entry


@dataclass
class Repo:
    repo_id: str
    commits: dict[str, dict[str, Blob]] = field(default_factory=dict)  # commit sha -> path -> blob
    refs: dict[str, str] = field(default_factory=dict)  # branch or tag -> commit sha
    gated_token: str | None = None  # a gated repository: files need this token

    def add_commit(self, files: dict[str, Path], branch: str = "main") -> str:
        """A commit of ``files`` (repository path -> file on disk) on ``branch``; returns its sha."""
        blobs = {path: Blob.of(path, source) for path, source in sorted(files.items())}
        key = [self.repo_id, branch, len(self.commits), *(b.oid for b in blobs.values())]
        commit = hashlib.sha1(json.dumps(key).encode()).hexdigest()
        self.commits[commit] = blobs
        self.refs[branch] = commit
        return commit

    def resolve(self, revision: str) -> str | None:
        if revision in self.commits:
            return revision
        return self.refs.get(revision)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        """A client the test killed resets its connections: not worth a traceback."""


class HubServer:
    """The Hub and its CDN on two ports of 127.0.0.1, each served by a thread; ``close()`` stops both."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.lock = threading.Lock()
        self.sent: dict[str, int] = {}
        self.requests: list[tuple[str, str, str | None, int]] = []
        self.stall_after: dict[str, int] = {}
        self.drop_after: dict[str, int] = {}
        self.short: dict[str, int] = {}
        self.corrupt: set[str] = set()
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.lfs: dict[str, Blob] = {}
        self._servers = [QuietServer(("127.0.0.1", 0), handler(self, cdn)) for cdn in (False, True)]
        for server in self._servers:
            threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        self._timer = threading.Timer(LIFETIME_S, self.close)
        self._timer.daemon = True
        self._timer.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self._servers[0].server_address[1]}"

    @property
    def cdn(self) -> str:
        return f"http://127.0.0.1:{self._servers[1].server_address[1]}"

    def commit(self, repo_id: str, files: dict[str, Path], branch: str = "main", gated_token: str | None = None) -> str:
        """Commit ``files`` (repository path -> file on disk) to ``repo_id`` (created on first use) on ``branch``;
        returns the commit sha."""
        repo = self.repos.setdefault(repo_id, Repo(repo_id, gated_token=gated_token))
        commit = repo.add_commit(files, branch)
        self.lfs.update({b.sha256: b for b in repo.commits[commit].values() if b.sha256})
        return commit

    def reset_counts(self) -> None:
        with self.lock:
            self.sent.clear()
            self.requests.clear()

    def reset(self) -> None:
        """No faults, no counts: the state a test starts from."""
        self.release.set()  # a response still stalled from the last test ends now
        with self.lock:
            for faults in (self.stall_after, self.drop_after, self.short, self.corrupt):
                faults.clear()
        self.reset_counts()
        self.stalled.clear()
        self.release.clear()

    def close(self) -> None:
        self.release.set()
        self._timer.cancel()
        for server in self._servers:
            server.shutdown()
            server.server_close()


def handler(hub: HubServer, cdn: bool) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "FakeHub/1"
        timeout = 30  # a client that stops reading does not hold a thread forever

        def log_message(self, format: str, *args) -> None:  # noqa: A002 — the base class's signature
            pass

        def do_HEAD(self) -> None:
            self.route(head=True)

        def do_GET(self) -> None:
            self.route(head=False)

        # --- responses ----------------------------------------------------------------------------------------

        def reply(self, status: int, headers: dict[str, str], body: bytes = b"", head: bool = False) -> None:
            with hub.lock:
                hub.requests.append((self.command, self.path, self.headers.get("Range"), status))
            self.send_response(status)
            headers.setdefault("Content-Length", str(len(body)))
            for name, value in headers.items():
                self.send_header(name, value)
            self.end_headers()
            if body and not head:
                self.wfile.write(body)

        def error(self, status: int, code: str, message: str, head: bool) -> None:
            body = json.dumps({"error": message}).encode()
            headers = {"Content-Type": "application/json", "X-Error-Code": code, "X-Error-Message": message}
            self.reply(status, headers, body, head)

        def json(self, payload: object) -> None:
            self.reply(200, {"Content-Type": "application/json"}, json.dumps(payload).encode())

        def token(self) -> str | None:
            auth = self.headers.get("Authorization", "")
            return auth.removeprefix("Bearer ") if auth.startswith("Bearer ") else None

        # --- routing ------------------------------------------------------------------------------------------

        def route(self, head: bool) -> None:
            url = urlsplit(self.path)
            query = parse_qs(url.query)
            if cdn:
                match = re.fullmatch(r"/lfs/([0-9a-f]{64})", url.path)
                blob = hub.lfs.get(match[1]) if match else None
                if blob is None:
                    return self.error(404, "EntryNotFound", "no such object", head)
                return self.body(blob, {"ETag": f'"{blob.sha256}"'}, head)
            if url.path == "/api/agent-harnesses":  # huggingface_hub's agent detection registry: none known
                return self.json({"standardEnvVars": [], "harnesses": {}})
            api = re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/(revision|tree)/([^/]+)(?:/(.*))?)?", url.path)
            resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", url.path)
            match = api or resolve
            if match is None:
                return self.error(404, "NotFound", f"no route {url.path}", head)
            repo = hub.repos.get(unquote(match[1]))
            if repo is None:
                status = 404 if self.token() else 401
                return self.error(status, "RepoNotFound", "Repository not found", head)
            revision = unquote((match[3] if match[2] else "main") if api else match[2])
            commit = repo.resolve(revision)
            if commit is None:
                return self.error(404, "RevisionNotFound", f"Invalid rev id: {revision}", head)
            blobs = repo.commits[commit]
            if api and match[2] == "tree":
                prefix = unquote(match[4] or "")
                recursive = query.get("recursive", ["False"])[0].lower() == "true"
                return self.json(tree(blobs, prefix, recursive))
            if api:
                blobs_flag = query.get("blobs", ["False"])[0].lower() == "true"
                siblings = [b.sibling(blobs_flag) for b in blobs.values()]
                gated = "manual" if repo.gated_token else False
                info = {"_id": commit[:24], "id": repo.repo_id, "modelId": repo.repo_id, "sha": commit}
                return self.json({**info, "private": False, "gated": gated, "siblings": siblings, "tags": []})
            blob = blobs.get(unquote(match[3]))
            if blob is None:
                return self.error(404, "EntryNotFound", f"{match[3]} does not exist on {revision}", head)
            if repo.gated_token and self.token() != repo.gated_token:
                status, why = (403, "not in the authorized list") if self.token() else (401, "Please log in.")
                return self.error(status, "GatedRepo", f"Access to model {repo.repo_id} is restricted: {why}", head)
            common = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
            if blob.sha256 is None:
                return self.body(blob, {**common, "ETag": f'"{blob.oid}"'}, head)
            location = f"{hub.cdn}/lfs/{blob.sha256}?filename={quote(blob.path.rsplit('/', 1)[-1])}"
            headers = {**common, "Location": location, "ETag": f'"{blob.oid}"'}
            headers |= {"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(blob.size)}
            return self.reply(302, headers, b"", head)

        def body(self, blob: Blob, headers: dict[str, str], head: bool) -> None:
            """The file's bytes (or a range of them), with the faults the test set for it."""
            size, start, end = blob.size, 0, blob.size - 1
            status = 200
            with hub.lock:
                short = hub.short.get(blob.path)
                stall = None if head else hub.stall_after.pop(blob.path, None)
                drop = None if head else hub.drop_after.pop(blob.path, None)
                corrupt = blob.path in hub.corrupt
            wanted = self.headers.get("Range")
            if wanted and short is None:
                match = re.fullmatch(r"bytes=(\d+)-(\d*)", wanted)
                if match is None or int(match[1]) >= size:
                    return self.reply(416, {"Content-Range": f"bytes */{size}"}, b"", head)
                start, end = int(match[1]), min(int(match[2] or size - 1), size - 1)
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end}/{size}"
            if short is not None:
                end = short - 1
            name = blob.path.rsplit("/", 1)[-1]
            headers |= {"Content-Type": "application/octet-stream", "Content-Length": str(end - start + 1)}
            headers["Content-Disposition"] = f"inline; filename*=UTF-8''{quote(name)}; filename=\"{name}\";"
            self.reply(status, headers, b"", head)
            if not head:
                try:
                    self.send_bytes(blob, start, end, stall, drop, corrupt)
                except OSError:  # the client went away (killed by the test)
                    self.close_connection = True

        def send_bytes(self, blob: Blob, start: int, end: int, stall: int | None, drop: int | None, corrupt: bool):
            limit = stall if stall is not None else drop
            flip = blob.size // 2 if corrupt else -1
            position = start
            with open(blob.source, "rb") as fh:
                fh.seek(start)
                while position <= end:
                    n = min(CHUNK, end - position + 1)
                    if limit is not None:
                        n = min(n, start + limit - position)
                    if n <= 0:
                        break
                    data = bytearray(fh.read(n))
                    if position <= flip < position + n:
                        data[flip - position] ^= 0xFF
                    self.wfile.write(data)
                    position += n
                    with hub.lock:
                        hub.sent[blob.path] = hub.sent.get(blob.path, 0) + n
            if limit is not None and position <= end:
                self.wfile.flush()
                if stall is not None:
                    hub.stalled.set()
                    hub.release.wait(STALL_S)
                self.close_connection = True
                self.connection.shutdown(2)

    return Handler


def tree(blobs: dict[str, Blob], prefix: str, recursive: bool) -> list[dict]:
    """The entries of ``list_repo_tree`` under ``prefix``: files and folders, folders first like the Hub."""
    base = f"{prefix.rstrip('/')}/" if prefix else ""
    folders: dict[str, None] = {}
    files = []
    for path, blob in blobs.items():
        if not path.startswith(base):
            continue
        parts = path[len(base) :].split("/")
        for depth in range(1, len(parts)):
            if depth == 1 or recursive:
                folders[base + "/".join(parts[:depth])] = None
        if len(parts) == 1 or recursive:
            files.append(blob.tree_entry())
    dirs = [{"type": "directory", "oid": git_blob_sha1(p.encode()), "size": 0, "path": p} for p in folders]
    return dirs + files


def folder_files(folder: Path, prefix: str = "") -> dict[str, Path]:
    """Repository path -> file for every file under ``folder`` (``prefix`` prepended)."""
    return {prefix + p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
