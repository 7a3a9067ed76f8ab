"""benchmarks/gpu_check.py: what runs without a GPU (the script's own checks on tiny models, on the CPU)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import gpu_check  # noqa: E402
from fixtures import one_torch_thread  # noqa: E402


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message of a machine without CUDA")
def test_exits_cleanly_without_cuda(capsys, tmp_path):
    assert gpu_check.main(["--json", str(tmp_path / "x.json")]) == 0
    assert "no CUDA device" in capsys.readouterr().out and not (tmp_path / "x.json").exists()


def test_tiny_checks_pass_on_cpu():
    with one_torch_thread():
        rows = gpu_check.check_parity("cpu", (torch.float32,), ("opt-tiny", "t5-tiny"))
        rows += gpu_check.check_training("cpu")
        rows += gpu_check.check_precision("cpu", torch.bfloat16)
    assert rows and all(r["ok"] for r in rows), gpu_check.table(rows)
    assert {r["check"] for r in rows} == {"parity", "stage-1 step", "stage-2 step", "precision"}
    assert gpu_check.table(rows).count("\n") == len(rows) + 1
