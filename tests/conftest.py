"""Shared helpers: the optional-dependency policy, the CLI runner, random params and the oracle report."""

from __future__ import annotations

import functools
import hashlib
import importlib
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

REPO = Path(__file__).resolve().parent.parent
ORACLE_REPORT = pytest.StashKey[dict]()
LOG_LINE = re.compile(r"^\d\d:\d\d:\d\d \S+ (DEBUG|INFO|WARNING) ")


def require_modules(*names: str) -> list:
    """Import and return ``names``; skip the test when one is missing — unless ``CI=true``, where it fails.

    The oracle tests need torch and transformers. A developer without them gets a skip; CI must never
    silently skip the oracle, so there a missing module is a failure.
    """
    missing = [name for name in names if importlib.util.find_spec(name) is None]
    if missing:
        message = f"{', '.join(missing)} not installed (pip install -e '.[test]')"
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI=true but {message}", pytrace=False)
        pytest.skip(message)
    return [importlib.import_module(name) for name in names]


def require_torch() -> tuple:
    """``(torch, transformers)``, with the skip/fail policy of :func:`require_modules`."""
    torch, transformers = require_modules("torch", "transformers")
    return torch, transformers


def run_cli(*args: str | Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run ``python -m gptoss ARGS`` in a subprocess (the real command line), capturing text output."""
    return subprocess.run(
        [sys.executable, "-m", "gptoss", *(str(a) for a in args)],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=timeout,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
    )


def error_lines(stderr: str) -> list[str]:
    """The stderr lines that are not log records (``HH:MM:SS name LEVEL message``)."""
    return [line for line in stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]


def assert_one_clean_error(proc, out_dir: Path, *names: str, command: str = "convert") -> str:
    """Non-zero exit, no traceback, exactly one non-log stderr line (the error), naming ``names``; nothing
    written under ``out_dir``."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr + proc.stdout
    lines = error_lines(proc.stderr)
    assert len(lines) == 1, proc.stderr
    (line,) = lines
    assert line.startswith(f"gptoss {command}: error: ")
    for name in names:
        assert name in line, f"{name!r} not in {line!r}"
    leftovers = sorted(p.name for p in out_dir.rglob("*")) if out_dir.exists() else []
    assert leftovers == [], f"left behind: {leftovers}"
    return line


def file_sha256(path: Path) -> str:
    """sha256 of a file with hashlib alone (independent of the hashing code under test)."""
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


@functools.cache
def _jitted(flags: tuple[tuple[str, bool], ...]):
    from flax import nnx

    return nnx.jit(lambda m, x: m(x, **dict(flags)))


def forward(model, ids, **flags: bool) -> dict[str, np.ndarray]:
    """``model(ids, **flags)`` compiled with ``nnx.jit`` (much faster than op by op on CPU), as NumPy arrays."""
    out = _jitted(tuple(sorted(flags.items())))(model, jnp.asarray(ids))
    return {name: np.asarray(value) for name, value in out.items()}


def random_params(specs: dict, seed: int = 0, std: float = 0.5) -> dict[str, np.ndarray]:
    """Random float32 params for ``gptoss.model.param_specs(cfg)``: scales near 1, other weights ~ N(0, std²/fan_in)."""
    rng = np.random.default_rng(seed)
    params = {}
    for name, spec in specs.items():
        shape = tuple(spec.shape)
        if name.endswith("scale"):
            value = 1.0 + 0.1 * rng.standard_normal(shape)
        elif len(shape) >= 2:
            value = std * rng.standard_normal(shape) / np.sqrt(shape[-2])
        else:
            value = std * rng.standard_normal(shape)
        params[name] = value.astype(np.float32)
    return params


@pytest.fixture(scope="session")
def oracle_report(request: pytest.FixtureRequest) -> dict:
    """case name → {quantity: max |diff|}; printed in the terminal summary."""
    return request.config.stash.setdefault(ORACLE_REPORT, {})


def pytest_terminal_summary(terminalreporter, exitstatus, config) -> None:
    report = config.stash.get(ORACLE_REPORT, None)
    if not report:
        return
    terminalreporter.section("oracle max |diff| vs transformers")
    for case, diffs in sorted(report.items()):
        cells = "  ".join(f"{k}={v:.2e}" for k, v in diffs.items())
        terminalreporter.write_line(f"{case:<22} {cells}")


def streamed(params_path: Path, config: Path | None = None):
    """The JAX model of a params file as the proof runs it (weights read per block)."""
    from gptoss.model.params import Params
    from gptoss.runtimes.jax_model import StreamedModel

    return StreamedModel(Params.open(params_path, config))


def opened(params_path: Path, texts=(), token_ids=(), length: int | None = None):
    """A params file opened, and prompts (text tokenized with its tokenizer, or token id lists) for it."""
    from gptoss.model.params import Params
    from gptoss.proof.prompts import prompt_inputs

    params = Params.open(params_path)
    return params, prompt_inputs(params, texts, token_ids, None, length)
