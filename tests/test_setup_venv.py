"""``scripts/setup.sh`` run a second time with another ``python3`` (once in a bare shell, later with pyenv or conda
first on PATH): its venv step recreates the venv for the new interpreter, and its import check fails the script
when an import fails. Both steps are ``scripts/venv.sh``, which setup.sh calls; here they run on a throwaway venv,
made without pip (with pip a venv takes seconds to make, and installing the project into it minutes)."""

from __future__ import annotations

import glob
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

PROBE = "import os, sys, venv; print(os.path.realpath(sys._base_executable), sys.version.split()[0])"
VENV_SH = REPO / "scripts" / "venv.sh"


def interpreters() -> dict[str, Path]:
    """``realpath version`` -> a python3 of this machine that has the venv module, one per binary; the one running
    the tests first."""
    home = Path.home() / ".pyenv" / "versions"
    candidates = [Path(sys._base_executable), *map(Path, sorted(glob.glob("/usr/bin/python3*")))]
    candidates += map(Path, sorted(glob.glob(f"{home}/3.*/bin/python3")))
    found: dict[str, Path] = {}
    for path in candidates:
        if re.fullmatch(r"python3(\.\d+)?", path.name) and path.exists():
            proc = subprocess.run([path, "-c", PROBE], capture_output=True, text=True, timeout=60)
            if proc.returncode == 0:
                found.setdefault(proc.stdout.strip(), path)
    return found


@pytest.fixture(scope="module")
def two_pythons() -> list[tuple[str, Path]]:
    """Two interpreters, of the same minor version if the machine has them (as 3.11.2 then 3.11.7)."""
    found = list(interpreters().items())
    if len(found) < 2:  # a developer's machine may have one; CI's has two (Debian's and pyenv's) and must use them
        if os.environ.get("CI") == "true":
            pytest.fail("CI=true but this machine has one python3: the interpreter switch goes untested", pytrace=False)
        pytest.skip("one python3 on this machine: nothing to switch to")
    first = found[0]
    minor = first[0].split()[1].rsplit(".", 1)[0]
    same = [item for item in found[1:] if item[0].split()[1].startswith(minor + ".")]
    return [first, (same or found[1:])[0]]


def ensure(python: Path, venv: Path, tmp_path: Path) -> subprocess.CompletedProcess:
    """``scripts/venv.sh ensure`` with ``python`` as the ``python3`` first on PATH."""
    bin_dir = tmp_path / f"bin-{python.parent.as_posix().replace('/', '_')}"
    bin_dir.mkdir(exist_ok=True)
    if not (bin_dir / "python3").exists():
        (bin_dir / "python3").symlink_to(python)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "HOME": str(tmp_path)}
    cmd = ["bash", str(VENV_SH), "ensure", str(venv), "--without-pip"]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)


def made_by(venv: Path) -> str:
    return subprocess.run([venv / "bin" / "python", "-c", PROBE], capture_output=True, text=True, timeout=60).stdout


def marker(venv: Path) -> Path:
    """A file in site-packages: stands for the packages installed for the interpreter that made the venv."""
    return next((venv / "lib").glob("python3*/site-packages")) / "installed_for_the_first.txt"


def test_setup_recreates_the_venv_when_another_python3_runs_it(two_pythons, tmp_path):
    (first_id, first), (second_id, second) = two_pythons
    venv = tmp_path / ".venv"
    proc = ensure(first, venv, tmp_path)
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert made_by(venv).strip() == first_id
    marker(venv).write_text("site-packages of the first python3\n")

    proc = ensure(first, venv, tmp_path)  # the same interpreter again: the venv and its packages stay
    assert proc.returncode == 0 and proc.stdout == "", proc.stderr
    assert marker(venv).exists()

    proc = ensure(second, venv, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        f"setup: {venv} was made by {first_id}, python3 is {second_id}: recreating {venv}"
    ]
    assert made_by(venv).strip() == second_id
    assert not marker(venv).exists(), "site-packages of the first interpreter kept"
    version = second_id.split()[1]
    assert f"version = {version}" in (venv / "pyvenv.cfg").read_text()


def test_setup_repairs_a_venv_the_former_setup_mixed(two_pythons, tmp_path):
    """The former setup.sh ran ``python3 -m venv .venv`` again: with another python3 that rewrites pyvenv.cfg and
    keeps the first interpreter's links and packages. The next setup run recreates it."""
    (_, first), (second_id, second) = two_pythons
    venv = tmp_path / ".venv"
    subprocess.run([first, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    subprocess.run([second, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    proc = ensure(second, venv, tmp_path)
    assert proc.returncode == 0, proc.stderr
    (line,) = proc.stdout.splitlines()
    assert line.startswith(f"setup: {venv} was made by ") and line.endswith(
        f"python3 is {second_id}: recreating {venv}"
    )
    assert made_by(venv).strip() == second_id


def test_setup_import_check_fails_the_script(tmp_path):
    """An environment that cannot import the project: exit 1, one line naming the venv and the error, no
    'installed into' line (the former setup.sh printed the error after 'installed into .venv:' and exited 0)."""
    venv = tmp_path / "empty"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=120)
    proc = subprocess.run(["bash", str(VENV_SH), "check", str(venv)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.splitlines() == [
        f"setup: {venv} cannot import the project: ModuleNotFoundError: No module named 'gptoss'"
    ]
    setup = (REPO / "scripts" / "setup.sh").read_text()
    assert setup.index("scripts/venv.sh ensure .venv") < setup.index("pip install") < setup.index("venv.sh check .venv")
    assert setup.splitlines()[-1] == "bash scripts/venv.sh check .venv" and "set -euo pipefail" in setup
