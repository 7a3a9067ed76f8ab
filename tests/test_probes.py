"""Linear probes: labels from hand-written scenes, exact-set scoring by hand, probes that must find a planted
signal and must not find one in noise, feature shapes from tiny random models, and probe_report end to end."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import blip2
from blip2.data import shapes
from blip2.data.shapes import Obj, Scene
from blip2.data.world import write_world
from blip2.prompts import pre_question
from blip2.quickstart import probes
from blip2.quickstart.probes import (LABELS, answer_probe_report, answer_probe_table, chance_accuracy,
                                     encoder_features, exact_set_accuracy, linear_probe, pixel_features,
                                     probe_report, probe_table, query_features, question_query_features,
                                     scene_labels)
from fixtures import make_bert_tokenizer
from hf_models import NUM_QUERY, QFORMER, VISION, checkpoint_with_processor, retrieval_hf


# ------------------------------------------------------------------------------------------------ labels
def test_scene_labels_by_hand():
    scenes = [Scene((Obj("circle", "red", "small", 0, 0),)),
              Scene((Obj("diamond", "orange", "large", 2, 2), Obj("circle", "blue", "small", 0, 1),
                     Obj("diamond", "blue", "large", 1, 1)))]
    got = scene_labels(scenes)
    # COLOURS: red green blue yellow purple orange; SHAPES: circle square triangle diamond
    np.testing.assert_array_equal(got["colours"], [[1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 1]])
    np.testing.assert_array_equal(got["shapes"], [[1, 0, 0, 0], [1, 0, 0, 1]])
    pairs = np.zeros((2, 24))
    pairs[0, 0] = 1  # red circle: colour 0 * 4 + shape 0
    pairs[1, [8, 11, 23]] = 1  # blue circle 2*4+0, blue diamond 2*4+3, orange diamond 5*4+3
    np.testing.assert_array_equal(got["pairs"], pairs)
    np.testing.assert_array_equal(got["count"], [0, 2])


# ------------------------------------------------------------------------------------------------ scoring
def test_exact_set_accuracy_by_hand():
    probs = [[0.9, 0.2], [0.6, 0.7], [0.4, 0.1], [0.5, 0.0]]
    true = [[1, 0], [1, 0], [0, 0], [1, 0]]
    # right; an extra label; right (both empty); 0.5 is not above 0.5, so the set is empty
    assert exact_set_accuracy(probs, true) == pytest.approx(50.0)


def test_chance_accuracy_by_hand():
    train = np.array([[1, 0], [1, 0], [0, 1]])
    test = np.array([[1, 0], [0, 1], [1, 1], [1, 0]])
    assert chance_accuracy(train, test, multilabel=True) == pytest.approx(50.0)  # the majority set is {0}
    assert chance_accuracy([2, 2, 0], [2, 1, 0, 0, 2], multilabel=False) == pytest.approx(40.0)


# ------------------------------------------------------------------------------------------------- probes
def _world_labels(n: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return scene_labels([shapes.sample_scene(rng) for _ in range(n)])


def _one_hot(y: np.ndarray, multilabel: bool) -> np.ndarray:
    return y if multilabel else np.eye(int(y.max()) + 1, dtype=np.float32)[y]


@pytest.mark.parametrize("label", LABELS)
def test_probe_finds_a_linearly_planted_label(label):
    labels = _world_labels(700)
    multilabel = label != "count"
    y = labels[label]
    rng = np.random.default_rng(1)
    hot = _one_hot(y, multilabel)
    x = hot @ rng.normal(size=(hot.shape[1], 64)) + 0.5 * rng.normal(size=(len(y), 64))  # a random linear map + noise
    acc = linear_probe(x[:500], y[:500], x[500:], y[500:], multilabel)
    assert acc >= 95.0, (label, acc)


def test_probe_on_noise_stays_at_chance():
    rng = np.random.default_rng(2)
    # independent labels, one mostly on: the majority set {0} is also what a probe of noise predicts
    y = (rng.random((1500, 3)) < [0.85, 0.1, 0.05]).astype(np.float32)
    x = rng.normal(size=(1500, 200))
    acc, chance = linear_probe(x[:1000], y[:1000], x[1000:], y[1000:], True), chance_accuracy(y[:1000], y[1000:], True)
    assert abs(acc - chance) <= 4.0, (acc, chance)
    count = _world_labels(1500)["count"]
    acc, chance = (linear_probe(x[:1000], count[:1000], x[1000:], count[1000:], False),
                   chance_accuracy(count[:1000], count[1000:], False))
    assert abs(acc - chance) <= 6.0, (acc, chance)  # 3 balanced classes on 500 test scenes: sd ~2 points


def test_preconditioned_fit_reaches_the_optimum_on_correlated_features():
    """The probe solver against Newton's method on the plain objective loss + l2 * ||W||^2 in float64, on nearly
    collinear features (rank 10 of 100, plus a little noise), as one model's features are. L-BFGS on W itself
    stalls far from the optimum there; the preconditioned fit must not."""
    from blip2.quickstart.probes import _fit, _preconditioners, _start

    g = torch.Generator().manual_seed(5)
    x = torch.randn(400, 10, generator=g) @ torch.randn(10, 100, generator=g)  # (400, 100), rank 10
    x = x + 0.01 * torch.randn(400, 100, generator=g)
    x = (x - x.mean(0)) / x.std(0)
    y = (torch.rand(400, 1, generator=g) < torch.sigmoid(3 * (x[:, :1] - x[:, 1:2]))).float()
    l2, xd, yd = 1e-4, x.double(), y.double()[:, 0]

    def objective(theta):  # theta = [W (100), b]
        logits = xd @ theta[:100] + theta[100]
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, yd) + l2 * theta[:100].square().sum()

    best = torch.zeros(101, dtype=torch.float64)
    for _ in range(40):
        step = torch.linalg.solve(torch.autograd.functional.hessian(objective, best),
                                  torch.autograd.functional.jacobian(objective, best))
        best = best - step

    def gap(L):
        W, b = _fit(x, y, True, l2, L, _start(y, True, 1, 100), max_iter=200)
        return (objective(torch.cat([W[:, 0], b]).double()) - objective(best)).item(), W[:, 0].double()

    ours, W = gap(_preconditioners(x, [l2])[l2])
    assert ours < 1e-5
    torch.testing.assert_close(W, best[:100], atol=2e-2, rtol=0)
    assert gap(torch.eye(100))[0] > 10 * ours  # without the preconditioner: the same fit stops far off


def test_probe_is_deterministic_and_reads_the_test_set_only_to_score():
    labels = _world_labels(400)
    y = labels["shapes"]
    x = y @ np.random.default_rng(3).normal(size=(4, 32)) + 3 * np.random.default_rng(4).normal(size=(400, 32))
    a = linear_probe(x[:300], y[:300], x[300:], y[300:], True)
    assert a == linear_probe(x[:300], y[:300], x[300:], y[300:], True)
    # the probe (and its regularisation) comes from the training set alone: the score on the whole test set is
    # the mean of the scores on its two halves
    halves = [linear_probe(x[:300], y[:300], x[s:s + 50], y[s:s + 50], True) for s in (300, 350)]
    assert a == pytest.approx(sum(halves) / 2)
    assert 0 < a < 100  # not trivially so


# ------------------------------------------------------------------------------------------------ features
@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny stage-1 (retrieval) checkpoint and a tiny InstructBLIP one, each with its tokenizer(s)."""
    from transformers import AutoTokenizer

    root = tmp_path_factory.mktemp("probe-models")
    stage1 = root / "stage1"
    retrieval_hf().save_pretrained(stage1)
    AutoTokenizer.from_pretrained(make_bert_tokenizer(root / "_bert", vocab_size=120)).save_pretrained(stage1)
    checkpoint_with_processor("instructblip-opt", root / "instruct")
    return {"stage 1": stage1, "final": root / "instruct"}


