"""The package's import structure: the import-linter contracts of pyproject.toml (one-way layers, independent
applications, no cycles) hold, and they fail on an upward import, even one hidden inside a function; no module
imports another module's private names; the only function-level imports are the deferred optional extras (and
the command line's handlers, which import what they run)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "blip2"

# top-level packages a function may import: the optional extras (and where the serve extra is used)
DEFERRED = {"pyarrow", "fastapi", "starlette", "uvicorn", "matplotlib", "webdataset", "braceexpand", "gguf", "timm",
            "pycocoevalcap", "skimage", "torch.utils.tensorboard", "prometheus_client", "blip2.serve.app",
            "blip2.serve.schemas", "peft", "torchao", "accelerate", "bitsandbytes",
            "sklearn", "av", "spacy"}  # the `eval` extra; spaCy (OK-VQA lemmas) is optional and in no extra
# the command line builds its parser without torch; each handler imports what it runs (blip2/cli.py docstring)
CLI_DEFERRED = {"torch", "blip2"}


def _lint(config: Path, src: Path) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("lint-imports")
    if not exe.exists():
        exe = shutil.which("lint-imports")
    assert exe, "lint-imports not found: install the test extras (pip install -e '.[test]')"
    env = {**os.environ, "PYTHONPATH": str(src)}  # this tree's blip2, whatever is installed
    return subprocess.run([str(exe), str(config), "--no-cache"], capture_output=True, text=True, env=env,
                          cwd=config.parent, timeout=120)


def test_import_contracts_hold():
    r = _lint(ROOT / "pyproject.toml", SRC)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "7 kept, 0 broken" in r.stdout


@pytest.mark.parametrize("module, code, edge", [
    ("config.py", "from . import cli\n", "blip2.config -> blip2.cli"),
    # a function-level import is an edge too: deferring an import cannot hide it
    ("checkpoint.py", "def _build():\n    from .model import Blip2Model\n    return Blip2Model\n",
     "blip2.checkpoint -> blip2.model"),
    ("train/feature_cache.py", "def _amp():\n    from .loop import train\n    return train\n",
     "blip2.train.feature_cache -> blip2.train.loop"),
])
def test_contracts_catch_an_upward_import(tmp_path, module, code, edge):
    shutil.copytree(PACKAGE, tmp_path / "src" / "blip2", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    assert _lint(tmp_path / "pyproject.toml", tmp_path / "src").returncode == 0  # the copy is clean
    with (tmp_path / "src" / "blip2" / module).open("a") as f:
        f.write("\n\n" + code)
    r = _lint(tmp_path / "pyproject.toml", tmp_path / "src")
    assert r.returncode != 0
    assert "BROKEN" in r.stdout and edge in r.stdout, r.stdout


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(SRC).with_suffix("").parts)
        is_package = parts[-1] == "__init__"
        if is_package:
            parts = parts[:-1]
        yield path, ".".join(parts), is_package, ast.parse(path.read_text(), str(path))


def _target(node: ast.ImportFrom, name: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    base = name.split(".") if is_package else name.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def _private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


def test_no_private_name_crosses_a_module():
    found = []
    for path, name, is_package, tree in _modules():
        aliases = set()  # names bound to blip2 modules: `from . import dist`, `import blip2.x as y`
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                target = _target(node, name, is_package)
                if not target.startswith("blip2"):
                    continue
                for a in node.names:
                    if _private(a.name):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {target}.{a.name}")
                    elif (PACKAGE.parent / target.replace(".", "/") / f"{a.name}.py").exists():
                        aliases.add(a.asname or a.name)
            elif isinstance(node, ast.Import):
                aliases.update(a.asname for a in node.names if a.name.startswith("blip2") and a.asname)
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in aliases \
                    and _private(node.attr):
                found.append(f"{path.relative_to(ROOT)}:{node.lineno} reads {node.value.id}.{node.attr}")
    assert not found, "\n".join(found)


def test_function_level_imports_only_defer_optional_extras():
    found = []
    for path, name, is_package, tree in _modules():
        for fn in ast.walk(tree):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                if isinstance(node, ast.Import):
                    targets = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom):
                    target = _target(node, name, is_package)
                    targets = [f"{target}.{a.name}" if target.startswith("blip2") else target for a in node.names]
                else:
                    continue
                allowed = DEFERRED | CLI_DEFERRED if name == "blip2.cli" else DEFERRED
                for t in targets:
                    if not any(t == d or t.startswith(d + ".") for d in allowed):
                        found.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {t} inside {fn.name}()")
    assert not found, "\n".join(found)
