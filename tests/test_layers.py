"""The package's layers: each module imports only its own layer and those below it, and the light top-level
modules (gate, plots, promote) load no machine-learning runtime."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "gptoss"

# Lowest first. A module may import from its own layer and any layer below it, never from one above.
LAYERS = [
    {"gptoss", "gptoss.errors", "gptoss.files"},
    {"gptoss.config", "gptoss.stages"},
    {"gptoss.formats"},
    {"gptoss.model", "gptoss.resources"},
    {"gptoss.graphs"},
    {"gptoss.runtimes"},
    {"gptoss.proof"},
    {"gptoss.promote", "gptoss.plots"},
    {"gptoss.cli", "gptoss.__main__"},
]


def layer_of(module: str) -> int:
    """The layer of ``gptoss.x.y``: that of its longest prefix named in ``LAYERS``."""
    parts = module.split(".")
    for end in range(len(parts), 0, -1):
        prefix = ".".join(parts[:end])
        for rank, names in enumerate(LAYERS):
            if prefix in names:
                return rank
    raise AssertionError(f"{module} is in no layer: add it to LAYERS")


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Every gptoss module ``path`` imports, at the top or inside a function (``if TYPE_CHECKING`` excluded)."""
    tree = ast.parse(path.read_text())
    type_only = {
        id(node)
        for block in ast.walk(tree)
        if isinstance(block, ast.If) and ast.unparse(block.test) == "TYPE_CHECKING"
        for statement in block.body
        for node in ast.walk(statement)
    }
    found = set()
    for node in ast.walk(tree):
        if id(node) in type_only:
            continue
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names if alias.name.startswith("gptoss")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("gptoss"):
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=[module_name(p) for p in MODULES])
def test_no_module_imports_a_layer_above_its_own(path):
    source = module_name(path)
    upward = sorted(target for target in imported_modules(path) if layer_of(target) > layer_of(source))
    assert not upward, f"{source} (layer {layer_of(source)}) imports from a layer above: {upward}"


def test_layer_check_sees_an_upward_import(tmp_path):
    """The check itself: a formats module importing the proof is reported."""
    bad = tmp_path / "bad.py"
    bad.write_text("def f():\n    from gptoss.proof.gate import gate\n")
    assert layer_of("gptoss.formats.bad") < max(layer_of(t) for t in imported_modules(bad))


@pytest.mark.parametrize("module", ["gptoss.proof.gate", "gptoss.plots", "gptoss.promote"])
def test_light_modules_load_no_ml_runtime(module):
    heavy = ["jax", "flax", "onnxruntime", "onnxruntime_genai", "torch", "transformers"]
    code = f"import sys, {module}; print(' '.join(m for m in {heavy!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == [], f"importing {module} loads {loaded}"
