"""The quickstart report: report.json / report.md, a console summary, loss and validation curves and a picture
gallery.

Everything here renders a plain dict (the caller builds it, blip2.quickstart.summary the numbers); any value may
be None when its step did not run, and is shown as "n/a". A value with a 95 % interval (a sibling "ci" dict,
{key: [lo, hi]}) is shown as "35.8 [29.1, 42.0]"; number formats and tables come from `tables.py`. The probes
section is probes.probe_table's. matplotlib (an optional extra) is imported only by the plotting functions, and
draws with Agg through its object API (no pyplot, so no global backend state). Every file is written to a temporary name in its directory
and moved into place, so an interrupted run never leaves a half-written report.
"""

from __future__ import annotations

import json
import math
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from ..files import atomic_file
from .probes import answer_probe_table, probe_table
from .tables import NA, finite, pct, score, table

GREEN, RED, INK = "#1b7a2e", "#b3261e", "#222222"
_RETRIEVAL = [("t2i_r1_scene", "text->image R@1 (scene match)"), ("t2i_r1_exact", "text->image R@1 (exact text)"),
              ("t2i_r5", "text->image R@5"), ("i2t_r1", "image->text R@1")]
_CAPTION = [("attribute_accuracy", "attribute acc. (%)", "pct"), ("exact_scene", "exact scene (%)", "pct"),
            ("cider", "CIDEr", "score"), ("bleu4", "BLEU-4", "score"), ("n", "n", "int")]


# ------------------------------------------------------------------------------------------------- numbers
def _int(v) -> str:
    return str(int(v)) if finite(v) else NA


_FORMATS: dict[str, Callable] = {"pct": pct, "score": score, "int": _int}


def _metric_format(name: str) -> Callable:
    """Ablation rows carry no unit: scores and losses are named so, everything else is a percentage."""
    low = name.lower()
    return score if any(w in low for w in ("cider", "bleu", "loss")) else pct


def _measured(target: dict) -> str:
    """A target's measured value, with "%" when its target is stated in percent."""
    v = target.get("measured")
    if "%" in str(target.get("target") or ""):
        return pct(v) + ("%" if finite(v) else "")
    return score(v) if finite(v) and not float(v).is_integer() else _int(v)


def _met(v, yes: str, no: str) -> str:
    return NA if v is None else (yes if v else no)


def _cell(v) -> str:
    """Free text made safe for one markdown table cell."""
    return NA if v is None else " ".join(str(v).split()).replace("|", "\\|")


# ------------------------------------------------------------------------------------------------ markdown
def _targets(report: dict) -> list[str]:
    targets = report.get("targets") or []
    if not targets:
        return ["No targets were evaluated.", ""]
    return table(["name", "target", "measured", "met"],
                  [[_cell(t.get("name")), _cell(t.get("target")), _measured(t), _met(t.get("met"), "met", "**missed**")]
                   for t in targets])


def _retrieval(r: dict | None) -> list[str]:
    if not r:
        return [f"Not run ({NA}).", ""]
    head = [f"Model `{_cell(r.get('model'))}`, {_int(r.get('texts'))} texts against {_int(r.get('images'))} "
            "images.", ""]
    return head + table(["metric", "%"], [[label, pct(r.get(k))] for k, label in _RETRIEVAL])


def pct_ci(v, ci=None) -> str:
    """A percentage with its interval: "35.8 [29.1, 42.0]"; without an interval just "35.8"."""
    if not finite(v):
        return NA
    ok = isinstance(ci, (list, tuple)) and len(ci) == 2 and all(finite(x) for x in ci)
    return f"{pct(v)} [{pct(ci[0])}, {pct(ci[1])}]" if ok else pct(v)


def _caption(c: dict | None) -> list[str]:
    if not c:
        return [f"Not run ({NA}).", ""]
    by_model = c.get("by_model") or {c.get("model") or "model": c}
    rows = []
    for m, v in by_model.items():
        v, name = v or {}, _cell(m) + (" (reported)" if m == c.get("model") and len(by_model) > 1 else "")
        ci = v.get("ci") or {}
        rows.append([name] + [pct_ci(v.get(k), ci.get(k)) if f == "pct" else _FORMATS[f](v.get(k))
                              for k, _, f in _CAPTION] + [pct(v.get("top_caption_share"))])
    return table(["model"] + [label for _, label, _ in _CAPTION] + ["most frequent caption (% of pictures)"], rows)


