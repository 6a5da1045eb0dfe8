"""The evaluation half stands on its own floor: it imports no model code and no transformers/peft.

Each module below is imported in a fresh interpreter in which `transformers` and `peft` cannot be
imported (a `sys.meta_path` finder refuses them), and afterwards none of the engine modules may
be loaded. A fresh process per module, because in this one the fixtures have long imported
everything. Using torch tensors is fine: `Predictions` holds them.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import loraens

EVALUATION_MODULES = (
    "arrays", "predictions", "metrics", "uncertainty", "ood", "selective", "bootstrap", "ensemble_size",
    "methods", "plots", "pages", "tables", "report", "sweep_report", "runfolder", "conformal", "calibration",
)
BLOCKED_PACKAGES = ("transformers", "peft")
ENGINE_MODULES = tuple(f"loraens.{m}" for m in (
    "scoring", "ensemble", "diversity", "model", "train", "predict", "run", "checkpoint", "distributed", "laplace",
    "answer", "serve", "transfer", "fast", "fast.packing", "fast.prefix", "fast.head", "fast.attention",
    "fast.last_layer", "fast.compiling", "fast.support",
))

# Runs in the child: block the packages, import the module, print the engine modules it loaded.
_CHILD = """
import importlib.abc, json, sys

class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {blocked!r}:
            raise ImportError(f"{{name}} is blocked: the evaluation modules must not import it")
        return None

sys.meta_path.insert(0, Blocked())
import {module}
print(json.dumps(sorted(m for m in {engine!r} if m in sys.modules)))
"""


def _import_alone(module: str) -> subprocess.CompletedProcess:
    """Import `module` in a fresh interpreter with transformers and peft blocked."""
    src = str(Path(loraens.__file__).resolve().parent.parent)  # the loraens this test session imports
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    code = _CHILD.format(blocked=BLOCKED_PACKAGES, module=module, engine=ENGINE_MODULES)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.parametrize("name", EVALUATION_MODULES)
def test_evaluation_module_imports_no_engine(name: str) -> None:
    result = _import_alone(f"loraens.{name}")
    assert result.returncode == 0, f"loraens.{name} needs transformers or peft:\n{result.stderr[-2000:]}"
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded == [], f"importing loraens.{name} loads engine modules {loaded}"


def test_the_guard_catches_an_engine_module() -> None:
    # The canary: `loraens.run` loads the model code, so the same check must fail on it.
    result = _import_alone("loraens.run")
    assert result.returncode != 0 and "is blocked" in result.stderr


# ---------------------------------------------------------------- static rules for fast/ and config


def _loraens_imports(path: Path) -> set[str]:
    """The loraens modules `path` imports (anywhere in the file, lazy imports included), absolute."""
    import ast

    package = "loraens" + "".join(f".{p}" for p in path.parent.relative_to(SRC / "loraens").parts)
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            names = [f"{name}.{a.name}" if not node.module and node.level else name for a in node.names]
            found.update(n for n in names if n.startswith("loraens"))
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("loraens"))
    return found


SRC = Path(loraens.__file__).resolve().parent.parent


def test_fast_imports_only_config_batching_and_itself() -> None:
    allowed = {"loraens.config", "loraens.batching"}
    for path in sorted((SRC / "loraens" / "fast").glob("*.py")):
        bad = {m for m in _loraens_imports(path) if m not in allowed and not m.startswith("loraens.fast")}
        assert not bad, f"{path.name} imports {sorted(bad)}: loraens.fast serves the member forward only"


def test_config_imports_no_loraens_module() -> None:
    assert _loraens_imports(SRC / "loraens" / "config.py") == set()


def test_the_static_check_reads_relative_imports() -> None:
    assert {"loraens.batching", "loraens.fast.packing", "loraens.fast.support"} <= _loraens_imports(
        SRC / "loraens" / "fast" / "attention.py")
