"""The quickstart's numbers: per-item scores read back from the evaluation predictions, the report sections built
from them (with bootstrap intervals, blip2.quickstart.stats), the targets and where the time went.

Intervals sit next to their values as a sibling "ci" dict, {key: [lo, hi]}, so every value stays a plain number:
    "held_in": {"colour": 90.0, ..., "mean": 88.2, "ci": {"colour": [83.3, 96.7], "mean": [85.0, 91.3]}, "n": {...}}
Functions here read files and return plain dicts; they never run a model.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import yaml

from ..data import shapes
from ..data.scoring import caption_attribute_score, describes
from ..metrics import exact_match
from .stats import bootstrap_ci, paired_bootstrap_diff, verdict

SPLITS = (("held_in", tuple(f for f in shapes.HELD_IN if f != "caption")), ("held_out", shapes.HELD_OUT))
TIME_TARGET_MIN = 25.0  # the main pipeline (no ablations), default mode
YES_NO = ("exist", "compare")  # chance 50 %; relation: the majority answer's share (chance_levels)


def _r(v: float | None) -> float | None:
    return None if v is None else round(v, 2)


def _interval(res: tuple[float, float, float]) -> tuple[float, list[float]]:
    m, lo, hi = res
    return _r(m), [_r(lo), _r(hi)]


# ------------------------------------------------------------------------------------------ per-item scores
def caption_scores(ev: dict | None, scenes: dict[str, shapes.Scene]) -> dict[str, dict] | None:
    """{image: {"caption", "accuracy" (attribute score in [0, 1]), "exact" (0 / 1)}} of a caption evaluation."""
    if not ev or "caption" not in ev:
        return None
    out = {}
    for p in json.loads(Path(ev["caption"]["predictions"]).read_text()):
        s = caption_attribute_score(p["caption"], scenes[p["image"]])
        out[p["image"]] = {"caption": p["caption"], "accuracy": s["accuracy"], "exact": float(s["exact"])}
    return out


def vqa_scores(ev: dict | None) -> dict[str, dict[int, float]] | None:
    """{family: {question_id: exact match 0 / 1}}, the answer cut at its first line break (a frozen LLM that has
    not learnt the short-answer format often goes on after it: "No.\\n\\nThe ...")."""
    if not ev or "vqa" not in ev:
        return None
    out: dict[str, dict[int, float]] = {}
    for p in json.loads(Path(ev["vqa"]["predictions"]).read_text()):
        answer = p["answer"].strip().split("\n")[0]
        out.setdefault(p["question_type"], {})[p["question_id"]] = exact_match(answer, p["gt_answers"][0])
    return out


def chance_levels(questions: list[dict]) -> dict[str, float]:
    """Chance accuracy (%) of each held-out family on the evaluated questions: 50 for the yes/no families; for
    relation (its answers mix yes/no, left/right, ...) the share of its most frequent answer, what always giving
    that answer would score."""
    out = {f: 50.0 for f in YES_NO}
    rel = Counter(q["answer"][0] for q in questions if q["question_type"] == "relation")
    if rel:
        out["relation"] = _r(100 * rel.most_common(1)[0][1] / sum(rel.values()))
    return out


# ------------------------------------------------------------------------------------------------ sections
def caption_summary(ev: dict | None, scores: dict[str, dict] | None) -> dict | None:
    if not scores:
        return None
    acc, acc_ci = _interval(bootstrap_ci([s["accuracy"] for s in scores.values()]))
    exact, exact_ci = _interval(bootstrap_ci([s["exact"] for s in scores.values()]))
    top = Counter(s["caption"].strip().lower() for s in scores.values()).most_common(1)[0]
    m = ev["caption"]["metrics"]
    return {"attribute_accuracy": acc, "exact_scene": exact, "cider": m.get("CIDEr"), "bleu4": m.get("BLEU-4"),
            "n": len(scores), "top_caption": top[0], "top_caption_share": _r(100 * top[1] / len(scores)),
            "ci": {"attribute_accuracy": acc_ci, "exact_scene": exact_ci}}


def _pooled(scores: dict[str, dict[int, float]], families) -> tuple[list[float], list[str]]:
    """Every question's score of the families, with its family as the stratum label."""
    pairs = [(f, s) for f in families for s in scores.get(f, {}).values()]
    return [s for _, s in pairs], [f for f, _ in pairs]


