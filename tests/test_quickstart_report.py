"""The quickstart report: markdown tables and number formats from a hand-written report, the console summary,
the loss-curve and gallery pictures (read back with PIL) and the JSON round trip."""

from __future__ import annotations

import json
import math

import numpy as np
from PIL import Image

from blip2.quickstart.report import (GREEN, RED, markdown, plot_gallery, plot_losses, qa_line, summary_lines,
                                     write_report)


def _sample() -> dict:
    by_model = {"stage2": {"attribute_accuracy": 70.04, "exact_scene": 41.26, "cider": 0.8766, "bleu4": 0.31,
                           "n": 200},
                "instruct": {"attribute_accuracy": 85.0, "exact_scene": 60.0, "cider": 1.2, "bleu4": None, "n": 200}}
    return {
        "mode": "default", "output": "runs/quickstart", "finished": "2026-11-29T10:00:00",
        "world": {"train": 2000, "val": 100, "test": 200, "image_size": 64, "held_in": ["colour", "shape"],
                  "held_out": ["exist", "relation"]},
        "models": {"vision": "tiny ViT, 4 layers", "qformer_init": "random", "llm": "tiny OPT"},
        "retrieval": {"model": "stage1", "t2i_r1_scene": 71.24, "t2i_r1_exact": 40.06, "t2i_r5": 90.0,
                      "i2t_r1": None, "texts": 1000, "images": 200},
        "caption": {"model": "instruct", **by_model["instruct"], "by_model": by_model},
        "vqa": {"model": "instruct",
                "held_in": {"colour": 90.0, "shape": 88.0, "count": 80.0, "size": 95.0, "mean": 88.24},
                "held_out": {"exist": 70.0, "relation": 55.0, "compare": 60.0, "mean": 61.66},
                "stage2_zero_shot": {"held_in": {"colour": 50.0, "shape": 45.5, "count": 20.0, "size": 60.0,
                                                 "mean": 43.875},
                                     "held_out": {"exist": 51.0, "relation": None, "compare": 33.3, "mean": None}}},
        "ablations": {"no_itg": {"description": "Stage 1 without the generation loss.", "columns": ["full", "ablated"],
                                 "rows": {"t2i R@1 (scene)": [71.24, 60.0], "CIDEr": [1.2, 0.95]}}},
        "targets": [{"name": "held-out text->image R@1 (scene match)", "target": ">= 60%", "measured": 71.24,
                     "met": True},
                    {"name": "held-out VQA mean", "target": ">= 65%", "measured": 61.66, "met": False},
                    {"name": "caption CIDEr", "target": ">= 1.0", "measured": 1.2, "met": True}],
        "timings": {"world": 12.3, "stage0": 120.0, "stage1": None, "total": 1290.0},
        "files": {"loss_curves": "loss_curves.png", "gallery": "gallery.png"},
    }


def _row(md: str, first: str) -> list[str]:
    """The cells of the markdown table row whose first cell is `first`."""
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in\n{md}")


# ------------------------------------------------------------------------------------------------ markdown
def test_markdown_targets_met_and_missed():
    md = markdown(_sample())
    assert md.startswith("# ") and "default" in md.splitlines()[0]
    assert _row(md, "held-out text->image R@1 (scene match)") == ["held-out text->image R@1 (scene match)",
                                                                  ">= 60%", "71.2%", "met"]
    assert _row(md, "held-out VQA mean") == ["held-out VQA mean", ">= 65%", "61.7%", "**missed**"]
    # a target not stated in percent keeps its value as a score
    assert _row(md, "caption CIDEr") == ["caption CIDEr", ">= 1.0", "1.200", "met"]


def test_markdown_numbers_and_sections():
    md = markdown(_sample())
    for section in ("## Targets", "## Retrieval", "## Captioning", "## VQA", "## Ablations", "## Timings"):
        assert section in md
    assert md.index("## Targets") < md.index("## Retrieval")
    assert _row(md, "text->image R@1 (scene match)")[1] == "71.2"
    assert _row(md, "text->image R@1 (exact text)")[1] == "40.1"
    assert _row(md, "image->text R@1")[1] == "n/a"
    # one caption row per model: percentages to 1 decimal, CIDEr / BLEU to 3, None -> n/a
    assert _row(md, "stage2")[1:] == ["70.0", "41.3", "0.877", "0.310", "200"]
    assert _row(md, "instruct (reported)")[1:] == ["85.0", "60.0", "1.200", "n/a", "200"]
    # VQA: every family once with its split, instruct then stage-2 zero-shot
    assert _row(md, "colour")[1:] == ["held-in", "90.0", "50.0"]
    assert _row(md, "shape")[1:] == ["held-in", "88.0", "45.5"]
    assert _row(md, "size")[1:] == ["held-in", "95.0", "60.0"]
    assert _row(md, "relation")[1:] == ["held-out", "55.0", "n/a"]
    assert _row(md, "compare")[1:] == ["held-out", "60.0", "33.3"]
    assert "held-in mean: 88.2 (instruct) vs 43.9 (stage-2 zero-shot)" in md
    assert "held-out mean: 61.7 (instruct) vs n/a (stage-2 zero-shot)" in md
    # ablation: description, its columns, a percentage row and a score row
    assert "Stage 1 without the generation loss." in md
    assert "| metric | full | ablated |" in md
    assert _row(md, "t2i R@1 (scene)") == ["t2i R@1 (scene)", "71.2", "60.0"]
    assert _row(md, "CIDEr")[1:] == ["1.200", "0.950"]
    # timings: seconds and minutes (120 s = 2.0 min, 1290 s = 21.5 min), a step that did not run -> n/a
    assert _row(md, "stage0") == ["stage0", "120.0", "2.0"]
    assert _row(md, "stage1") == ["stage1", "n/a", "n/a"]
    assert _row(md, "**total**") == ["**total**", "1290.0", "21.5"]
    assert "![](loss_curves.png)" in md and "![](gallery.png)" in md
    assert "tiny OPT" in md and "2000 / 100 / 200" in md


