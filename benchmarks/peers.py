"""What every benchmark shares: measured processes, timings, verified builds, dated markdown and JSON.

A peer is a runtime measured beside ours, as a small adapter (:class:`Peer`): a name, what it loads, the
module-level function that measures it, the build steps that make what it loads (:class:`Build`), and which of
``MEASURES`` it reports. This module runs

* each measurement in a fresh Python interpreter (:func:`run_python`), so one peer's imports and memory never
  touch another's, and each build command as a process of its own (:func:`run_command`); both return the wall time
  and the peak RSS of that process;
* repeated calls (:func:`repeat`): warm-up calls, then N timed ones, reported as samples, median and min; and a
  KV-cache decoder's standard measurements (:func:`measure_decoder`) over a :class:`Decoder` adapter; one peer's
  results of several rounds pooled (:func:`pool`);
* builds (:func:`build`): time, peak RSS, exit status, log, and the sha256 of inputs (the command included) and
  outputs, recorded beside the log; with ``reuse`` a build already done counts only if its recorded input hash is
  the current inputs' and its recorded output hash is that of the outputs as they are now (:func:`verified`);
* markdown: every section opens with its date line, ``Measured YYYY-MM-DD on <cpu>, N threads`` (:func:`section`),
  tables by :func:`table`; JSON by :func:`write_outputs`.

Peak RSS is one number everywhere: the kernel's high-water mark of the measured process, ``ru_maxrss`` from
``os.wait4`` in a bare launcher interpreter (``LAUNCHER``) that spawns the process and waits for it. A process
started by exec keeps as the floor of its ``ru_maxrss`` the high-water mark of the process that spawned it, so the
benchmark's own interpreter would show through; the launcher's (about 10 MB) is below that of any Python process.

Only the standard library at import (numpy inside ``read_bandwidth_gbs``): the tests and the children import nothing
else through it.
"""

from __future__ import annotations

import abc
import dataclasses
import datetime
import hashlib
import inspect
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

GB = 1e9
MEASURES = ("load", "prefill", "decode", "tokens", "logits")  # the result keys: load_s, prefill, ... logits
DECODE_WARMUP = 2  # decode steps run before the timed ones, in the measured sequence (their tokens count too)
PROGRESS_S = 60  # a command running longer prints a progress line this often

# Run as ``python -S -c LAUNCHER RESULT CMD...``: spawn CMD, wait, write its exit status, wall time, peak RSS.
LAUNCHER = """
import json, os, sys, time
start = time.perf_counter()
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as fh:
    json.dump({"exit_status": os.waitstatus_to_exitcode(status), "wall_s": time.perf_counter() - start,
               "peak_rss_bytes": usage.ru_maxrss * 1024}, fh)
"""
# Run as ``python -c CHILD FILE FUNCTION SPEC OUT``: FUNCTION of FILE on the JSON at SPEC, its result to OUT.
CHILD = """
import importlib.util, json, sys
from pathlib import Path
path, name, spec_path, out_path = sys.argv[1:5]
sys.path.insert(0, str(Path(path).parent))
found = importlib.util.spec_from_file_location(Path(path).stem, path)
module = sys.modules[found.name] = importlib.util.module_from_spec(found)
found.loader.exec_module(module)
result = getattr(module, name)(json.loads(Path(spec_path).read_text()))
Path(out_path).write_text(json.dumps(result, indent=1) + "\\n")
"""


class PeerError(Exception):
    """A measured process or a build failed, or a peer did not report what it declares."""


# --- processes, measured -----------------------------------------------------------------------------------------