def vqa_summary(scores: dict[str, dict[int, float]] | None) -> dict | None:
    """Per split: accuracy (%) per family and the mean of the family means, each with its 95 % interval."""
    if scores is None:
        return None
    out = {}
    for split, fams in SPLITS:
        row, ci, n = {f: None for f in fams}, {}, {}
        for f in (f for f in fams if scores.get(f)):
            row[f], ci[f] = _interval(bootstrap_ci(list(scores[f].values())))
            n[f] = len(scores[f])
        vals, strata = _pooled(scores, fams)
        row["mean"] = None
        if vals:
            row["mean"], ci["mean"] = _interval(bootstrap_ci(vals, strata=strata))
        out[split] = {**row, "ci": ci, "n": n}
    return out


def paired_vqa(a: dict[str, dict[int, float]], b: dict[str, dict[int, float]], families) -> dict:
    """a minus b (points) per family and for the mean of the family means, on the questions both answered."""
    out, ci, va, vb, strata = {}, {}, [], [], []
    for f in families:
        common = sorted(set(a.get(f, {})) & set(b.get(f, {})))
        out[f] = None
        if common:
            fa, fb = [a[f][q] for q in common], [b[f][q] for q in common]
            out[f], ci[f] = _interval(paired_bootstrap_diff(fa, fb))
            va, vb, strata = va + fa, vb + fb, strata + [f] * len(common)
    out["mean"] = None
    if va:
        out["mean"], ci["mean"] = _interval(paired_bootstrap_diff(va, vb, strata=strata))
    return {**out, "ci": ci}


def retrieval_summary(ev: dict | None, scenes: dict[str, shapes.Scene]) -> dict | None:
    if not ev or "retrieval" not in ev:
        return None
    preds = json.loads(Path(ev["retrieval"]["predictions"]).read_text())
    hits = [describes(t, scenes[preds["images"][top[0]]]) for t, top in zip(preds["texts"], preds["t2i_top10"])]
    m = ev["retrieval"]["metrics"]
    return {"model": "stage1", "t2i_r1_scene": _r(100 * sum(hits) / len(hits)), "t2i_r1_exact": m["t2i_r1"],
            "t2i_r5": m["t2i_r5"], "i2t_r1": m["i2t_r1"], "texts": len(preds["texts"]),
            "images": len(preds["images"])}


# ----------------------------------------------------------------------------------------------- ablations
def paired_row(a: list[float] | None, b: list[float] | None, strata: list[str] | None = None,
               values: tuple = (None, None)) -> dict:
    """{"diff", "ci", "verdict"} of a paired comparison (a minus b, points); without per-item scores, the plain
    difference of the two values with no interval."""
    if a and b:
        d, ci = _interval(paired_bootstrap_diff(a, b, strata=strata))
        return {"diff": d, "ci": ci, "verdict": verdict(*ci)}
    x, y = values
    return {"diff": round(x - y, 4) if x is not None and y is not None else None, "ci": None, "verdict": None}


