"""Caption metrics against the COCO caption toolkit run directly; VQAv2 normalisation and accuracy against hand-worked
cases (recall@K is tested in test_retrieval.py)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import pytest

from blip2.metrics import (CAPTION_METRICS, caption_scores, exact_match, find_java, normalize_vqa_answer,
                           vqa_accuracy, vqa_item_score, vqa_scores)

# ---------------------------------------------------------------------------------------------- captioning
# ids of mixed types, several references per image, punctuation and capitals for the PTB tokenizer, one caption
# that shares nothing with its references and one empty prediction
REFERENCES = {
    1: ["A cat sits on a red couch.", "a black cat on the sofa", "A cat is lying on a couch!"],
    "b": ["Two dogs play with a ball, in the park.", "dogs playing in the grass", "two dogs and a ball"],
    3: ["a man riding a bicycle down a city street", "A man on a bike."],
    4: ["a plate of food with rice and vegetables", "rice and vegetables on a plate"],
    5: ["a red bus parked at the side of the road"],
}
PREDICTIONS = {1: "a black cat on a red couch", "b": "two dogs playing with a ball in a park",
               3: "a man riding a bike on a street", 4: "an astronaut standing next to a flag", 5: ""}


def _toolkit_directly(predictions, references):
    """pycocoevalcap's scorers called as its COCOEvalCap calls them (without SPICE)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in refs] for k, refs in references.items()})
    res = tok.tokenize({k: [{"caption": c}] for k, c in predictions.items()})
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    meteor = Meteor()
    out = {"BLEU-1": bleu[0], "BLEU-2": bleu[1], "BLEU-3": bleu[2], "BLEU-4": bleu[3],
           "METEOR": meteor.compute_score(gts, res)[0], "ROUGE-L": Rouge().compute_score(gts, res)[0],
           "CIDEr": Cider().compute_score(gts, res)[0]}
    del meteor
    return out


def test_caption_scores_equal_the_toolkit_run_directly():
    # the toolkit breaks lines inside a caption onto the next image; ours keeps "\u2028" inside its caption, so
    # the direct run gets the same caption with a plain space
    ours_in = {**PREDICTIONS, 3: "a man riding\u2028a bike on a street"}
    with ThreadPoolExecutor(2) as pool:  # METEOR's Java start-up takes seconds: run both at once
        ours = pool.submit(caption_scores, ours_in, REFERENCES)
        ref = pool.submit(_toolkit_directly, PREDICTIONS, REFERENCES)
        ours, ref = ours.result(), ref.result()
    assert list(ours) == [*CAPTION_METRICS, "SPICE"] and ours["SPICE"] is None
    for name in CAPTION_METRICS:
        assert ours[name] == pytest.approx(ref[name], abs=1e-12), name
    assert 0.1 < ours["BLEU-1"] < 1 and ours["CIDEr"] > 0.1  # a real, non-degenerate toy set


def test_caption_scores_bad_input_and_missing_java(monkeypatch):
    with pytest.raises(ValueError, match="no references"):
        caption_scores({1: "a cat", 2: "a dog"}, {1: ["a cat"]})
    with pytest.raises(ValueError, match="empty reference list"):
        caption_scores({1: "a cat"}, {1: []})
    with pytest.raises(ValueError, match="no predictions"):
        caption_scores({}, {})
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("JAVA_HOME", raising=False)
    with pytest.raises(RuntimeError, match="apt-get install -y default-jre-headless"):
        find_java()
    with pytest.raises(RuntimeError, match="need Java"):
        caption_scores({1: "a cat"}, {1: ["a cat"]})


# ----------------------------------------------------------------------------------------------------- VQA
@pytest.mark.parametrize("raw, expected", [
    ("Two.", "2"),  # trailing period dropped, number word -> digit
    ("3,000", "3000"),  # comma between digits: every punctuation mark is deleted
    ("1,000 dogs!", "1000 dogs"),
    ("t-shirt", "t shirt"),  # a mark touching no space becomes a space
    ("red,white", "red white"),
    ("yes, it is", "yes it is"),  # a mark touching a space is deleted
    ("The Dog!", "dog"),  # lower case, article dropped
    ("an apple", "apple"),
    ("2.5", "2.5"),  # a period before a digit stays
    ("none", "0"),
    ("Ten\n", "10"),
    ("dont", "don't"),  # contractions get their apostrophe back
    ("couldnt've", "couldn't've"),
    ("couldn'tve", "couldn't've"),
    ("im", "im"),  # the official table's "Im" key is capitalised and never matches lower-cased text
    ("somebody'd", "somebodyd"),  # the official table's backwards entry
    ("hot dog(s)", "hot dog s"),
    ("  a   man's  hat ", "man's hat"),
])
def test_normalize_vqa_answer_hand_cases(raw, expected):
    assert normalize_vqa_answer(raw) == expected