_VQA_META = ("mean", "ci", "n")  # keys of a split's dict that are not question families


def _vqa(q: dict | None) -> list[str]:
    if not q:
        return [f"Not run ({NA}).", ""]
    zs, gain, chance = q.get("stage2_zero_shot") or {}, q.get("gain_over_stage2") or {}, q.get("chance") or {}
    name = q.get("model") or "instruct"
    rows, means = [], []
    for split, label in (("held_in", "held-in"), ("held_out", "held-out")):
        mine, theirs = q.get(split) or {}, zs.get(split) or {}
        ci_m, ci_t = mine.get("ci") or {}, theirs.get("ci") or {}
        families = [f for f in dict.fromkeys([*mine, *theirs]) if f not in _VQA_META]
        for f in families:
            g = pct_ci(gain.get(f), (gain.get("ci") or {}).get(f)) if split == "held_out" else ""
            rows.append([_cell(f), label, pct_ci(mine.get(f), ci_m.get(f)), pct_ci(theirs.get(f), ci_t.get(f)), g,
                         pct(chance.get(f)) if f in chance else ""])
        means.append(f"- {label} mean: {pct_ci(mine.get('mean'), ci_m.get('mean'))} ({_cell(name)}) vs "
                     f"{pct_ci(theirs.get('mean'), ci_t.get('mean'))} (stage-2 zero-shot)")
    if gain:
        means.append(f"- held-out gain over stage 2: {pct_ci(gain.get('mean'), (gain.get('ci') or {}).get('mean'))} "
                     "points (paired bootstrap over the same questions)")
    head = ["family", "split", f"{_cell(name)} (%)", "stage-2 zero-shot (%)", "gain (points)", "chance (%)"]
    return (table(head, rows) + means
            + ["", "95 % bootstrap intervals in brackets (2000 resamples of the questions; a split's mean resamples "
                   "within each family). Chance: 50 % for yes/no families, the most frequent answer's share for "
                   "relation.", ""])


def _diff(p: dict | None) -> list[str]:
    p = p or {}
    d, ci = p.get("diff"), p.get("ci")
    if not finite(d):
        return [NA, NA]
    text = pct_ci(d, ci) if ci else (score(d) if not float(d).is_integer() else _int(d))
    return [text, _cell(p.get("verdict")) if p.get("verdict") else "no per-item scores"]


def _ablations(abl: dict | None) -> list[str]:
    abl = abl or {}
    if not abl.get("run"):
        return [_cell(abl.get("note") or "Not run."), ""]
    secs = abl.get("seconds")
    out = [f"Ablation steps (training and evaluation): {secs / 60:.1f} min, not counted in the main pipeline's time."
           if finite(secs) else "", ""]
    for name, a in (abl.get("studies") or {}).items():
        a = a or {}
        cols, paired = list(a.get("columns") or []), a.get("paired") or {}
        out += [f"### {_cell(name)}", "", _cell(a.get("description") or ""), ""]
        rows = []
        for metric, values in (a.get("rows") or {}).items():
            fmt = _metric_format(metric)
            values = list(values or [])
            rows.append([_cell(metric)] + [fmt(values[i] if i < len(values) else None) for i in range(len(cols))]
                        + _diff(paired.get(metric)))
        diff = f"difference ({_cell(a.get('difference') or 'first minus second')})"
        out += table(["metric"] + [_cell(c) for c in cols] + [diff, "verdict (95 % paired bootstrap)"], rows)
    return out


def _seconds(s) -> str:
    return f"{s:.1f}" if finite(s) else NA