def ablation_studies(cap: dict[str, dict | None], vqa: dict[str, dict | None], cap_sum: dict[str, dict | None],
                     vqa_sum: dict[str, dict | None], loss: dict[str, float | None]) -> dict:
    """The two ablations, each {"description", "columns", "rows": {metric: [full, ablated]}, "difference",
    "paired": {metric: paired_row}}; cap / vqa are per-item scores, cap_sum / vqa_sum the sections, by model."""
    def g(d, *keys):
        for k in keys:
            d = d.get(k) if isinstance(d, dict) else None
        return d

    full, abl = cap.get("stage2") or {}, cap.get("stage2-no-stage1") or {}
    images = sorted(set(full) & set(abl))
    s2 = {"caption attribute accuracy (%)": "attribute_accuracy", "caption exact scene (%)": "exact_scene",
          "CIDEr": "cider"}
    rows = {m: [g(cap_sum, "stage2", k), g(cap_sum, "stage2-no-stage1", k)] for m, k in s2.items()}
    rows["final stage-2 loss"] = [loss.get("stage2"), loss.get("stage2-no-stage1")]
    per_item = {"caption attribute accuracy (%)": "accuracy", "caption exact scene (%)": "exact"}
    paired = {m: paired_row([full[i][per_item[m]] for i in images] if m in per_item else None,
                            [abl[i][per_item[m]] for i in images] if m in per_item else None, values=tuple(v))
              for m, v in rows.items()}

    qi, qa = vqa.get("instruct") or {}, vqa.get("instruct-llm-only") or {}
    rows_i, paired_i = {}, {}
    for split, fams in SPLITS:
        m = f"{split.replace('_', '-')} VQA (%)"
        rows_i[m] = [g(vqa_sum, "instruct", split, "mean"), g(vqa_sum, "instruct-llm-only", split, "mean")]
        diff = paired_vqa(qi, qa, fams) if qi and qa else {"mean": None, "ci": {}}
        ci = diff["ci"].get("mean")
        paired_i[m] = {"diff": diff["mean"], "ci": ci, "verdict": verdict(*ci) if ci else None}
    rows_i["final loss"] = [loss.get("instruct"), loss.get("instruct-llm-only")]
    paired_i["final loss"] = paired_row(None, None, values=tuple(rows_i["final loss"]))
    return {
        "stage2_without_stage1": {
            "description": "Stage 2 trained the same way from a Q-Former initialised from MiniLM directly, "
                           "skipping stage-1 representation learning (BLIP-2 §4.5).",
            "columns": ["with stage 1", "without stage 1"], "difference": "with stage 1 minus without stage 1",
            "rows": rows, "paired": paired},
        "instruct_without_qformer_instruction": {
            "description": "Instruction tuning the same way with the instruction given to the LLM only "
                           "(a BLIP-2 Q-Former), against InstructBLIP's instruction-aware Q-Former.",
            "columns": ["instruction in Q-Former", "LLM only"],
            "difference": "instruction in Q-Former minus LLM only", "rows": rows_i, "paired": paired_i},
    }


# ------------------------------------------------------------------------------------------------- targets
def _target(name: str, target: str, measured, ok: bool, **detail) -> dict:
    return {"name": name, "target": target, "measured": measured, "met": bool(measured is not None and ok), **detail}


def targets(retrieval: dict | None, caption: dict | None, vqa: dict | None, gain: dict | None,
            chance: dict[str, float], main_minutes: float | None) -> list[dict]:
    """The quickstart's targets on held-out scenes (InstructBLIP unless named); main_minutes None leaves out the
    wall-time target (smoke mode)."""
    held_in, held_out = (vqa or {}).get("held_in") or {}, (vqa or {}).get("held_out") or {}
    fams_in = {f: held_in.get(f) for f in SPLITS[0][1] if held_in.get(f) is not None}
    worst_in = min(fams_in, key=fams_in.get) if fams_in else None
    gains = {f: (gain or {}).get(f) for f in shapes.HELD_OUT if (gain or {}).get(f) is not None}
    worst_gain = min(gains, key=gains.get) if gains else None
    margin = {f: _r(held_out[f] - chance[f]) for f in shapes.HELD_OUT
              if held_out.get(f) is not None and f in chance}
    worst_margin = min(margin, key=margin.get) if margin else None
    r1, attr = (retrieval or {}).get("t2i_r1_scene"), (caption or {}).get("attribute_accuracy")
    top = (caption or {}).get("top_caption_share")
    mean_in = held_in.get("mean")
    out = [
        _target("held-out text->image R@1 (scene match), stage 1", ">= 60%", r1, r1 is not None and r1 >= 60),
        _target("caption attribute accuracy", ">= 80%", attr, attr is not None and attr >= 80),
        _target("share of the pictures given the most frequent caption", "<= 5%", top, top is not None and top <= 5),
        _target("held-in VQA accuracy (mean of the families)", ">= 85%", mean_in,
                mean_in is not None and mean_in >= 85),
        _target(f"held-in VQA accuracy, worst family ({worst_in or 'n/a'})", ">= 75%", fams_in.get(worst_in),
                worst_in is not None and fams_in[worst_in] >= 75, family=worst_in),
        _target(f"held-out VQA gain over stage 2 (points), worst family ({worst_gain or 'n/a'})", ">= 10",
                gains.get(worst_gain), worst_gain is not None and gains[worst_gain] >= 10, family=worst_gain,
                per_family=gains),
        _target(f"held-out VQA above chance (points), worst family ({worst_margin or 'n/a'})", "> 0",
                margin.get(worst_margin), worst_margin is not None and margin[worst_margin] > 0,
                family=worst_margin, per_family=margin, chance=chance),
    ]
    if main_minutes is not None:
        out.append(_target("wall time of the main pipeline (minutes)", f"<= {TIME_TARGET_MIN:g}", main_minutes,
                           main_minutes <= TIME_TARGET_MIN))
    return out