def run_command(
    cmd: Sequence[object],
    log: Path | None,
    env: dict | None = None,
    cwd: Path | None = None,
    check: bool = True,
    output: Path | None = None,
) -> dict:
    """Run ``cmd`` as a process of its own, its output to ``log`` (None: this terminal; with ``output``, its
    standard output to that file and only its standard error to ``log``): its exit status, wall time and peak RSS
    (see the module's docstring). With ``check``, a non-zero exit raises ``PeerError`` with the log's last
    lines."""
    cmd = [str(c) for c in cmd]
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
    shown = " ".join("'…'" if "\n" in word else word for word in cmd)  # code given with -c, elided
    print(f"  $ {shown}" + (f"\n    (log: {log})" if log else ""), flush=True)
    handle, name = tempfile.mkstemp(prefix="peers-", suffix=".json")
    os.close(handle)
    result_path = Path(name)
    out = open(log, "w") if log else None  # noqa: SIM115 (closed below, once the process has ended)
    stdout = open(output, "w") if output else out  # noqa: SIM115 (closed below too)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-S", "-c", LAUNCHER, name, *cmd],
            stdout=stdout, stderr=(out if output else subprocess.STDOUT) if out else None, env=env, cwd=cwd,
            start_new_session=True,
        )  # fmt: skip
        try:
            launcher_status = _wait(proc, log)
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)  # the launcher and the command it started
            proc.wait()
            raise
        text = result_path.read_text()
    finally:
        result_path.unlink(missing_ok=True)
        for handle in {out, stdout} - {None}:
            handle.close()
    if launcher_status or not text:
        raise PeerError(f"could not start {cmd[0]} (launcher exit {launcher_status})" + tail(log))
    measured = json.loads(text) | {"command": cmd, "log": str(log) if log else None}
    if check and measured["exit_status"]:
        what = log.stem if log else cmd[0]
        raise PeerError(f"{what} failed (exit {measured['exit_status']}) after {measured['wall_s']:.1f} s" + tail(log))
    print(f"    {measured['wall_s']:.1f} s, peak RSS {measured['peak_rss_bytes'] / GB:.3f} GB", flush=True)
    return measured


def _wait(proc: subprocess.Popen, log: Path | None) -> int:
    """``proc``'s exit status, a progress line every ``PROGRESS_S`` while it runs (with the log's last line)."""
    start = time.perf_counter()
    while True:
        try:
            return proc.wait(timeout=PROGRESS_S)
        except subprocess.TimeoutExpired:
            last = tail(log, 1).rpartition("\n")[2].strip() if log else ""
            print(f"    … {time.perf_counter() - start:.0f} s" + (f": {last[:100]}" if last else ""), flush=True)


def tail(log: Path | None, lines: int = 30) -> str:
    if log is None or not log.is_file():
        return ""
    return f"; last lines of {log}:\n" + "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def run_python(
    fn: Callable[[dict], dict], spec: dict, folder: Path, name: str, env: dict | None = None, python: str = ""
) -> dict:
    """``fn(spec)`` in a fresh Python interpreter (``python``, default this one; ``fn`` a module-level function of a
    file, which the child loads by path with that file's folder on ``sys.path``; ``spec`` and the result JSON):
    the result, with the child's ``wall_s``, ``peak_rss_bytes``, ``exit_status``, ``command`` and ``log`` added.
    Files in ``folder``, named ``name``."""
    source = inspect.getsourcefile(fn)
    if source is None or fn.__qualname__ != fn.__name__:
        raise PeerError(f"{fn!r}: not a module-level function of a source file")
    folder.mkdir(parents=True, exist_ok=True)
    spec_path, out_path = folder / f"{name}.spec.json", folder / f"{name}.json"
    out_path.unlink(missing_ok=True)
    spec_path.write_text(json.dumps(spec, indent=1) + "\n")
    cmd = [python or sys.executable, "-c", CHILD, Path(source).resolve(), fn.__name__, spec_path, out_path]
    measured = run_command(cmd, folder / f"{name}.log", env)
    return json.loads(out_path.read_text()) | measured


# --- timings -----------------------------------------------------------------------------------------------------


def summary(samples: Sequence[float]) -> dict:
    """Samples in seconds, their median and min."""
    return {"samples": list(samples), "median_s": statistics.median(samples), "min_s": min(samples)}