def _timings(report: dict) -> list[str]:
    t = dict(report.get("timings") or {})
    total = t.pop("total", None)
    if total is None and any(finite(v) for v in t.values()):
        total = sum(v for v in t.values() if finite(v))
    detail = report.get("timings_detail") or {}
    abl = report.get("ablations") or {}
    out = [_wall_line(report), ""]

    def share(step, s, of):
        d = (detail.get(step) or {}).get("share")
        d = d if finite(d) else (100 * s / of if finite(s) and finite(of) and of else None)
        return pct(d)

    def timing_table(steps: dict, tot, label: str) -> list[str]:
        rows = [[_cell(k), _seconds(v), f"{v / 60:.1f}" if finite(v) else NA, share(k, v, tot)]
                for k, v in steps.items()]
        rows.append([f"**{label}**", _seconds(tot), f"{tot / 60:.1f}" if finite(tot) else NA,
                     "100.0" if finite(tot) else NA])
        return table(["step", "seconds", "minutes", "share (%)"], rows)

    out += timing_table(t, total, "total")
    if abl.get("run") and abl.get("timings"):
        out += ["Ablations:", ""] + timing_table(abl["timings"], abl.get("seconds"), "ablations")
    train = {k: d for k, d in detail.items() if isinstance(d, dict) and "optimizer_steps" in d}
    if train:
        rows = [[_cell(k), _int(d.get("optimizer_steps")), _int(d.get("batch_size")), _int(d.get("samples")),
                 score(d.get("s_per_step")), _seconds(d.get("optimizer_s")), _seconds(d.get("overhead_s"))]
                for k, d in train.items()]
        out += ["Training steps (s/step: the mean logged optimizer-step time; overhead: the rest of the step, i.e. "
                "loading, feature caching, checkpoints):", ""]
        out += table(["training", "optimizer steps", "batch", "samples", "s/step", "optimizer s", "overhead s"],
                      rows)
    return out


def _machine(m: dict | None) -> str:
    m = m or {}
    return (f"{pct(m.get('matmul_gflops'))} GFLOP/s fp32 matmul, "
            f"{_int(m.get('torch_threads'))} torch threads, {_int(m.get('cpu_count'))} CPUs")


def _wall_line(report: dict) -> str:
    total = (report.get("timings") or {}).get("total")
    main = f"{total / 60:.1f} min" if finite(total) else NA
    return f"Main pipeline: {main} of steps; machine: {_machine(report.get('machine'))}."


def _probes(p: dict | None, vqa: dict | None = None) -> list[str]:
    if not p:
        return [f"Not run ({NA}).", ""]
    head = [f"Linear probes trained on {_int(p.get('n_train'))} training scenes, scored on {_int(p.get('n_test'))} "
            "held-out scenes (accuracy, %; exact-set accuracy for the multi-label sets).", ""]
    out = head + list(probe_table(p))
    if p.get("answers"):
        out += ["Answer probes: a linear probe from the final model's query outputs, with the question in the "
                f"Q-Former, to the answer (trained on up to {_int(p['answers'].get('max_train'))} training questions "
                "per family), scored on the questions the model answers above. The probe's accuracy is what the "
                "Q-Former hands the LLM, as far as a linear read-out finds it; where the model's answers fall below "
                "it, the LLM does not read what it is given.",
                ""] + list(answer_probe_table(p["answers"], ((vqa or {}).get("held_in") or {})))
    return out


def _validation(v: dict | None) -> list[str]:
    if not v:
        return []
    out = []
    for run, rows in v.items():
        last = rows[-1] if rows else {}
        metrics = ", ".join(f"{k} {score(x)}" for k, x in last.items() if k != "step" and finite(x))
        out.append(f"- {_cell(run)}: {len(rows)} validations, last (step {_int(last.get('step'))}): {metrics or NA}")
    return out + [""]


def _setup(report: dict) -> list[str]:
    w, m = report.get("world") or {}, report.get("models") or {}
    sizes = " / ".join(_int(w.get(k)) for k in ("train", "val", "test"))
    lines = [f"- world: {sizes} train / val / test scenes, {_int(w.get('image_size'))} px images",
             f"- held-in question families: {', '.join(map(str, w.get('held_in') or [])) or NA}",
             f"- held-out question families: {', '.join(map(str, w.get('held_out') or [])) or NA}"]
    lines += [f"- {k}: {_cell(v)}" for k, v in m.items()]
    return lines + [""]