def test_pixel_features_shape():
    px = torch.randn(5, 3, 64, 64)
    out = pixel_features(px)
    assert out.shape == (5, 192)
    torch.testing.assert_close(out[:, 0], px[:, 0, :8, :8].mean((1, 2)))  # channel 0, top-left 8x8 block


def test_encoder_and_query_features(models):
    stage1, final = blip2.load(models["stage 1"]), blip2.load(models["final"])
    px = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    H = QFORMER["hidden_size"]
    final.train()
    enc = encoder_features(final, px, batch_size=2)
    assert enc.shape == (5, 2 * VISION["hidden_size"]) and enc.dtype == torch.float32
    assert final.training  # the mode is restored
    assert query_features(stage1, px, None, batch_size=2).shape == (5, NUM_QUERY * H)
    instructed = query_features(final, px, "A short image caption:", batch_size=2)
    assert instructed.shape == (5, NUM_QUERY * H)
    torch.testing.assert_close(instructed, query_features(final, px, "A short image caption:", batch_size=8))
    assert not torch.allclose(instructed, query_features(final, px, None))  # the instruction enters the Q-Former
    with pytest.raises(ValueError, match="InstructBLIP"):
        query_features(stage1, px, "A short image caption:")


# -------------------------------------------------------------------------------------------------- report
def test_probe_report_end_to_end(models, tmp_path):
    world = tmp_path / "world"
    write_world(world, n_train=40, n_val=4, n_test=16)
    report = probe_report(world, models, device="cpu", max_iter=20, progress=True)  # 40 scenes: a short fit is enough
    assert set(report) == {"labels", "n_train", "n_test", "chance", "rows", "seconds"}
    assert report["labels"] == list(LABELS) and (report["n_train"], report["n_test"]) == (40, 16)
    assert list(report["rows"]) == ["pixels (8x8)", "frozen encoder", "stage 1 queries", "final queries"]
    for row in [report["chance"], *report["rows"].values()]:
        assert list(row) == list(LABELS)
        assert all(0.0 <= v <= 100.0 and v == round(v, 1) for v in row.values())
    lines = probe_table(report)
    assert lines[0] == "| representation | colours | shapes | pairs | count |"
    assert lines[2].startswith("| chance") and any(line.startswith("| final queries |") for line in lines)


