"""The quickstart report: report.json / report.md, a console summary, loss curves and a picture gallery.

Everything here renders a plain dict (the caller builds it); any value may be None when its step did not run, and
is shown as "n/a". matplotlib is imported only by the two plotting functions, and draws with Agg through its
object API (no pyplot, so no global backend state). Every file is written to a temporary name in its directory
and moved into place, so an interrupted run never leaves a half-written report.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import textwrap
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

NA = "n/a"
GREEN, RED, INK = "#1b7a2e", "#b3261e", "#222222"
_RETRIEVAL = [("t2i_r1_scene", "text->image R@1 (scene match)"), ("t2i_r1_exact", "text->image R@1 (exact text)"),
              ("t2i_r5", "text->image R@5"), ("i2t_r1", "image->text R@1")]
_CAPTION = [("attribute_accuracy", "attribute acc. (%)", "pct"), ("exact_scene", "exact scene (%)", "pct"),
            ("cider", "CIDEr", "score"), ("bleu4", "BLEU-4", "score"), ("n", "n", "int")]


# ------------------------------------------------------------------------------------------------- numbers
def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pct(v) -> str:
    """A 0-100 percentage with one decimal; None / NaN -> "n/a"."""
    return f"{v:.1f}" if _finite(v) else NA


def score(v) -> str:
    """A CIDEr / BLEU-like score with three decimals; None / NaN -> "n/a"."""
    return f"{v:.3f}" if _finite(v) else NA


def _int(v) -> str:
    return str(int(v)) if _finite(v) else NA


_FORMATS: dict[str, Callable] = {"pct": pct, "score": score, "int": _int}


def _metric_format(name: str) -> Callable:
    """Ablation rows carry no unit: scores and losses are named so, everything else is a percentage."""
    low = name.lower()
    return score if any(w in low for w in ("cider", "bleu", "loss")) else pct


def _measured(target: dict) -> str:
    """A target's measured value, with "%" when its target is stated in percent."""
    v = target.get("measured")
    if "%" in str(target.get("target") or ""):
        return pct(v) + ("%" if _finite(v) else "")
    return score(v) if _finite(v) and not float(v).is_integer() else _int(v)


def _met(v, yes: str, no: str) -> str:
    return NA if v is None else (yes if v else no)


def _cell(v) -> str:
    """Free text made safe for one markdown table cell."""
    return NA if v is None else " ".join(str(v).split()).replace("|", "\\|")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]


# ------------------------------------------------------------------------------------------------ markdown
def _targets(report: dict) -> list[str]:
    targets = report.get("targets") or []
    if not targets:
        return ["No targets were evaluated.", ""]
    return _table(["name", "target", "measured", "met"],
                  [[_cell(t.get("name")), _cell(t.get("target")), _measured(t), _met(t.get("met"), "met", "**missed**")]
                   for t in targets])


def _retrieval(r: dict | None) -> list[str]:
    if not r:
        return [f"Not run ({NA}).", ""]
    head = [f"Model `{_cell(r.get('model'))}`, {_int(r.get('texts'))} texts against {_int(r.get('images'))} "
            "images.", ""]
    return head + _table(["metric", "%"], [[label, pct(r.get(k))] for k, label in _RETRIEVAL])


def _caption(c: dict | None) -> list[str]:
    if not c:
        return [f"Not run ({NA}).", ""]
    by_model = c.get("by_model") or {c.get("model") or "model": c}
    rows = [[_cell(m) + (" (reported)" if m == c.get("model") and len(by_model) > 1 else "")]
            + [_FORMATS[f]((v or {}).get(k)) for k, _, f in _CAPTION] for m, v in by_model.items()]
    return _table(["model"] + [label for _, label, _ in _CAPTION], rows)


def _vqa(q: dict | None) -> list[str]:
    if not q:
        return [f"Not run ({NA}).", ""]
    zs = q.get("stage2_zero_shot") or {}
    name = q.get("model") or "instruct"
    rows, means = [], []
    for split, label in (("held_in", "held-in"), ("held_out", "held-out")):
        mine, theirs = q.get(split) or {}, zs.get(split) or {}
        families = [f for f in dict.fromkeys([*mine, *theirs]) if f != "mean"]
        rows += [[_cell(f), label, pct(mine.get(f)), pct(theirs.get(f))] for f in families]
        means.append(f"- {label} mean: {pct(mine.get('mean'))} ({_cell(name)}) vs {pct(theirs.get('mean'))} "
                     "(stage-2 zero-shot)")
    return _table(["family", "split", f"{_cell(name)} (%)", "stage-2 zero-shot (%)"], rows) + means + [""]


def _ablations(abl: dict | None) -> list[str]:
    if not abl:
        return [f"None run ({NA}).", ""]
    out = []
    for name, a in abl.items():
        a = a or {}
        cols = list(a.get("columns") or [])
        out += [f"### {_cell(name)}", "", _cell(a.get("description") or ""), ""]
        rows = []
        for metric, values in (a.get("rows") or {}).items():
            fmt = _metric_format(metric)
            values = list(values or [])
            rows.append([_cell(metric)] + [fmt(values[i] if i < len(values) else None) for i in range(len(cols))])
        out += _table(["metric"] + [_cell(c) for c in cols], rows)
    return out