@pytest.mark.parametrize("k, expected", [
    # 10 humans, k of them gave the prediction. Each of the 10 leave-one-out subsets scores min(1, matches / 3):
    # the k subsets that leave out an agreeing human have k - 1 matches, the other 10 - k have k.
    (0, 0.0),
    (1, (1 * 0 + 9 * (1 / 3)) / 10),  # = 0.3
    (2, (2 * (1 / 3) + 8 * (2 / 3)) / 10),  # = 0.6
    (3, (3 * (2 / 3) + 7 * 1) / 10),  # = 0.9
    (4, (4 * 1 + 6 * 1) / 10),  # = 1.0
    (10, 1.0),
])
def test_vqa_accuracy_leave_one_out(k, expected):
    assert expected == pytest.approx([0.0, 0.3, 0.6, 0.9, 1.0, 1.0][[0, 1, 2, 3, 4, 10].index(k)])
    answers = ["cat"] * k + ["dog"] * (10 - k)
    assert vqa_accuracy("Cat.", answers) == pytest.approx(expected)


def test_vqa_accuracy_processes_human_answers_as_the_official_tool():
    # humans disagree -> their answers lose punctuation too: 3 of 10 say "t shirt" -> 0.9
    assert vqa_accuracy("T-Shirt", ["t-shirt"] * 3 + ["shirt"] * 7) == pytest.approx(0.9)
    # humans agree -> their answers are compared as they are (VQAv2's are normalised already): no match
    assert vqa_accuracy("T-Shirt", ["t-shirt"] * 10) == 0.0
    assert vqa_accuracy("none", ["none"] * 10) == 0.0  # the prediction becomes "0", the humans' "none" does not
    # raw human answers: normalise them fully
    assert vqa_accuracy("T-Shirt", ["T-Shirt"] * 10, normalize_answers=True) == 1.0
    assert vqa_accuracy("two", ["Two"] * 2 + ["3"] * 8, normalize_answers=True) == pytest.approx(0.6)
    # 5 humans (OK-VQA style): 2 agree -> (2 * 1/3 + 3 * 2/3) / 5
    assert vqa_accuracy("cat", ["cat", "cat", "dog", "dog", "dog"]) == pytest.approx((2 / 3 + 2) / 5)
    with pytest.raises(ValueError, match="non-empty"):
        vqa_accuracy("cat", [])


def test_exact_match_and_item_score():
    assert exact_match("Yes.", "yes") == 1.0 and exact_match("the table", "table") == 1.0
    assert exact_match("Two", "2") == 1.0 and exact_match("yes", "no") == 0.0
    assert exact_match("left", "Left") == 0.0 and exact_match("left", "Left", normalize_answers=True) == 1.0
    assert vqa_item_score("yes", "yes") == 1.0 and vqa_item_score("yes", ["yes"]) == 1.0  # one answer: exact
    assert vqa_item_score("yes", ["yes", "no"]) == pytest.approx(0.5 * (0 + 1 / 3))  # several: leave-one-out


def test_vqa_scores_aggregates_by_type():
    preds = {"q1": "red", "q2": "Yes", "q3": "four", "q4": "two"}
    answers = {"q1": ["red"] * 2 + ["blue"] * 8,  # 0.6
               "q2": "yes",  # GQA-style single answer: exact match, 1.0
               "q3": ["4"] * 10,  # 1.0
               "q4": ["3"] * 10}  # 0.0
    qtypes = {"q1": "what color", "q2": "is the", "q3": "how many", "q4": "how many"}
    atypes = {"q1": "other", "q2": "yes/no", "q3": "number", "q4": "number"}
    out = vqa_scores(preds, answers, qtypes, atypes)
    assert out["accuracy"] == pytest.approx(100 * (0.6 + 1 + 1 + 0) / 4)
    assert out["count"] == 4 and out["scored_by"] == {"vqa_accuracy": 3, "exact_match": 1}
    assert out["per_question_type"] == pytest.approx({"how many": 50.0, "is the": 100.0, "what color": 60.0})
    assert out["per_answer_type"] == pytest.approx({"number": 50.0, "other": 60.0, "yes/no": 100.0})
    assert out["per_item"] == pytest.approx({"q1": 0.6, "q2": 1.0, "q3": 1.0, "q4": 0.0})
    assert "per_question_type" not in vqa_scores(preds, answers)
    with pytest.raises(ValueError, match="has no answers"):
        vqa_scores({"q9": "x"}, answers)