# -------------------------------------------------------------------------------------------- answer probes
def test_question_query_features_give_each_row_its_own_question(models, tmp_path):
    final = blip2.load(models["final"])
    world = tmp_path / "world"
    write_world(world, n_train=8, n_val=2, n_test=4)
    image = str(world / "images" / "train" / "000000.png")
    questions = ["What color is the square?", "How many objects are there?", "What color is the square?"]
    got = question_query_features(final, [image] * 3, questions, batch_size=2)
    assert got.shape == (3, NUM_QUERY * QFORMER["hidden_size"])
    torch.testing.assert_close(got[0], got[2])  # same image, same question, across batches
    assert not torch.allclose(got[0], got[1])  # the question enters the Q-Former
    for i, q in enumerate(questions[:2]):  # exactly the queries model.answer's prompt gives them
        text = f"Question: {pre_question(q)} Short answer:"
        torch.testing.assert_close(got[i], query_features(final, final.pixel_values([image]), text)[0])
    with pytest.raises(ValueError, match="InstructBLIP"):
        question_query_features(blip2.load(models["stage 1"]), [image], questions[:1])
    with pytest.raises(ValueError, match="2 images but 1 questions"):
        question_query_features(final, [image, image], questions[:1])


def _answer_lookup(world):
    import json

    table = {}
    for path in (world / "vqa").glob("*.json"):
        for r in json.loads(path.read_text()):
            table[(str(world / r["image"]), r["question"])] = r["answer"][0]
    return table


def test_answer_probe_pairs_each_question_with_its_answer(models, tmp_path, monkeypatch):
    """With features that carry the answer by construction (looked up from the world's files by image and
    question), the probe must reach 100 %; with noise, about the majority answer. A row paired with another
    row's answer would fail the first."""
    import json

    world = tmp_path / "world"
    write_world(world, n_train=60, n_val=4, n_test=30)
    lookup = _answer_lookup(world)
    vocab = sorted(set(lookup.values()))
    test = [r for fam in ("colour", "count") for r in json.loads((world / "vqa" / f"test_{fam}.json").read_text())]

    def planted(model, images, questions, **_):
        return torch.tensor([[4.0 * (a == lookup[(img, q)]) for a in vocab] for img, q in zip(images, questions)])

    monkeypatch.setattr(probes, "question_query_features", planted)
    report = answer_probe_report(world, models["final"], test, ["colour", "count"], max_train=10**6, max_iter=50)
    assert set(report) == {"families", "max_train", "seconds"} and list(report["families"]) == ["colour", "count"]
    for fam, row in report["families"].items():
        answers = [r["answer"][0] for r in test if r["question_type"] == fam]
        train = [r["answer"][0] for r in json.loads((world / "vqa" / f"train_{fam}.json").read_text())]
        assert (row["n_train"], row["n_test"]) == (len(train), len(answers))
        assert row["probe"] == 100.0, (fam, row)
        top = max(sorted(set(train)), key=train.count)  # the most frequent training answer (first on ties)
        assert row["majority"] == round(100.0 * answers.count(top) / len(answers), 1)
    sampled = answer_probe_report(world, models["final"], test, ["count"], max_train=20)["families"]["count"]
    assert sampled["n_train"] == 20

    g = torch.Generator().manual_seed(0)
    monkeypatch.setattr(probes, "question_query_features", lambda model, images, questions, **_:
                        torch.randn(len(images), 32, generator=g))
    noise = answer_probe_report(world, models["final"], test, ["count"], max_train=10**6, max_iter=50)["families"]
    assert abs(noise["count"]["probe"] - noise["count"]["majority"]) <= 25.0, noise
    lines = answer_probe_table(report, {"colour": 55.0})
    assert lines[2].startswith("| colour | 100.0 | 55.0 |") and lines[3].startswith("| count | 100.0 | n/a |")
    with pytest.raises(ValueError, match="family 'shape'"):
        answer_probe_report(world, models["final"], test, ["shape"], max_train=50)
