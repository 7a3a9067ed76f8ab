"""One resolver for what a user may name as a model (`blip2.checkpoint.find_checkpoint`): a transformers-format
directory, a `blip2 train` run directory (its exported model/) or a LAVIS .pth file. `blip2.load` and every
command that takes a model (caption, ask, instruct, info, eval, serve) accept the same forms through it."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

import blip2
from blip2.checkpoint import CheckpointError, find_checkpoint
from blip2.cli import main
from blip2.demo import build_demo_checkpoint


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run's layout: RUN/model is the exported transformers-format checkpoint."""
    run = tmp_path_factory.mktemp("resolver") / "run"
    build_demo_checkpoint(run)
    (run / "metrics.jsonl").write_text("")
    return run


@pytest.fixture(scope="module")
def image(run_dir):
    path = run_dir.parent / "red.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(path)
    return path


def test_forms(run_dir, tmp_path):
    assert find_checkpoint(run_dir / "model") == run_dir / "model"  # a checkpoint directory as is
    assert find_checkpoint(run_dir) == run_dir / "model"  # a run directory: its export
    assert find_checkpoint(str(tmp_path / "ckpt.pth")) == tmp_path / "ckpt.pth"  # LAVIS: read by the caller
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        find_checkpoint(tmp_path / "absent")
    with pytest.raises(CheckpointError, match=r"no config\.json.*run directory.*LAVIS \.pth"):
        find_checkpoint(tmp_path)
    stage0 = tmp_path / "stage0"
    (stage0 / "model").mkdir(parents=True)
    torch.save({}, stage0 / "model" / "vit.pth")
    with pytest.raises(CheckpointError, match="a stage-0 run"):
        find_checkpoint(stage0)


def test_load_and_info_take_a_run_directory(run_dir, capsys):
    a, b = blip2.load(run_dir), blip2.load(run_dir / "model")
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    for form in (run_dir, run_dir / "model"):
        assert main(["info", str(form), "--json"]) == 0
        info = json.loads(capsys.readouterr().out)
        assert info["architecture"] == "blip2" and info["parameters"]["total"] > 0


@pytest.mark.parametrize("args, key", [
    (["caption", "IMG"], "caption"),
    (["ask", "IMG", "what color is it?"], "answer"),
    (["instruct", "IMG", "Describe the picture."], "response"),
])
def test_generation_commands_take_a_run_directory(run_dir, image, capsys, args, key):
    argv = [str(image) if a == "IMG" else a for a in args]
    gen = ["--num-beams", "1", "--max-new-tokens", "2", "--json"]
    outs = []
    for form in (run_dir, run_dir / "model"):
        assert main(argv + ["--model", str(form)] + gen) == 0
        outs.append(json.loads(capsys.readouterr().out)[0][key])
    assert outs[0] == outs[1]


def test_eval_takes_a_run_directory(run_dir, image, tmp_path, capsys):
    data = tmp_path / "vqa.json"
    data.write_text(json.dumps([{"image": image.name, "question": "what color is it?", "answer": ["red"] * 10}]))
    assert main(["eval", "--task", "vqa", "--model", str(run_dir), "--data", str(data), "--images",
                 str(image.parent), "--output", str(tmp_path / "out"), "--max-new-tokens", "2", "--num-beams", "1",
                 "--no-progress", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["evaluated"] == 1 and "accuracy" in report["metrics"]


def test_serve_takes_a_run_directory(run_dir, monkeypatch):
    uvicorn = pytest.importorskip("uvicorn")
    pytest.importorskip("fastapi")
    served = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: served.update(app=app, **kw))
    assert main(["serve", "--model", str(run_dir), "--port", "8123"]) == 0
    assert served["port"] == 8123 and served["app"] is not None
