"""`blip2 --help` answers without importing torch or transformers: the package's names resolve lazily and the
command line's parser is built from torch-free modules (each handler imports what it runs)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src"
HEAVY = ("torch", "transformers", "PIL", "numpy")


def _python(code: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_building_the_parser_imports_no_torch():
    out = _python(
        "import json, sys, contextlib, io\n"
        "import blip2.cli\n"
        "p = blip2.cli.build_parser()\n"
        "commands = sorted(p._subparsers._group_actions[0].choices)\n"
        "for c in commands:\n"
        "    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "        blip2.cli.main([c, '--help'])\n"
        f"print(json.dumps([commands, [m for m in {HEAVY!r} if m in sys.modules]]))\n")
    commands, heavy = json.loads(out)
    assert {"caption", "ask", "instruct", "train", "eval", "serve", "quickstart", "demo"} <= set(commands)
    assert heavy == []


def test_the_public_names_resolve_on_use():
    out = _python(
        "import json, sys\n"
        "import blip2\n"
        "before = 'torch' in sys.modules\n"
        "listed = all(n in dir(blip2) for n in blip2.__all__)\n"
        "from blip2 import load, Blip2Config\n"
        "import blip2.api, blip2.config\n"
        "same = load is blip2.api.load and Blip2Config is blip2.config.Blip2Config\n"
        "try:\n"
        "    blip2.not_a_name\n"
        "    missing = None\n"
        "except AttributeError as e:\n"
        "    missing = str(e)\n"
        "print(json.dumps([before, listed, same, blip2.__version__, missing]))\n")
    before, listed, same, version, missing = json.loads(out)
    assert before is False and listed and same
    assert version == "0.1.0"
    assert "not_a_name" in missing
