"""The quickstart report: markdown tables and number formats from a hand-written report, the console summary,
the loss-curve, validation-curve and gallery pictures (read back with PIL), the JSON round trip; the bootstrap
intervals against hand computations and the report's numbers (summary.py) from hand-written scores."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image

from blip2.quickstart import summary as S
from blip2.quickstart.report import (GREEN, RED, markdown, plot_gallery, plot_losses, plot_validation, qa_line,
                                     summary_lines, write_report)
from blip2.quickstart.stats import bootstrap_ci, paired_bootstrap_diff, verdict


def _sample() -> dict:
    by_model = {"stage2": {"attribute_accuracy": 70.04, "exact_scene": 41.26, "cider": 0.8766, "bleu4": 0.31,
                           "n": 200},
                "instruct": {"attribute_accuracy": 85.0, "exact_scene": 60.0, "cider": 1.2, "bleu4": None, "n": 200,
                             "top_caption_share": 3.5, "ci": {"attribute_accuracy": [80.1, 89.9]}}}
    return {
        "mode": "default", "output": "runs/quickstart", "finished": "2026-11-29T10:00:00",
        "world": {"train": 2000, "val": 100, "test": 200, "image_size": 64, "held_in": ["colour", "shape"],
                  "held_out": ["exist", "relation"]},
        "models": {"vision": "tiny ViT, 4 layers", "qformer_init": "random", "llm": "tiny OPT"},
        "retrieval": {"model": "stage1", "t2i_r1_scene": 71.24, "t2i_r1_exact": 40.06, "t2i_r5": 90.0,
                      "i2t_r1": None, "texts": 1000, "images": 200},
        "caption": {"model": "instruct", **by_model["instruct"], "by_model": by_model},
        "probes": {"labels": ["colours"], "n_train": 3000, "n_test": 200, "chance": {"colours": 10.0},
                   "rows": {"frozen encoder": {"colours": 91.5}, "final queries": {"colours": 64.0}}, "seconds": 3.0},
        "vqa": {"model": "instruct",
                "held_in": {"colour": 90.0, "shape": 88.0, "count": 80.0, "size": 95.0, "mean": 88.24},
                "held_out": {"exist": 70.0, "relation": 55.0, "compare": 60.0, "mean": 61.66,
                             "ci": {"exist": [58.3, 81.7], "mean": [55.0, 68.1]}, "n": {"exist": 60}},
                "gain_over_stage2": {"exist": 19.0, "relation": None, "compare": 26.7, "mean": None,
                                     "ci": {"exist": [4.5, 33.0]}},
                "chance": {"exist": 50.0, "compare": 50.0, "relation": 41.7},
                "stage2_zero_shot": {"held_in": {"colour": 50.0, "shape": 45.5, "count": 20.0, "size": 60.0,
                                                 "mean": 43.875},
                                     "held_out": {"exist": 51.0, "relation": None, "compare": 33.3, "mean": None}}},
        "ablations": {"run": True, "seconds": 330.0,
                      "timings": {"stage2-no-stage1": 300.0, "eval-stage2-no-stage1": 30.0},
                      "studies": {"no_itg": {
                          "description": "Stage 1 without the generation loss.", "columns": ["full", "ablated"],
                          "difference": "full minus ablated",
                          "rows": {"t2i R@1 (scene)": [71.24, 60.0], "CIDEr": [1.2, 0.95]},
                          "paired": {"t2i R@1 (scene)": {"diff": 11.24, "ci": [3.1, 19.9], "verdict": "differs"},
                                     "CIDEr": {"diff": 0.25, "ci": None, "verdict": None}}}}},
        "targets": [{"name": "held-out text->image R@1 (scene match)", "target": ">= 60%", "measured": 71.24,
                     "met": True},
                    {"name": "held-out VQA mean", "target": ">= 65%", "measured": 61.66, "met": False},
                    {"name": "caption CIDEr", "target": ">= 1.0", "measured": 1.2, "met": True}],
        "timings": {"world": 12.3, "stage0": 120.0, "stage1": None, "total": 1290.0},
        "timings_detail": {"world": {"group": "main", "seconds": 12.3, "share": 0.95},
                           "stage0": {"group": "main", "seconds": 120.0, "share": 9.3, "optimizer_steps": 200,
                                      "batch_size": 64, "samples": 12800, "s_per_step": 0.5, "optimizer_s": 100.0,
                                      "overhead_s": 20.0}},
        "machine": {"matmul_gflops": 80.5, "torch_threads": 2, "cpu_count": 2},
        "validation": {"stage 2": [{"step": 20, "CIDEr": 0.5}, {"step": 40, "CIDEr": 0.75}]},
        "files": {"loss_curves": "loss_curves.png", "val_curves": "val_curves.png", "gallery": "gallery.png"},
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
    for section in ("## Targets", "## Retrieval", "## Captioning", "## VQA", "## Linear probes (held-out scenes)",
                    "## Ablations", "## Timings"):
        assert section in md
    assert md.index("## Targets") < md.index("## Retrieval")
    assert _row(md, "text->image R@1 (scene match)")[1] == "71.2"
    assert _row(md, "text->image R@1 (exact text)")[1] == "40.1"
    assert _row(md, "image->text R@1")[1] == "n/a"
    # one caption row per model: percentages to 1 decimal (with their interval), CIDEr / BLEU to 3, None -> n/a
    assert _row(md, "stage2")[1:] == ["70.0", "41.3", "0.877", "0.310", "200", "n/a"]
    assert _row(md, "instruct (reported)")[1:] == ["85.0 [80.1, 89.9]", "60.0", "1.200", "n/a", "200", "3.5"]
    # VQA: every family once with its split, instruct then stage-2 zero-shot, the gain and chance (held-out)
    assert _row(md, "colour")[1:] == ["held-in", "90.0", "50.0", "", ""]
    assert _row(md, "shape")[1:] == ["held-in", "88.0", "45.5", "", ""]
    assert _row(md, "size")[1:] == ["held-in", "95.0", "60.0", "", ""]
    assert _row(md, "exist")[1:] == ["held-out", "70.0 [58.3, 81.7]", "51.0", "19.0 [4.5, 33.0]", "50.0"]
    assert _row(md, "relation")[1:] == ["held-out", "55.0", "n/a", "n/a", "41.7"]
    assert _row(md, "compare")[1:] == ["held-out", "60.0", "33.3", "26.7", "50.0"]
    assert "held-in mean: 88.2 (instruct) vs 43.9 (stage-2 zero-shot)" in md
    assert "held-out mean: 61.7 [55.0, 68.1] (instruct) vs n/a (stage-2 zero-shot)" in md
    # probes: probe_table's lines
    assert _row(md, "frozen encoder") == ["frozen encoder", "91.5"]
    assert "3000 training scenes" in md and "200 held-out scenes" in md
    # ablation: description, its columns, the paired difference with its interval and verdict
    assert "Stage 1 without the generation loss." in md
    assert "| metric | full | ablated | difference (full minus ablated) | verdict (95 % paired bootstrap) |" in md
    assert _row(md, "t2i R@1 (scene)") == ["t2i R@1 (scene)", "71.2", "60.0", "11.2 [3.1, 19.9]", "differs"]
    assert _row(md, "CIDEr")[1:] == ["1.200", "0.950", "0.250", "no per-item scores"]
    assert "5.5 min, not counted in the main pipeline's time" in md  # 330 s of ablation steps
    # timings: seconds, minutes and share (120 s = 2.0 min), a step that did not run -> n/a; the ablation steps
    # in their own table; each training's optimizer steps, batch, samples and seconds per step
    assert _row(md, "stage0") == ["stage0", "120.0", "2.0", "9.3"]
    assert _row(md, "stage1") == ["stage1", "n/a", "n/a", "n/a"]
    assert _row(md, "**total**") == ["**total**", "1290.0", "21.5", "100.0"]
    assert _row(md, "stage2-no-stage1") == ["stage2-no-stage1", "300.0", "5.0", "90.9"]
    assert _row(md, "**ablations**") == ["**ablations**", "330.0", "5.5", "100.0"]
    assert "| stage0 | 200 | 64 | 12800 | 0.500 | 100.0 | 20.0 |" in md
    # the machine next to the wall time
    assert "Main pipeline: 21.5 min of steps; machine: 80.5 GFLOP/s fp32 matmul, 2 torch threads, 2 CPUs." in md
    assert "- stage 2: 2 validations, last (step 40): CIDEr 0.750" in md
    for png in ("loss_curves.png", "val_curves.png", "gallery.png"):
        assert f"![]({png})" in md
    assert "tiny OPT" in md and "2000 / 100 / 200" in md


def test_markdown_steps_that_did_not_run():
    report = _sample()
    report.update(retrieval=None, caption=None, vqa=None, ablations=None, probes=None, files={})
    md = markdown(report)
    assert md.count("n/a") >= 4
    assert "![](" not in md


def test_markdown_answer_probes_beside_the_model_answers():
    report = _sample()
    report["probes"]["answers"] = {"max_train": 1500, "seconds": 9.0, "families": {
        "colour": {"probe": 64.0, "majority": 10.3, "n_train": 1500, "n_test": 60},
        "count": {"probe": 72.25, "majority": 36.5, "n_train": 1500, "n_test": 60}}}
    md = markdown(report)
    section = md[md.index("Answer probes"):md.index("## Ablations")]
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in section.splitlines() if line.startswith("| ")]
    assert rows[0] == ["family", "probe on the queries given the question", "the model's answers", "majority answer",
                       "questions"]
    # the model's column is the VQA table's held-in accuracy of that family
    assert rows[1:] == [["colour", "64.0", "90.0", "10.3", "60"], ["count", "72.2", "80.0", "36.5", "60"]]
    assert "up to 1500 training questions" in section
    del report["probes"]["answers"]  # a report of a run before answer probes: the scene probes only
    assert "Answer probes" not in markdown(report)


def test_markdown_ablations_not_run():
    report = _sample()
    note = "not run; `blip2 quickstart --ablations` runs them, reusing the finished main steps (step cache)"
    report["ablations"] = {"run": False, "seconds": None, "timings": {}, "studies": {}, "note": note}
    md = markdown(report)
    section = md[md.index("## Ablations"):md.index("## Timings")]
    assert "`blip2 quickstart --ablations`" in section and "###" not in section
    assert "**ablations**" not in md
    assert any("blip2 quickstart --ablations" in line for line in summary_lines(report))


def test_summary_lines():
    lines = summary_lines(_sample())
    text = "\n".join(lines)
    assert "2/3" in lines[0]
    missed = [l for l in lines if "held-out VQA mean" in l]
    assert len(missed) == 1 and "MISSED" in missed[0] and "61.7%" in missed[0]
    assert "MISSED" not in next(l for l in lines if "caption CIDEr" in l)
    assert "21.5 min" in text  # 1290 s
    assert "ablations: 5.5 min more" in text
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


def test_plot_validation(tmp_path):
    png = tmp_path / "val.png"
    rows = [{"step": 20, "CIDEr": 0.5, "BLEU-4": 0.1}, {"step": 40, "CIDEr": 0.75, "BLEU-4": math.nan}]
    assert plot_validation({"stage 2": rows, "instruction tuning": [{"step": 10, "accuracy": 30.0}],
                            "stage 1": []}, png)
    with Image.open(png) as im:
        px = np.asarray(im.convert("RGB"))
    assert px.shape[1] > px.shape[0] and len(np.unique(px.reshape(-1, 3), axis=0)) > 1  # two panels side by side
    empty = tmp_path / "none.png"
    assert not plot_validation({"stage 2": [{"step": 5}]}, empty) and not empty.exists()


# --------------------------------------------------------------------------------------------- intervals
def test_bootstrap_ci_constant_is_zero_width():
    for v in (0.0, 1.0, 0.7):
        mean, lo, hi = bootstrap_ci([v] * 37)
        assert mean == pytest.approx(100 * v) and lo == pytest.approx(100 * v) and hi == pytest.approx(100 * v)


def test_bootstrap_ci_of_a_coin_matches_the_normal_approximation():
    n = 400
    mean, lo, hi = bootstrap_ci([0, 1] * (n // 2))
    normal = 2 * 1.96 * math.sqrt(0.25 / n) * 100  # the width of the normal-approximation 95 % interval: 9.8
    assert mean == 50.0 and lo < 50 < hi
    assert abs((hi - lo) - normal) <= 0.2 * normal
    assert abs((50 - lo) - (hi - 50)) <= 0.2 * normal  # about symmetric
    assert bootstrap_ci([0, 1] * (n // 2)) == (mean, lo, hi)  # seeded: the same interval every time
    # a wider level gives a wider interval
    _, lo99, hi99 = bootstrap_ci([0, 1] * (n // 2), level=0.99)
    assert lo99 <= lo and hi99 >= hi


def test_bootstrap_ci_strata_mean_of_means():
    # stratum a: 3 right of 3, stratum b: 0 of 1 -> mean of the means 50, not the pooled 75; constant strata
    # resample to the same means, so the interval has no width
    assert bootstrap_ci([1, 1, 1, 0], strata=["a", "a", "a", "b"]) == (50.0, 50.0, 50.0)
    with pytest.raises(ValueError):
        bootstrap_ci([1, 0], strata=["a"])
    with pytest.raises(ValueError):
        bootstrap_ci([])


def test_paired_bootstrap_diff():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 2, 100).astype(float)
    assert paired_bootstrap_diff(a, a) == (0.0, 0.0, 0.0)
    # b is a with 20 wrong answers turned right: +20 points, every resample >= 0
    b = a.copy()
    b[np.flatnonzero(a == 0)[:20]] = 1
    d, lo, hi = paired_bootstrap_diff(b, a)
    assert d == pytest.approx(20.0) and 0 < lo < 20 < hi and verdict(lo, hi) == "differs"
    assert verdict(-3.0, 4.0) == "no significant difference" and verdict(-5.0, -1.0) == "differs"
    with pytest.raises(ValueError):
        paired_bootstrap_diff([1, 0], [1])


# ----------------------------------------------------------------------------------------- the numbers
def _scores(right: dict[str, tuple[int, int]]) -> dict[str, dict[int, float]]:
    """{family: {question_id: score}} with `right[f][0]` right answers out of `right[f][1]` questions (the same
    question ids for a family in every call: two models answering the same questions)."""
    return {f: {1000 * len(f) + i: float(i < k) for i in range(n)} for f, (k, n) in right.items()}


def test_vqa_summary_and_gain():
    mine = _scores({"colour": (9, 10), "shape": (10, 10), "count": (5, 10), "size": (10, 10), "exist": (8, 10),
                    "relation": (4, 10), "compare": (6, 10)})
    base = _scores({"exist": (5, 10), "relation": (4, 10), "compare": (6, 10)})
    v = S.vqa_summary(mine)
    assert v["held_in"]["colour"] == 90.0 and v["held_in"]["mean"] == 85.0  # (90 + 100 + 50 + 100) / 4
    assert v["held_in"]["n"]["colour"] == 10 and v["held_in"]["ci"]["shape"] == [100.0, 100.0]
    lo, hi = v["held_in"]["ci"]["mean"]
    assert lo < 85.0 < hi
    assert v["held_out"]["mean"] == 60.0
    g = S.paired_vqa(mine, base, ("exist", "relation", "compare"))
    assert g["exist"] == 30.0 and g["relation"] == 0.0 and g["ci"]["relation"] == [0.0, 0.0]
    assert g["mean"] == 10.0 and g["ci"]["mean"][0] <= 10.0 <= g["ci"]["mean"][1]
    assert S.vqa_summary(None) is None


def test_ablation_studies():
    # captions: 4 images; the full model names 3 scenes fully, the ablated one 1 (attribute score 1 or 0)
    full = {f"i{k}": {"caption": "c", "accuracy": float(k < 3), "exact": float(k < 3)} for k in range(4)}
    abl = {f"i{k}": {"caption": "c", "accuracy": float(k < 1), "exact": float(k < 1)} for k in range(4)}
    same = _scores({"colour": (5, 10), "shape": (5, 10), "count": (5, 10), "size": (5, 10), "exist": (5, 10),
                    "relation": (5, 10), "compare": (5, 10)})
    cap_sum = {"stage2": {"attribute_accuracy": 75.0, "exact_scene": 75.0, "cider": 0.5},
               "stage2-no-stage1": {"attribute_accuracy": 25.0, "exact_scene": 25.0, "cider": 0.2}}
    vqa_sum = {k: S.vqa_summary(same) for k in ("instruct", "instruct-llm-only")}
    loss = {"stage2": 1.5, "stage2-no-stage1": 2.0, "instruct": None, "instruct-llm-only": 1.0}
    st = S.ablation_studies({"stage2": full, "stage2-no-stage1": abl}, {"instruct": same, "instruct-llm-only": same},
                            cap_sum, vqa_sum, loss)
    s2 = st["stage2_without_stage1"]
    assert s2["rows"]["caption attribute accuracy (%)"] == [75.0, 25.0]
    p = s2["paired"]["caption attribute accuracy (%)"]
    assert p["diff"] == 50.0 and p["ci"][0] <= 50.0 <= p["ci"][1] and p["verdict"] in ("differs",
                                                                                         "no significant difference")
    assert s2["paired"]["CIDEr"] == {"diff": 0.3, "ci": None, "verdict": None}
    assert s2["paired"]["final stage-2 loss"]["diff"] == -0.5
    ins = st["instruct_without_qformer_instruction"]
    assert ins["paired"]["held-in VQA (%)"] == {"diff": 0.0, "ci": [0.0, 0.0], "verdict": "no significant difference"}
    assert ins["rows"]["held-out VQA (%)"] == [50.0, 50.0]
    assert ins["paired"]["final loss"]["diff"] is None  # one side missing


def test_chance_levels():
    qs = [{"question_type": "relation", "answer": [a]} for a in ("left", "left", "yes", "right")]
    qs += [{"question_type": "exist", "answer": ["no"]}]
    assert S.chance_levels(qs) == {"exist": 50.0, "compare": 50.0, "relation": 50.0}


def test_targets():
    vqa = {"held_in": {"colour": 90.0, "shape": 95.0, "count": 70.0, "size": 99.0, "mean": 88.5},
           "held_out": {"exist": 65.0, "relation": 40.0, "compare": 55.0, "mean": 53.3}}
    gain = {"exist": 15.0, "relation": 12.0, "compare": 8.0, "mean": 11.7}
    chance = {"exist": 50.0, "compare": 50.0, "relation": 45.0}
    t = {r["name"]: r for r in S.targets({"t2i_r1_scene": 61.0}, {"attribute_accuracy": 79.0,
                                                                  "top_caption_share": 2.0}, vqa, gain, chance, 24.0)}
    assert t["held-out text->image R@1 (scene match), stage 1"]["met"]
    assert not t["caption attribute accuracy"]["met"]
    assert t["share of the pictures given the most frequent caption"]["met"]
    assert t["held-in VQA accuracy (mean of the families)"]["met"]
    worst = t["held-in VQA accuracy, worst family (count)"]
    assert worst["measured"] == 70.0 and not worst["met"]
    gain_row = t["held-out VQA gain over stage 2 (points), worst family (compare)"]
    assert gain_row["measured"] == 8.0 and not gain_row["met"]
    chance_row = t["held-out VQA above chance (points), worst family (relation)"]
    assert chance_row["measured"] == -5.0 and not chance_row["met"] and chance_row["chance"] == chance
    assert t["wall time of the main pipeline (minutes)"]["met"]
    # nothing measured (smoke, no wall-time target): every target is there and missed
    empty = S.targets(None, None, None, None, chance, None)
    assert len(empty) == 7 and not any(r["met"] for r in empty)


def test_timings_detail(tmp_path):
    run = tmp_path / "stage2"
    run.mkdir()
    (run / "summary.json").write_text(json.dumps({"steps": 4, "samples": 64, "wall_time_s": 3.0}))
    _write_metrics(run / "metrics.jsonl", [{"step": s, "loss": 1.0, "step_time": 0.5} for s in range(1, 5)])
    cfg = tmp_path / "stage2.yaml"
    cfg.write_text("data: {batch_size: 8}\noptim: {grad_accum: 2}\nmax_steps: 4\n")
    train = S.training_detail(run, cfg)
    assert train == {"optimizer_steps": 4, "batch_size": 16, "samples": 64, "s_per_step": 0.5, "optimizer_s": 2.0}
    d = S.timings_detail({"world": 2.0, "stage2": 6.0, "abl": 5.0}, {"world": "main", "stage2": "main",
                                                                     "abl": "ablations"}, {"stage2": train})
    assert d["world"] == {"group": "main", "seconds": 2.0, "share": 25.0}
    assert d["stage2"]["share"] == 75.0 and d["stage2"]["overhead_s"] == 4.0 and d["stage2"]["samples"] == 64
    assert d["abl"]["share"] == 100.0
    assert S.validation_rows({"stage 2": run}) == {}
    (run / "val.jsonl").write_text('{"step": 2, "CIDEr": 0.1}\n{"step": 4, "CI')
    assert S.validation_rows({"stage 2": run}) == {"stage 2": [{"step": 2, "CIDEr": 0.1}]}
