"""The two dependency lists (pyproject.toml for pip, environment.yml for `snakemake --sdm conda`) name the same
packages with the same version bounds, so a rule never lacks under conda what it has in the venv."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
# conda-forge name -> PyPI name, where they differ
CONDA_TO_PYPI = {"msgpack-python": "msgpack", "matplotlib-base": "matplotlib", "pytorch": "torch"}
CONDA_ONLY = {"python", "pip", "setuptools"}


def _split(requirement: str) -> tuple[str, str]:
    name, bound = re.match(r"^([A-Za-z0-9_.-]+)\s*(.*)$", requirement).groups()
    return name.lower().replace("_", "-"), bound.replace(" ", "")


def test_environment_yml_lists_the_pyproject_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pip = dict(_split(r) for r in project["dependencies"] + project["optional-dependencies"]["reference"])
    env = yaml.safe_load((REPO / "environment.yml").read_text())["dependencies"]
    conda: dict[str, str] = {}
    for item in env:
        for requirement in item["pip"] if isinstance(item, dict) else [item]:
            name, bound = _split(requirement)
            if name not in CONDA_ONLY:
                conda[CONDA_TO_PYPI.get(name, name)] = bound
    assert conda == pip
