"""Scoring free captions against a shapes scene (blip2.data.shapes): exact-description match and the
per-object attribute accuracy the quickstart reports."""

from __future__ import annotations

import re
from typing import Iterable

from .shapes import COLOURS, SHAPES, SIZES, Scene, all_captions


# Every character that is not a letter or digit becomes a space: a superset of what pre_caption
# (blip2.train.transforms) drops, so a caption and its cleaned form normalise to the same text.
_NON_WORD = re.compile(r"[^a-z0-9]+")


def _normalise(text: str) -> str:
    """Lower case, punctuation to spaces, whitespace collapsed and stripped."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def describes(caption: str, scene: Scene) -> bool:
    """Whether the generator could have written `caption` for the scene, up to case, punctuation and spacing
    (so a caption cleaned by pre_caption still matches)."""
    return _normalise(caption) in {_normalise(c) for c in all_captions(scene)}


_MENTION = re.compile(rf"\b(?:({'|'.join(SIZES)}) )?({'|'.join(COLOURS)}) ({'|'.join(SHAPES)})s?\b")


def mentioned_objects(text: str) -> list[dict]:
    """The object mentions "[small|large] <colour> <shape>[s]" in a free caption, in order of appearance:
    [{"colour", "shape", "size" (None when not stated)}]. Case and punctuation are ignored; other words
    (e.g. "gray background", "the circle") are not mentions."""
    return [{"colour": m[2], "shape": m[3], "size": m[1]} for m in _MENTION.finditer(_normalise(text))]


def caption_attribute_score(text: str, scene: Scene) -> dict:
    """How well a free caption names the scene's objects. Mentions are deduplicated by (colour, shape); a pair
    is correct when the scene has that object and no mention of it states another size. Returns {"mentions",
    "correct", "missed" (scene objects not correctly mentioned), "accuracy": correct / (mentions + missed),
    i.e. the Jaccard index of mentioned and present objects, "exact": all objects and nothing else}."""
    sizes = {(o.colour, o.shape): o.size for o in scene.objects}
    right: dict[tuple[str, str], bool] = {}  # pair -> correct so far, in order of first mention
    for m in mentioned_objects(text):
        pair = (m["colour"], m["shape"])
        ok = pair in sizes and m["size"] in (None, sizes.get(pair))
        right[pair] = right.get(pair, True) and ok
    n, correct = len(right), sum(right.values())
    missed = len(sizes) - correct
    return {"mentions": n, "correct": correct, "missed": missed, "accuracy": correct / (n + missed),
            "exact": missed == 0 and correct == n}


def caption_attribute_accuracy(pairs: Iterable[tuple[str, Scene]]) -> dict:
    """caption_attribute_score over (caption, scene) pairs: {"accuracy": mean accuracy in %, "exact": rate of
    exact captions in %, both rounded to 2 decimals, "n"}."""
    scores = [caption_attribute_score(text, scene) for text, scene in pairs]
    if not scores:
        raise ValueError("caption_attribute_accuracy needs at least one (caption, scene) pair")
    n = len(scores)
    return {"accuracy": round(100 * sum(s["accuracy"] for s in scores) / n, 2),
            "exact": round(100 * sum(s["exact"] for s in scores) / n, 2), "n": n}