def _timings(t: dict | None) -> list[str]:
    t = dict(t or {})
    total = t.pop("total", None)
    if total is None and any(_finite(v) for v in t.values()):
        total = sum(v for v in t.values() if _finite(v))

    def row(step, s):
        return [step, f"{s:.1f}" if _finite(s) else NA, f"{s / 60:.1f}" if _finite(s) else NA]

    return _table(["step", "seconds", "minutes"], [row(_cell(k), v) for k, v in t.items()] + [row("**total**", total)])


def _setup(report: dict) -> list[str]:
    w, m = report.get("world") or {}, report.get("models") or {}
    sizes = " / ".join(_int(w.get(k)) for k in ("train", "val", "test"))
    lines = [f"- world: {sizes} train / val / test scenes, {_int(w.get('image_size'))} px images",
             f"- held-in question families: {', '.join(map(str, w.get('held_in') or [])) or NA}",
             f"- held-out question families: {', '.join(map(str, w.get('held_out') or [])) or NA}"]
    lines += [f"- {k}: {_cell(v)}" for k, v in m.items()]
    return lines + [""]


def markdown(report: dict) -> str:
    """report.md: targets first, then every evaluation, the ablations, the timings, the setup and the pictures."""
    mode = report.get("mode") or NA
    out = [f"# blip2 quickstart report ({_cell(mode)} mode)", "",
           f"Output `{_cell(report.get('output'))}`, finished {_cell(report.get('finished'))}.", ""]
    if mode == "smoke":
        out += ["Smoke mode trains for a few steps on a tiny world: the numbers only show that the pipeline runs.", ""]
    out += ["## Targets", ""] + _targets(report)
    out += ["## Retrieval", ""] + _retrieval(report.get("retrieval"))
    out += ["## Captioning", ""] + _caption(report.get("caption"))
    out += ["## VQA", ""] + _vqa(report.get("vqa"))
    out += ["## Ablations", ""] + _ablations(report.get("ablations"))
    out += ["## Timings", ""] + _timings(report.get("timings"))
    out += ["## Setup", ""] + _setup(report)
    files = report.get("files") or {}
    for key, title in (("loss_curves", "Loss curves"), ("gallery", "Gallery")):
        if files.get(key):
            out += [f"## {title}", "", f"![]({files[key]})", ""]
    return "\n".join(out).rstrip("\n") + "\n"


def summary_lines(report: dict) -> list[str]:
    """A few console lines: one per target, the total time and where report.md is."""
    lines = []
    for t in report.get("targets") or []:
        status = _met(t.get("met"), "met", "MISSED")
        lines.append(f"  {status:<6} {t.get('name')}: {_measured(t)} (target {t.get('target')})")
    met = sum(1 for t in report.get("targets") or [] if t.get("met"))
    lines.insert(0, f"quickstart ({report.get('mode')}): {met}/{len(report.get('targets') or [])} targets met")
    total = (report.get("timings") or {}).get("total")
    lines.append(f"total time: {total / 60:.1f} min" if _finite(total) else f"total time: {NA}")
    lines.append(f"report: {Path(report.get('output') or '.') / 'report.md'}")
    return lines


# ------------------------------------------------------------------------------------------------- writing
@contextmanager
def _atomic(path: str | Path) -> Iterator[Path]:
    """Yields a temporary path next to `path`; moves it onto `path` when the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


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
    with _atomic(js) as tmp:
        tmp.write_text(json.dumps(_jsonable(report), indent=2, default=str) + "\n")
    with _atomic(md) as tmp:
        tmp.write_text(markdown(report))
    return js, md


# ------------------------------------------------------------------------------------------------ pictures
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, png: str | Path) -> None:
    with _atomic(png) as tmp:
        fig.savefig(tmp, format="png", facecolor="white")


def _read_losses(path: Path) -> dict[str, tuple[list[float], list[float]]]:
    """{loss name: (steps, values)} of every finite value of a key ending in "loss"; unreadable lines skipped
    (a run stopped mid-write leaves a partial last line)."""
    curves: dict[str, tuple[list[float], list[float]]] = {}
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if not isinstance(row, dict) or not _finite(row.get("step")):
            continue
        for k, v in row.items():
            if k.endswith("loss") and _finite(v):
                xs, ys = curves.setdefault(k, ([], []))
                xs.append(row["step"])
                ys.append(float(v))
    return curves


def plot_losses(runs: dict[str, str | Path], png: str | Path) -> None:
    """One subplot per run (up to 3 columns) with every loss against the step; writes nothing if no run has data."""
    data = {}
    for title, path in runs.items():
        path = Path(path)
        if path.is_file() and (curves := _read_losses(path)):
            data[title] = curves
    if not data:
        return
    cols = min(3, len(data))
    rows = math.ceil(len(data) / cols)
    fig = _figure(4.5 * cols, 3.2 * rows)
    for i, (title, curves) in enumerate(data.items()):
        ax = fig.add_subplot(rows, cols, i + 1)
        for name, (xs, ys) in curves.items():
            ax.plot(xs, ys, label=name, linewidth=1.2)
        if all(y > 0 for _, ys in curves.values() for y in ys):
            ax.set_yscale("log")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    _save(fig, png)


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
    import numpy as np
    from PIL import Image

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
