"""The package as a user installs it: the wheel built from this tree carries the run configs and the web page;
installed (not editable) in a fresh virtual environment, it runs `blip2 demo` and `blip2 quickstart --smoke`
from an unrelated directory, with nothing of the source tree on the path.

The fresh environment gets the already-installed dependencies through a .pth file naming this interpreter's
site-packages (no network); its own site-packages comes first on sys.path, so the installed wheel, not the
source tree (or an editable install), is what runs."""

from __future__ import annotations

import json
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(cmd, cwd, timeout, env=None):
    r = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{cmd}: exit {r.returncode}\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wheel")
    project = tmp / "project"  # a copy: building writes build/ and *.egg-info next to the sources
    project.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, project / name)
    shutil.copytree(ROOT / "src", project / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
          "-w", tmp / "dist", project], tmp, 300)
    wheel = next((tmp / "dist").glob("blip2-*.whl"))

    venv = tmp / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp, 120)
    python = venv / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], tmp, 300)
    purelib = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp, 60)
                   .stdout.strip())
    outer = [p for p in site.getsitepackages() + [sysconfig.get_paths()["purelib"]] if Path(p).is_dir()]
    (purelib / "outer_dependencies.pth").write_text("".join(f"{p}\n" for p in dict.fromkeys(outer)))

    elsewhere = tmp / "elsewhere"  # an unrelated working directory
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(OMP_NUM_THREADS="1", TQDM_DISABLE="1")
    return {"wheel": wheel, "venv": venv, "purelib": purelib, "cwd": elsewhere, "env": env}


def test_wheel_ships_configs_and_web_page(installed):
    names = set(zipfile.ZipFile(installed["wheel"]).namelist())
    shipped = {str(p.relative_to(ROOT / "src").as_posix()) for p in (ROOT / "src" / "blip2" / "configs").rglob("*.yaml")}
    assert shipped and shipped <= names
    assert "blip2/serve/static/index.html" in names
    assert not any(n.startswith(("tests/", "benchmarks/")) for n in names)


def test_installed_package_is_the_wheel(installed):
    code = ("import blip2, blip2.quickstart.run as q; print(blip2.__file__); print(q.config_dir()); "
            "print(sorted(p.name for p in q.config_dir().iterdir()))")
    out = _run([installed["venv"] / "bin" / "python", "-c", code], installed["cwd"], 120, installed["env"])
    module, configs, files = out.stdout.strip().splitlines()
    assert Path(module).is_relative_to(installed["purelib"]) and Path(configs).is_relative_to(installed["purelib"])
    assert files == str(["instruct.yaml", "stage0.yaml", "stage1.yaml", "stage2.yaml"])


def test_installed_demo(installed):
    out = _run([installed["venv"] / "bin" / "blip2", "demo", "--output", "demo"], installed["cwd"], 600,
               installed["env"])
    assert "identical to transformers' generate: True" in out.stdout


@pytest.mark.slow
def test_installed_quickstart_smoke(installed):
    _run([installed["venv"] / "bin" / "blip2", "quickstart", "--smoke", "--output", "qs", "--no-progress"],
         installed["cwd"], 1800, installed["env"])
    report = json.loads((installed["cwd"] / "qs" / "report.json").read_text())
    assert report["mode"] == "smoke" and report["steps"][-1] == "probes"
    assert (installed["cwd"] / "qs" / "configs" / "instruct.yaml").is_file()  # resolved from the shipped configs