# ---------------------------------------------------------------------------------------------------- time
def _jsonl(path: Path) -> list[dict]:
    """The rows of a JSON-lines file; a missing file is empty, an unreadable line (a run stopped mid-write) skipped."""
    try:
        lines = path.read_text().splitlines()
    except OSError:
        return []
    rows = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def final_loss(step_dir: Path, n: int = 10) -> float | None:
    """The mean loss of the last n logged steps."""
    vals = [r["loss"] for r in _jsonl(step_dir / "metrics.jsonl")[-n:] if "loss" in r]
    return round(sum(vals) / len(vals), 4) if vals else None


def training_detail(step_dir: Path, config: Path) -> dict:
    """Optimizer steps, batch size (with gradient accumulation), samples and seconds per optimizer step of one
    training run (the mean logged step time; `overhead_s` is the rest of the step: loading, feature caching,
    checkpoints) from its summary.json, metrics.jsonl and resolved config."""
    try:
        cfg = yaml.safe_load(config.read_text()) or {}
    except OSError:
        cfg = {}
    try:
        summary = json.loads((step_dir / "summary.json").read_text())
    except (OSError, ValueError):
        summary = {}
    batch = (cfg.get("data") or {}).get("batch_size", 0) * (cfg.get("optim") or {}).get("grad_accum", 1)
    steps = summary.get("steps", cfg.get("max_steps"))
    times = [r["step_time"] for r in _jsonl(step_dir / "metrics.jsonl") if "step_time" in r]
    return {"optimizer_steps": steps, "batch_size": batch,
            "samples": summary.get("samples", steps * batch if steps is not None else None),
            "s_per_step": round(sum(times) / len(times), 3) if times else None,
            "optimizer_s": round(sum(times), 1) if times else None}


def timings_detail(timings: dict[str, float], groups: dict[str, str], training: dict[str, dict]) -> dict:
    """{step: {"group", "seconds", "share" (% of its group's total), training numbers}} for every timed step."""
    totals: dict[str, float] = {}
    for step, s in timings.items():
        totals[groups[step]] = totals.get(groups[step], 0.0) + s
    out = {}
    for step, s in timings.items():
        total = totals[groups[step]]
        row = {"group": groups[step], "seconds": s, "share": _r(100 * s / total) if total else None}
        if step in training:
            row.update(training[step])
            if row.get("optimizer_s") is not None:
                row["overhead_s"] = round(s - row["optimizer_s"], 1)
        out[step] = row
    return out


def validation_rows(step_dirs: dict[str, Path]) -> dict[str, list[dict]]:
    """{run: the rows of its val.jsonl} for the runs that validated during training (val_every + data.val)."""
    return {name: rows for name, d in step_dirs.items() if (rows := _jsonl(d / "val.jsonl"))}
