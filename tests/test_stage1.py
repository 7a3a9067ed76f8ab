"""Stage-1 objective: one process vs two processes (gloo, torchrun), and the losses' behaviour."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

WORKER = Path(__file__).parent / "workers" / "stage1_equivalence.py"


def _run(out: Path, nproc: int, *extra: str) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if nproc == 1:
        cmd = [sys.executable, str(WORKER), str(out), *extra]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
               "--master_port", str(29500 + os.getpid() % 1000), str(WORKER), str(out), *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return torch.load(out)


@pytest.mark.parametrize("extra", [[], ["--image-ids"]], ids=["plain", "image-ids"])
def test_two_processes_equal_one(tmp_path, extra):
    one = _run(tmp_path / "one.pt", 1, *extra)
    two = _run(tmp_path / "two.pt", 2, *extra)
    assert set(one) == set(two)
    for k in ("itc_loss", "itm_loss", "itg_loss", "loss"):
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-5, msg=k)
    grads = [k for k in one if k.startswith("grad.")]
    assert any("crossattention" in k for k in grads) and "grad.temp" in grads and "grad.ln_vision.weight" in grads
    for k in grads:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-4, msg=k)
