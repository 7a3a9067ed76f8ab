"""`blip2 train` end to end: the tiny configs, exact resume after a kill, 2 processes, bad data, NaN steps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blip2.train.config import shipped_configs

CONFIGS = shipped_configs() / "tiny"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}


def _train(*args, check=True, **kw):
    r = subprocess.run([sys.executable, "-m", "blip2.cli", "train", *map(str, args)], capture_output=True,
                       text=True, env=ENV, timeout=600, **kw)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("name", ["stage1", "stage2-opt", "stage2-t5", "instruct-llama"])
def test_tiny_config_trains_and_exports(tmp_path, name):
    import blip2

    run = tmp_path / name
    _train(CONFIGS / f"{name}.yaml", f"output_dir={run}", "max_steps=4", "save_every=2")
    rows = _losses(run)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 4 and summary["skipped_samples"] == 0
    assert (run / "config.yaml").is_file() and (run / "loss.png").is_file()
    assert (run / "checkpoints" / "latest").is_file()
    assert any((run / "tensorboard").iterdir())
    model = blip2.load(run / "model")  # the exported transformers-format model
    img = run / "work" / "synthetic" / "images" / "00000.png"
    if name == "stage1":
        assert (run / "model_lavis.pth").is_file()
        caps = blip2.load(run / "model_lavis.pth", config=str(run / "model" / "config.json"))
        assert caps.qformer.lm_head is not None
    else:
        out = model.instruct([img], ["what color is the picture?"], max_new_tokens=3)
        assert len(out) == 1


def test_resume_after_kill_gives_the_same_losses(tmp_path):
    cfg = CONFIGS / "stage1.yaml"
    common = ["max_steps=60", "save_every=10", "optim.warmup_steps=3", "data.num_workers=0"]
    _train(cfg, f"output_dir={tmp_path / 'straight'}", *common)
    reference = _losses(tmp_path / "straight")

    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "blip2.cli", "train", str(cfg), f"output_dir={run}", *common],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = run / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.is_file() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert not (run / "summary.json").exists()
    r = _train(cfg, f"output_dir={run}", *common, "resume=true")
    assert "resumed from" in r.stdout
    resumed = _losses(run)
    assert [x["step"] for x in resumed] == list(range(1, 61))
    for a, b in zip(reference, resumed):
        for k in ("loss", "itc_loss", "itm_loss", "itg_loss", "lr"):
            assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-6), (a["step"], k)


def _torchrun(run, port, *extra):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           "-m", "blip2.cli", "train", str(CONFIGS / "stage2-opt.yaml"), f"output_dir={run}", "max_steps=3",
           "save_every=2", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]


def test_two_processes_ddp_and_fsdp(tmp_path):
    import blip2

    port = 29700 + os.getpid() % 200
    _torchrun(tmp_path / "ddp", port)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["samples"] == 3 * 8 * 2
    ddp = _losses(tmp_path / "ddp")
    assert [x["step"] for x in ddp] == [1, 2, 3]
    # the frozen LLM sharded across the two processes: the same losses, the same exported weights
    _torchrun(tmp_path / "fsdp", port + 1, "fsdp=true")
    for a, b in zip(ddp, _losses(tmp_path / "fsdp")):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
    a, b = blip2.load(tmp_path / "ddp" / "model"), blip2.load(tmp_path / "fsdp" / "model")
    for (n, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=n)


def test_bad_samples_are_skipped_and_counted(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    rows = []
    for i in range(10):
        Image.new("RGB", (32, 32), (20 * i, 100, 200)).save(tmp_path / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": f"picture number {i}"})
    (tmp_path / "img" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    rows += [{"image": "img/bad.png", "caption": "corrupt"}, {"image": "img/missing.png", "caption": "missing"}]
    ann = tmp_path / "train.json"
    ann.write_text(json.dumps(rows))
    run = tmp_path / "run"
    _train(CONFIGS / "stage2-opt.yaml", f"output_dir={run}", f"data.train={ann}", f"data.image_root={tmp_path}",
           "data.batch_size=4", "max_steps=3")
    assert json.loads((run / "summary.json").read_text())["skipped_samples"] == 2


def test_parquet_table_trains_and_bad_rows_are_counted(tmp_path):
    """data.train as a parquet file (image bytes + caption columns, blip2.sources): trains; a corrupt row is
    skipped and counted like a bad annotation entry."""
    import io

    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    from PIL import Image

    images, captions = [], []
    for i in range(9):
        buf = io.BytesIO()
        Image.new("RGB", (32, 32), (20 * i, 100, 200)).save(buf, format="PNG")
        images.append(buf.getvalue())
        captions.append(f"picture number {i}")
    images[4] = b"\x89PNG\r\n\x1a\nnot really"
    pq.write_table(pa.table({"png": images, "text": captions}), tmp_path / "train.parquet")
    from blip2.train.data import TableDataset

    sample = TableDataset(str(tmp_path / "train.parquet"), text_column="text")[3]
    assert sample["image"] == images[3] and sample["text"] == "picture number 3"
    run = tmp_path / "run"
    _train(CONFIGS / "stage2-opt.yaml", f"output_dir={run}", f"data.train={tmp_path / 'train.parquet'}",
           "data.text_column=text", "data.batch_size=9", "max_steps=1")
    assert json.loads((run / "summary.json").read_text())["skipped_samples"] == 1


def test_nan_losses_abort_with_a_clear_message(tmp_path):
    r = _train(CONFIGS / "stage1.yaml", f"output_dir={tmp_path}", "optim.lr=1e30", "optim.warmup_steps=0",
               "optim.clip_grad=null", "max_bad_steps=2", "max_steps=20", check=False)
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip() and "it/s" not in x]
    assert "steps in a row had a NaN/inf loss" in lines[-1]


def test_config_error_is_one_line(tmp_path):
    r = _train(CONFIGS / "stage1.yaml", "optim.lerning_rate=1", check=False)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "optim.lerning_rate" in r.stderr


@pytest.mark.parametrize("name,key", [("stage1", "mean"), ("stage2-opt", "CIDEr")])
def test_validation_during_training(tmp_path, name, key):
    run = tmp_path / name
    _train(CONFIGS / f"{name}.yaml", f"output_dir={run}", "max_steps=2", "val_every=2",
           "data.val=synthetic:colors", "val_max_samples=8")
    rows = [json.loads(x) for x in (run / "val.jsonl").read_text().splitlines()]
    assert rows[0]["step"] == 2 and key in rows[0]
