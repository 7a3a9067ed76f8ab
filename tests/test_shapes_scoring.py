"""Scoring helpers of the shapes world: the exact caption set of a scene (checked against the generator and
against sets written out by hand), caption matching, and the attribute score of free captions."""

from __future__ import annotations

import numpy as np
import pytest

from blip2.data.scoring import caption_attribute_accuracy, caption_attribute_score, describes, mentioned_objects
from blip2.data.shapes import Obj, Scene, all_captions, captions, sample_scene
from blip2.prompts import pre_caption

# A large red circle in the top left cell, a small orange diamond right of it and one row lower:
# the circle is both left of and above the diamond.
PAIR = Scene((Obj("diamond", "orange", "small", col=2, row=1), Obj("circle", "red", "large", col=0, row=0)))
PAIR_CAPTIONS = {
    "a red circle and an orange diamond",
    "a large red circle and a small orange diamond",
    "two shapes: a red circle and an orange diamond",
    "a red circle to the left of an orange diamond",
    "a red circle above an orange diamond",
    "a picture of a red circle and an orange diamond on a gray background",
    "a picture of an orange diamond and a red circle on a gray background",
}

# One small yellow triangle in the top right cell.
SINGLE = Scene((Obj("triangle", "yellow", "small", col=2, row=0),))
SINGLE_CAPTIONS = {
    "a yellow triangle",
    "a small yellow triangle",
    "one shape: a yellow triangle",
    "a small yellow triangle in the top right corner",
    "a picture of a yellow triangle on a gray background",
}

# Three objects: a small green square (top left), a large blue circle (bottom left, below the square)
# and a large purple triangle (bottom right).
TRIPLE = Scene((Obj("square", "green", "small", col=0, row=0), Obj("circle", "blue", "large", col=0, row=2),
                Obj("triangle", "purple", "large", col=2, row=2)))


def test_all_captions_hand_built_scenes():
    assert all_captions(PAIR) == PAIR_CAPTIONS
    assert all_captions(SINGLE) == SINGLE_CAPTIONS


def test_all_captions_three_objects_relations():
    caps = all_captions(TRIPLE)
    # object order by column then row: square, circle, triangle
    relation = {c for c in caps if " to the left of " in c or " above " in c}
    assert relation == {
        "a green square above a blue circle, and a purple triangle in the bottom right corner",
        "a green square to the left of a purple triangle, and a blue circle in the bottom left corner",
        "a green square above a purple triangle, and a blue circle in the bottom left corner",
        "a blue circle to the left of a purple triangle, and a green square in the top left corner",
    }
    pictures = {c for c in caps if c.startswith("a picture of")}
    assert len(pictures) == 6  # 3! orders
    assert "a picture of a purple triangle, a green square and a blue circle on a gray background" in pictures
    assert "three shapes: a green square, a blue circle and a purple triangle" in caps
    assert "a small green square, a large blue circle and a large purple triangle" in caps
    assert len(caps) == 3 + 4 + 6


@pytest.mark.parametrize("seed", range(40))
def test_all_captions_is_exactly_what_captions_writes(seed):
    scene = sample_scene(np.random.default_rng(seed))
    every = all_captions(scene)
    seen = set()
    for s in range(150):  # enough draws to hit each of <= 6 relation picks and 6 orders
        written = captions(scene, np.random.default_rng([seed, s]))
        assert set(written) <= every, (scene, set(written) - every)
        seen |= set(written)
    assert seen == every


def test_describes_up_to_case_punctuation_and_cleaning():
    for c in PAIR_CAPTIONS:
        assert describes(c, PAIR)
        assert describes(pre_caption(c), PAIR)  # ':' removed by the training-side cleaning
        assert describes("  " + c.upper() + ". ", PAIR)
    assert describes("two shapes a red circle and an orange diamond", PAIR)
    assert describes("A red circle, above an orange diamond.", PAIR)
    assert not describes("an orange diamond to the left of a red circle", PAIR)  # relation reversed
    assert not describes("a small red circle and a small orange diamond", PAIR)  # wrong size
    assert not describes("a red circle", PAIR)  # partial description
    assert not describes("a yellow triangle", PAIR)
    assert describes("a small yellow triangle in the top right corner.", SINGLE)
    assert not describes("a small yellow triangle in the top left corner", SINGLE)


def test_mentioned_objects():
    text = "A LARGE red circle, two Blue squares; a grey background and a small,purple diamond. the red circle"
    assert mentioned_objects(text) == [
        {"colour": "red", "shape": "circle", "size": "large"},
        {"colour": "blue", "shape": "square", "size": None},
        {"colour": "purple", "shape": "diamond", "size": "small"},
        {"colour": "red", "shape": "circle", "size": None},
    ]
    assert mentioned_objects("a gray circle and a big green thing on a gray background") == []
    assert mentioned_objects("") == []


def _score(text, scene):
    s = caption_attribute_score(text, scene)
    return s["mentions"], s["correct"], s["missed"], s["accuracy"], s["exact"]


def test_caption_attribute_score_hand_examples():
    # all right, a repeated mention counts once
    assert _score("a large red circle to the left of an orange diamond. the red circle", PAIR) == (2, 2, 0, 1.0,
                                                                                                     True)
    # wrong colour: the blue circle is wrong, the red circle is missed -> 1 / (2 + 1)
    assert _score("a blue circle and an orange diamond", PAIR) == (2, 1, 1, pytest.approx(1 / 3), False)
    # hallucinated extra object -> 2 / (3 + 0)
    assert _score("a red circle, an orange diamond and a green square", PAIR) == (3, 2, 0, pytest.approx(2 / 3),
                                                                                   False)
    # missing object -> 1 / (1 + 1)
    assert _score("a red circle on a gray background", PAIR) == (1, 1, 1, 0.5, False)
    # wrong size, also when a later mention of the same object states it -> 1 / (2 + 1)
    assert _score("a small red circle and an orange diamond", PAIR) == (2, 1, 1, pytest.approx(1 / 3), False)
    assert _score("a red circle and an orange diamond; the small red circle", PAIR) == (2, 1, 1,
                                                                                        pytest.approx(1 / 3), False)
    # no mention at all
    assert _score("some shapes on a gray background", PAIR) == (0, 0, 2, 0.0, False)
    # three objects, sizes partly stated: 3 / (3 + 0)
    assert _score("Small green square, blue circle and a large purple triangle.", TRIPLE) == (3, 3, 0, 1.0, True)


def test_caption_attribute_accuracy_hand_check():
    pairs = [("a large red circle and an orange diamond", PAIR),  # 1.0, exact
             ("a red circle", PAIR),  # 1 / 2
             ("a large yellow triangle", SINGLE)]  # 0 / (1 + 1) = 0
    assert caption_attribute_accuracy(pairs) == {"accuracy": 50.0, "exact": 33.33, "n": 3}
    assert caption_attribute_accuracy(iter(pairs[:1])) == {"accuracy": 100.0, "exact": 100.0, "n": 1}
    with pytest.raises(ValueError, match="at least one"):
        caption_attribute_accuracy([])