def markdown(report: dict) -> str:
    """report.md: targets first, then every evaluation, the probes, the ablations, the timings, the setup and the
    pictures."""
    mode = report.get("mode") or NA
    out = [f"# blip2 quickstart report ({_cell(mode)} mode)", "",
           f"Output `{_cell(report.get('output'))}`, seed {_cell(report.get('seed', 0))}, finished "
           f"{_cell(report.get('finished'))}.", "", _wall_line(report), ""]
    if mode == "smoke":
        out += ["Smoke mode trains for a few steps on a tiny world: the numbers only show that the pipeline runs.", ""]
    out += ["## Targets", ""] + _targets(report)
    out += ["## Retrieval", ""] + _retrieval(report.get("retrieval"))
    out += ["## Captioning", ""] + _caption(report.get("caption"))
    out += ["## VQA", ""] + _vqa(report.get("vqa"))
    if "probes" in report:
        out += ["## Linear probes (held-out scenes)", ""] + _probes(report.get("probes"), report.get("vqa"))
    out += ["## Ablations", ""] + _ablations(report.get("ablations"))
    out += ["## Timings", ""] + _timings(report)
    out += ["## Setup", ""] + _setup(report)
    files = report.get("files") or {}
    for key, title in (("loss_curves", "Loss curves"), ("val_curves", "Validation curves"), ("gallery", "Gallery")):
        if files.get(key):
            out += [f"## {title}", ""] + (_validation(report.get("validation")) if key == "val_curves" else [])
            out += [f"![]({files[key]})", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def summary_lines(report: dict) -> list[str]:
    """A few console lines: one per target, the main pipeline's time (and the ablations'), where report.md is."""
    lines = []
    for t in report.get("targets") or []:
        status = _met(t.get("met"), "met", "MISSED")
        lines.append(f"  {status:<6} {t.get('name')}: {_measured(t)} (target {t.get('target')})")
    met = sum(1 for t in report.get("targets") or [] if t.get("met"))
    lines.insert(0, f"quickstart ({report.get('mode')}): {met}/{len(report.get('targets') or [])} targets met")
    total = (report.get("timings") or {}).get("total")
    lines.append(f"total time: {total / 60:.1f} min" if finite(total) else f"total time: {NA}")
    abl = report.get("ablations") or {}
    if abl.get("run") and finite(abl.get("seconds")):
        lines.append(f"ablations: {abl['seconds'] / 60:.1f} min more")
    elif abl.get("note"):
        lines.append(f"ablations: {abl['note']}")
    lines.append(f"report: {Path(report.get('output') or '.') / 'report.md'}")
    return lines


# ------------------------------------------------------------------------------------------------- writing
def _jsonable(v):
    """NaN / inf are not JSON: written as null, like a step that did not run."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    return v


def write_report(report: dict, out_dir: str | Path) -> tuple[Path, Path]:
    """Writes out_dir/report.json and out_dir/report.md; returns (json path, markdown path)."""
    out_dir = Path(out_dir)
    js, md = out_dir / "report.json", out_dir / "report.md"
    with atomic_file(js) as tmp:
        tmp.write_text(json.dumps(_jsonable(report), indent=2, default=str) + "\n")
    with atomic_file(md) as tmp:
        tmp.write_text(markdown(report))
    return js, md


# ------------------------------------------------------------------------------------------------ pictures
def _figure(width: float, height: float):
    # deferred: matplotlib is an optional extra (train / test)
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, png: str | Path) -> None:
    with atomic_file(png) as tmp:
        fig.savefig(tmp, format="png", facecolor="white")


def _curves(rows: list[dict], keep: Callable[[str], bool]) -> dict[str, tuple[list[float], list[float]]]:
    """{key: (steps, values)} of every finite value of the rows' keys that `keep` accepts."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        if not isinstance(row, dict) or not finite(row.get("step")):
            continue
        for k, v in row.items():
            if k != "step" and keep(k) and finite(v):
                xs, ys = curves.setdefault(k, ([], []))
                xs.append(row["step"])
                ys.append(float(v))
    return curves


def _read_losses(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """{loss name: (steps, values)} of every finite value of a key ending in "loss"; unreadable lines skipped
    (a run stopped mid-write leaves a partial last line)."""
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue
    return _curves(rows, lambda k: k.endswith("loss"))


def _plot_panels(data: dict[str, dict[str, tuple[list, list]]], png: str | Path, ylabel: str, log: bool = False,
                 marker: str | None = None, suffix: str = "") -> None:
    """One subplot per run (up to 3 columns) with each of its curves {name: (steps, values)} against the step;
    log scale when asked and every value is positive."""
    cols = min(3, len(data))
    rows = math.ceil(len(data) / cols)
    fig = _figure(4.5 * cols, 3.2 * rows)
    for i, (title, curves) in enumerate(data.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, (xs, ys) in curves.items():
            ax.plot(xs, ys, label=name, linewidth=1.2, marker=marker, markersize=3)
        if log and all(y > 0 for _, ys in curves.values() for y in ys):
            ax.set_yscale("log")
        ax.set_title(title + suffix)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, png)


def plot_losses(runs: dict[str, str | Path], png: str | Path) -> None:
    """One subplot per run (up to 3 columns) with every loss against the step; writes nothing if no run has data."""
    data = {}
    for title, path in runs.items():
        path = Path(path)
        if path.is_file() and (curves := _read_losses(path)):
            data[title] = curves
    if data:
        _plot_panels(data, png, "loss", log=True)


def plot_validation(runs: dict[str, list[dict]], png: str | Path) -> bool:
    """One subplot per run with every validation metric (val.jsonl rows: {"step", metric: value}) against the
    step (item counts are not metrics: left out); writes nothing and returns False when no run has a finite
    value."""
    data = {title: c for title, rows in runs.items() if (c := _curves(rows or [], lambda k: k != "count"))}
    if data:
        _plot_panels(data, png, "metric", marker="o", suffix=": validation")
    return bool(data)


def qa_line(qa: dict) -> tuple[str, str]:
    """(text, colour) of one question under a gallery picture: green when the answer is right, red with the truth
    when it is wrong (compared case- and space-insensitively), neutral when there is no truth."""
    q, a, truth = str(qa.get("question", "")).strip(), str(qa.get("answer", "")).strip(), qa.get("truth")
    if truth is None:
        return f"{q} -> {a}", INK
    if a.lower() == str(truth).strip().lower():
        return f"{q} -> {a}", GREEN
    return f"{q} -> {a} (truth: {truth})", RED


def _tile_lines(item: dict, width: int) -> list[tuple[str, str, str]]:
    """(text, colour, font style) lines under one picture: the wrapped caption, then each wrapped Q/A."""
    lines = [(s, INK, "italic") for s in textwrap.wrap(str(item.get("caption") or ""), width)]
    for qa in item.get("qa") or []:
        text, colour = qa_line(qa)
        lines += [(s, colour, "normal") for s in textwrap.wrap(text, width, subsequent_indent="   ")]
    return lines


def _picture(path, side: int):
    """The image upscaled with nearest neighbour to `side` px (a 64 px image stays sharp), or None if unreadable."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB").resize((side, side), Image.NEAREST))
    except (OSError, ValueError):
        return None


def plot_gallery(items: list[dict], png: str | Path, columns: int = 4) -> None:
    """One tile per item: the picture, its title, the generated caption and the Q/As coloured by correctness."""
    if not items:
        return
    cols = max(1, min(columns, len(items)))
    rows = math.ceil(len(items) / cols)
    tile_w, line_h, wrap = 3.0, 0.17, 42  # inches, inches per text line, characters per line
    texts = [_tile_lines(it, wrap) for it in items]
    # each row of tiles: a square picture, then as many text lines as its longest tile needs
    heights = []
    for r in range(rows):
        n = max(len(t) for t in texts[r * cols:(r + 1) * cols])
        heights += [tile_w, max(n, 1) * line_h + 0.15]
    fig = _figure(tile_w * cols, sum(heights) + 0.3 * rows)
    grid = fig.add_gridspec(2 * rows, cols, height_ratios=heights, hspace=0.12, wspace=0.06,
                            left=0.02, right=0.98, top=0.98, bottom=0.01)
    for i, (item, lines) in enumerate(zip(items, texts)):
        r, c = divmod(i, cols)
        ax = fig.add_subplot(grid[2 * r, c])
        pic = _picture(item.get("image"), 256)
        if pic is None:
            ax.text(0.5, 0.5, "image missing", ha="center", va="center", color=INK)
        else:
            ax.imshow(pic, interpolation="nearest")
        ax.set_title(str(item.get("title") or ""), fontsize=10, fontweight="bold")
        ax.set_xticks([])
        ax.set_yticks([])
        tx = fig.add_subplot(grid[2 * r + 1, c])
        tx.axis("off")
        n = max(len(lines), 1)
        tx.set_ylim(n, 0)
        for j, (text, colour, style) in enumerate(lines):
            tx.text(0.0, j + 0.5, text, color=colour, fontstyle=style, fontsize=8, va="center", ha="left",
                    transform=tx.get_yaxis_transform())
    _save(fig, png)