def test_markdown_steps_that_did_not_run():
    report = _sample()
    report.update(retrieval=None, caption=None, vqa=None, ablations=None, files={})
    md = markdown(report)
    assert md.count("n/a") >= 4
    assert "![](" not in md


def test_summary_lines():
    lines = summary_lines(_sample())
    text = "\n".join(lines)
    assert "2/3" in lines[0]
    missed = [l for l in lines if "held-out VQA mean" in l]
    assert len(missed) == 1 and "MISSED" in missed[0] and "61.7%" in missed[0]
    assert "MISSED" not in next(l for l in lines if "caption CIDEr" in l)
    assert "21.5 min" in text  # 1290 s
    assert "runs/quickstart/report.md" in text


# ------------------------------------------------------------------------------------------------ pictures
def _write_metrics(path, rows):
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")


def test_plot_losses(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_metrics(a, [{"step": s, "loss": 5.0 / (s + 1), "itc_loss": 2.0 / (s + 1), "lr": 1e-4, "step_time": 0.1}
                       for s in range(20)])
    # a negative loss turns the log axis off; NaN is skipped
    _write_metrics(b, [{"step": s, "loss": 1.0 - 0.2 * s} for s in range(10)] + [{"step": 10, "loss": math.nan}])
    with open(b, "a") as f:
        f.write('{"step": 11, "lo')  # a line cut short by a stopped run
    png = tmp_path / "curves.png"
    plot_losses({"stage 1": a, "stage 2": b, "stage 3": tmp_path / "missing.jsonl"}, png)
    with Image.open(png) as im:
        px = np.asarray(im.convert("RGB"))
    assert px.shape[0] > 0 and px.shape[1] > 0
    assert len(np.unique(px.reshape(-1, 3), axis=0)) > 1
    # two runs with data -> two columns, a missing file leaves no empty panel: wider than tall
    assert px.shape[1] > px.shape[0]
    assert [p.name for p in tmp_path.iterdir() if p.suffix == ".tmp"] == []


def test_plot_losses_without_data_writes_nothing(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    png = tmp_path / "curves.png"
    plot_losses({"stage 0": tmp_path / "missing.jsonl", "stage 1": empty}, png)
    assert not png.exists()


def test_qa_line():
    assert qa_line({"question": "What colour is the circle?", "answer": "red", "truth": "red"}) == \
        ("What colour is the circle? -> red", GREEN)
    assert qa_line({"question": "How many squares?", "answer": "2", "truth": "3"}) == \
        ("How many squares? -> 2 (truth: 3)", RED)


def test_plot_gallery(tmp_path):
    colours = [(255, 0, 0), (255, 0, 0), (0, 0, 255)]
    items = []
    for i, c in enumerate(colours):
        p = tmp_path / f"img{i}.png"
        Image.new("RGB", (64, 64), c).save(p)
        items.append({"image": str(p), "title": f"scene {i}", "caption": "a large red circle left of a small blue "
                      "square on a grey background with nothing else in the picture",
                      "qa": [{"question": "Is there a square?", "answer": "yes", "truth": "yes"},
                             {"question": "How many circles?", "answer": "2", "truth": "1"}]})
    png = tmp_path / "gallery.png"
    plot_gallery(items, png, columns=4)
    with Image.open(png) as im:
        px = np.asarray(im.convert("RGB")).astype(int)
    red = (px[..., 0] > 240) & (px[..., 1] < 15) & (px[..., 2] < 15)
    blue = (px[..., 2] > 240) & (px[..., 0] < 15) & (px[..., 1] < 15)
    # each picture is shown at least at its own 64x64 size; the two red ones together exceed two such squares
    assert red.sum() >= 2 * 64 * 64
    assert blue.sum() >= 64 * 64
    # three tiles in one row of (up to) four columns: one row, so wider than tall
    assert px.shape[1] > px.shape[0]


# ------------------------------------------------------------------------------------------------- writing
def test_write_report_round_trip(tmp_path):
    report = _sample()
    js, md = write_report(report, tmp_path / "out")
    assert js == tmp_path / "out" / "report.json" and md == tmp_path / "out" / "report.md"
    assert json.loads(js.read_text()) == report
    assert js.read_text().startswith('{\n  "mode"')  # indent 2
    assert md.read_text() == markdown(report)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["report.json", "report.md"]


def test_write_report_nan_is_null(tmp_path):
    js, _ = write_report({"mode": "smoke", "retrieval": {"t2i_r1_scene": math.nan}}, tmp_path)
    assert json.loads(js.read_text())["retrieval"]["t2i_r1_scene"] is None
    assert "NaN" not in js.read_text()