def seconds(fn: Callable[..., object], *args: object) -> float:
    """The wall time of one call ``fn(*args)``."""
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def repeat(fn: Callable[[], float], runs: int, warmup: int = 1) -> dict:
    """``warmup`` calls of ``fn`` not recorded, then ``runs`` recorded ones: ``summary`` of what each returns, the
    seconds of the part it times (``lambda: seconds(g, x)`` to time all of ``g(x)``)."""
    for _ in range(warmup):
        fn()
    return summary([fn() for _ in range(runs)])


def pool(rounds: Sequence[dict]) -> dict:
    """One peer's results of several rounds (each a fresh process) as one: the last round's result with the
    samples of every round together (``prefill`` per length and ``decode``: ``summary`` of them), the largest peak
    RSS, the median load time, whether every round chose the same greedy tokens, and the rounds as they were."""
    out = dict(rounds[-1])
    if all("prefill" in r for r in rounds):
        out["prefill"] = {n: summary([s for r in rounds for s in r["prefill"][n]["samples"]]) for n in out["prefill"]}
    if all("decode" in r for r in rounds):
        out["decode"] = summary([s for r in rounds for s in r["decode"]["samples"]])
    if all("load_s" in r for r in rounds):
        out["load_s"] = statistics.median(r["load_s"] for r in rounds)
    out["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in rounds)
    out["tokens_stable"] = len({tuple(r.get("tokens", ())) for r in rounds}) == 1
    return out | {"rounds": list(rounds)}


def read_bandwidth_gbs(size_bytes: int = 1 << 30) -> float:
    """Memory read bandwidth, GB/s: best of 5 sums over a 1 GiB array."""
    import numpy as np

    data = np.ones(size_bytes // 8, dtype=np.float64)
    return size_bytes / min(seconds(data.sum) for _ in range(5)) / GB


def _proc_status(key: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def thread_count() -> int:
    """This process's threads now (Linux ``/proc``; 0 elsewhere)."""
    try:
        return len(os.listdir("/proc/self/task"))
    except OSError:
        return 0


# --- peers -------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Build:
    """A command that makes a peer's artifact: what it reads (``inputs``), what it writes (``outputs``, removed
    before it runs), how tables call it (``label``)."""

    name: str
    command: tuple[str, ...]  # its words as given; str() of each kept
    inputs: tuple[Path, ...]
    outputs: tuple[Path, ...]
    label: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "command", tuple(map(str, self.command)))


@dataclasses.dataclass(frozen=True)
class Peer:
    """A runtime measured beside ours. ``measure(spec)`` runs in a fresh interpreter (:func:`measure`) on the
    request's fields plus ``path`` (the artifact) and ``options``, and returns a dict with a key per measure it
    declares: ``load_s``; ``prefill`` ({prompt length: ``summary``}); ``decode`` (``summary`` of s/token);
    ``tokens`` (the greedy tokens); ``logits`` (the file ``spec["logits_file"]``, where it saved with numpy the
    logits of the whole prompt's last position). ``python``: the interpreter to run it in (default this one)."""

    name: str
    label: str
    artifact: Path
    measure: Callable[[dict], dict]
    builds: tuple[Build, ...] = ()
    measures: tuple[str, ...] = ("load", "prefill", "decode", "tokens")
    options: dict = dataclasses.field(default_factory=dict)
    python: str = ""


@dataclasses.dataclass(frozen=True)
class Request:
    """What every peer of one comparison measures: the prompt (ids), the prompt lengths to prefill (default: the
    whole prompt), the decode steps timed, the repetitions of each prefill, the threads, the ids never chosen."""

    prompt: list[int]
    steps: int
    runs: int
    threads: int
    suppress: list[int] = dataclasses.field(default_factory=list)
    prefill_lengths: tuple[int, ...] = ()

    def spec(self) -> dict:
        return dataclasses.asdict(self) | {"prefill_lengths": list(self.prefill_lengths or (len(self.prompt),))}


def measure(peer: Peer, request: Request, folder: Path, env: dict | None = None) -> dict:
    """``peer.measure`` on ``request`` in a fresh interpreter: its result and the process's numbers."""
    if unknown := sorted(set(peer.measures) - set(MEASURES)):
        raise PeerError(f"{peer.name} declares {unknown}, which are not among {MEASURES}")
    spec = request.spec() | {"path": str(peer.artifact), "options": peer.options}
    if "logits" in peer.measures:
        spec["logits_file"] = str(folder / f"{peer.name}.logits.npy")
    result = run_python(peer.measure, spec, folder, peer.name, env, peer.python)
    missing = [m for m in peer.measures if ("load_s" if m == "load" else m) not in result]
    if missing:
        raise PeerError(f"{peer.name} declares {missing} but its result has none (see {result['log']})")
    return result


class Decoder(abc.ABC):
    """A KV-cache decoder as one runtime runs it, for :func:`measure_decoder`: load it, start a sequence from a
    prompt, extend it by one greedy token."""

    @abc.abstractmethod
    def load(self, spec: dict) -> None:
        """Load ``spec["path"]`` with ``spec["threads"]`` threads."""

    @abc.abstractmethod
    def prefill(self, ids: list[int]) -> float:
        """A fresh sequence: the model run on ``ids``, then the first greedy token chosen; returns the seconds of
        that run alone."""

    @abc.abstractmethod
    def step(self) -> None:
        """The model run on the last token, the next greedy token chosen."""

    @abc.abstractmethod
    def tokens(self) -> list[int]:
        """The greedy tokens of the sequence so far, after its prompt."""

    def logits(self) -> Sequence[float]:
        """The logits the last prefill gave at its prompt's last position (for a peer that declares ``logits``)."""
        raise NotImplementedError(f"{type(self).__name__} gives no logits")


def measure_decoder(decoder: Decoder, spec: dict) -> dict:
    """A decoder's measurements: load time; per prompt length, the prefill's ``summary`` over ``runs`` fresh
    sequences after one warm-up; then on one more sequence of the whole prompt (its last position's logits saved
    to ``spec["logits_file"]`` if the spec names one) ``DECODE_WARMUP`` steps and ``steps`` timed ones (s/token),
    and that sequence's greedy tokens; RSS and threads before and after load."""
    out: dict = {"rss_before_load_bytes": _proc_status("VmRSS"), "threads_before_load": thread_count()}
    out["load_s"] = seconds(decoder.load, spec)
    out["threads_after_load"] = thread_count()
    prompt = spec["prompt"]
    out["prefill"] = {
        str(n): repeat(lambda n=n: decoder.prefill(prompt[:n]), spec["runs"]) for n in spec["prefill_lengths"]
    }
    decoder.prefill(prompt)
    if spec.get("logits_file"):
        import numpy as np

        np.save(spec["logits_file"], np.asarray(decoder.logits(), dtype=np.float32))
        out["logits"] = spec["logits_file"]
    out["decode"] = repeat(lambda: seconds(decoder.step), spec["steps"], warmup=DECODE_WARMUP)
    out["tokens"] = decoder.tokens()
    return out


# --- builds ------------------------------------------------------------------------------------------------------


def tree_sha256(paths: Sequence[Path], *words: str) -> str:
    """sha256 over ``words`` and every file under ``paths`` (each path's files by their path relative to it, in
    order, with their sizes and contents)."""
    digest = hashlib.sha256()
    for word in words:
        digest.update(f"word {word}\n".encode())
    for i, root in enumerate(paths):
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        for file in files:
            digest.update(f"file {i} {file.relative_to(root).as_posix()} {file.stat().st_size}\n".encode())
            with open(file, "rb") as fh:
                while block := fh.read(1 << 24):
                    digest.update(block)
    return digest.hexdigest()


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    elif path.exists():
        path.unlink()


def verified(step: Build, folder: Path, inputs: str = "") -> dict | None:
    """The record ``folder/<name>.json`` of ``step`` if it was built with the inputs it has now (``inputs``: their
    ``tree_sha256`` if known) and its outputs are as they were built (sha256 of both), with ``reused``; else None,
    and why printed."""
    record_path = folder / f"{step.name}.json"
    if not (record_path.is_file() and all(p.exists() for p in step.outputs)):
        why = "not built yet" if not record_path.is_file() else "its outputs are missing"
        print(f"  build {step.name}: {why}", flush=True)
        return None
    print(f"  build {step.name}: hashing its inputs", flush=True)
    record = json.loads(record_path.read_text())
    if record.get("input_sha256") != (inputs or tree_sha256(step.inputs, *step.command)):
        print(f"    not reused: the inputs' sha256 is not the recorded one ({record_path})", flush=True)
    elif record.get("output_sha256") != tree_sha256(step.outputs):
        print("    not reused: the outputs changed since they were built", flush=True)
    else:
        print(f"    reused, verified by hash: {', '.join(map(str, step.outputs))}", flush=True)
        return record | {"reused": True}
    return None


def build(step: Build, folder: Path, reuse: bool, env: dict | None = None) -> dict:
    """Run ``step`` (log and record ``folder/<name>.log``, ``.json``), or with ``reuse`` take its outputs as they
    are if the record's input hash is the current inputs' and its output hash theirs (:func:`verified`): the
    record, with ``reused``."""
    record_path = folder / f"{step.name}.json"
    inputs = tree_sha256(step.inputs, *step.command)
    if reuse and (record := verified(step, folder, inputs)) is not None:
        return record
    for path in step.outputs:
        remove(path)
    record_path.unlink(missing_ok=True)
    record = run_command(step.command, folder / f"{step.name}.log", env)
    missing = [str(p) for p in step.outputs if not p.exists()]
    if missing:
        raise PeerError(f"{step.name} wrote no {', '.join(missing)}" + tail(folder / f"{step.name}.log"))
    record |= {"label": step.label, "input_sha256": inputs, "output_sha256": tree_sha256(step.outputs)}
    record_path.write_text(json.dumps(record, indent=1) + "\n")
    return record | {"reused": False}


# --- markdown and JSON -------------------------------------------------------------------------------------------


def cpu_name() -> str:
    """The CPU's model name and this machine's core count."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} cores)"


def machine() -> dict:
    """Where and when: date, CPU, cores, architecture (for the JSON beside a section)."""
    return {"date": str(datetime.date.today()), "cpu": cpu_name(), "cores": os.cpu_count(), "arch": platform.machine()}


def date_line(threads: int, date: str | None = None) -> str:
    return f"Measured {date or datetime.date.today()} on {cpu_name()}, {threads} threads"


def section(title: str, threads: int, details: str, *blocks: str) -> str:
    """A markdown section: its title, the date line (with ``details`` after it), then the blocks."""
    head = date_line(threads) + (f"; {details}" if details else ".")
    return "\n\n".join([f"## {title}", head, *blocks]) + "\n"


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A markdown table."""
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join("| " + " | ".join(str(cell) for cell in line) + " |" for line in lines)


def write_outputs(
    markdown: str, markdown_path: Path, report: dict | None = None, json_path: Path | None = None, append: bool = False
) -> None:
    """The section to ``markdown_path`` (replacing it, or appended) and the report to ``json_path``; the section
    printed, and where they went."""
    markdown_path.parent.mkdir(parents=True, exist_ok=True)
    with open(markdown_path, "a" if append else "w") as fh:
        fh.write(markdown)
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(report, indent=1) + "\n")
    print("\n" + markdown + f"\nwrote {markdown_path}" + (f" and {json_path}" if json_path else ""))
