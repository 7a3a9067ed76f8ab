"""Instruction-tuning mixture: sqrt(size) sampling ratios, templates, task formatting, resumable draws."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from blip2.train import templates
from blip2.train.mixture import MixtureDataset, MixtureSampler, TaskDataset, mixture_probabilities


class Rows:
    """A stand-in raw dataset (the mixture only indexes it)."""

    def __init__(self, n, name="rows", **fields):
        self.n, self.name, self.fields = n, name, fields

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return {"image": f"{self.name}/{i}.jpg", "key": f"{self.name}/{i}", "epoch": 0, "index": i, **self.fields}


def _chi_square(counts, probs):
    expected = np.asarray(probs) * sum(counts)
    return float(((np.asarray(counts) - expected) ** 2 / expected).sum())


def test_sqrt_size_ratios():
    # sizes 100 / 400 / 900 -> sqrt 10 : 20 : 30
    s = MixtureSampler([100, 400, 900], seed=0, rank=0, world=1)
    np.testing.assert_allclose(s.probs, [10 / 60, 20 / 60, 30 / 60])
    it = iter(s)
    draws = [next(it) for _ in range(6000)]
    counts = np.bincount([d for d, _, _ in draws], minlength=3)
    assert _chi_square(counts, [1 / 6, 2 / 6, 3 / 6]) < 13.8  # chi-square, 2 dof, p = 0.001
    # a proportional-to-size mixture (1:4:9) is rejected by the same test: the test can fail
    assert _chi_square(counts, [1 / 14, 4 / 14, 9 / 14]) > 100
    # sample indices are uniform within a dataset
    idx = [i for d, i, _ in draws if d == 0]
    assert min(idx) >= 0 and max(idx) < 100
    assert _chi_square(np.bincount(np.array(idx) // 10, minlength=10), [0.1] * 10) < 27.9  # 9 dof, p = 0.001


def test_given_weights():
    np.testing.assert_allclose(mixture_probabilities([100, 400, 900], [1, 1, 2]), [0.25, 0.25, 0.5])
    with pytest.raises(ValueError, match="at least one sample"):
        mixture_probabilities([100, 0])
    with pytest.raises(ValueError, match="one non-negative weight"):
        mixture_probabilities([1, 2], [1])


def test_ranks_take_disjoint_draws_and_resume():
    r0, r1 = (MixtureSampler([5, 7], seed=1, rank=r, world=2) for r in (0, 1))
    it0, it1 = iter(r0), iter(r1)
    g0 = [next(it0)[2] for _ in range(10)]
    g1 = [next(it1)[2] for _ in range(10)]
    assert g0 == list(range(0, 20, 2)) and g1 == list(range(1, 20, 2))
    # uninterrupted vs interrupted after 6 consumed draws
    full = list(_take(MixtureSampler([5, 7], seed=1, rank=1, world=2), 16))
    s = MixtureSampler([5, 7], seed=1, rank=1, world=2)
    first = list(_take(s, 6))
    s.advance(6)
    resumed = MixtureSampler([5, 7], seed=1, rank=1, world=2)
    resumed.load_state_dict(s.state_dict())
    assert first + list(_take(resumed, 10)) == full
    with pytest.raises(ValueError, match="seed"):
        MixtureSampler([5, 7], seed=2, rank=1, world=2).load_state_dict(s.state_dict())


def _take(sampler, n):
    it = iter(sampler)
    return [next(it) for _ in range(n)]


def test_task_formatting():
    rng = np.random.default_rng(0)
    cap = TaskDataset(Rows(3, text="a cat"), "caption").format(0, rng)
    assert cap["instruction"] in templates.CAPTION_TEMPLATES and cap["text"] == "a cat"
    vqa = TaskDataset(Rows(3, question="what is it?", answers=["cat", "cat", "dog"]), "vqa",
                      templates=["Q: {Question} A:"])
    out = [vqa.format(0, rng) for _ in range(300)]
    assert out[0]["instruction"] == "Q: what is it? A:"
    share = np.mean([o["text"] == "cat" for o in out])
    assert abs(share - 2 / 3) < 4 * np.sqrt(2 / 9 / 300)  # answers drawn by annotator agreement
    qgen = TaskDataset(Rows(3, question="what is it?", answers=["cat"]), "qgen", templates=["Answer: {Answer}."])
    q = qgen.format(1, rng)
    assert (q["instruction"], q["text"]) == ("Answer: cat.", "what is it?")
    ins = TaskDataset(Rows(2, instruction="Describe the picture.", text="a cat"), "instruction").format(0, rng)
    assert (ins["instruction"], ins["text"]) == ("Describe the picture.", "a cat")
    with pytest.raises(KeyError, match="question"):
        TaskDataset(Rows(1, text="x"), "vqa").format(0, rng)


def test_every_template_is_drawn():
    ds = TaskDataset(Rows(50, text="a cat"), "caption", seed=0)
    drawn = {ds[i]["instruction"] for i in range(50)} | {ds.format(0, np.random.default_rng(k))["instruction"]
                                                         for k in range(200)}
    assert drawn == set(templates.CAPTION_TEMPLATES)


def test_mixture_dataset_is_deterministic_and_checks_held_out():
    mix = MixtureDataset([TaskDataset(Rows(4, "coco-caption", text="a cat"), "caption"),
                          TaskDataset(Rows(9, "vqav2", question="what?", answers=["cat"]), "vqa")], seed=3)
    draws = _take(mix.sampler(rank=0, world=1), 20)
    a = [mix[d] for d in draws]
    assert a == [mix[d] for d in draws]  # same draw, same sample (template included)
    assert {s["dataset"] for s in a} == {"coco-caption", "vqav2"}
    assert len({s["key"] for s in a}) == 20  # keys seed augmentation per draw
    with pytest.raises(ValueError, match="held-out"):
        MixtureDataset([TaskDataset(Rows(4, "GQA", text="x"), "caption")])


def test_template_lists_match_spec():
    assert (len(templates.CAPTION_TEMPLATES), len(templates.VQA_TEMPLATES), len(templates.QGEN_TEMPLATES)) == (
        13, 10, 6)
    assert len(templates.HELD_OUT) == 13 and not set(templates.HELD_IN) & set(templates.HELD_OUT)
    spec = next((p for p in (Path(__file__).parents[2] / "shared/SPEC.md", Path("/work/shared/SPEC.md"))
                 if p.is_file()), None)
    if spec is None:
        pytest.skip("shared/SPEC.md not found")
    text = spec.read_text()
    section = text[text.index("Captioning:"):text.index("## 6.")]
    # every backquoted template of SPEC §5 (minus the "<Image>" explanation), in order
    listed = [t for t in re.findall(r"`([^`]+)`", section)]
    ours = list(templates.CAPTION_TEMPLATES + templates.VQA_TEMPLATES + templates.QGEN_TEMPLATES)
    assert listed == ours


def test_mixture_through_dataloader_workers():
    from torch.utils.data import DataLoader

    mix = MixtureDataset([TaskDataset(Rows(4, "coco-caption", text="a cat"), "caption"),
                          TaskDataset(Rows(9, "okvqa", question="what?", answers=["cat"]), "vqa")], seed=1)
    sampler = mix.sampler(rank=1, world=2)
    loader = DataLoader(mix, batch_size=4, sampler=sampler, num_workers=2, collate_fn=list)
    it = iter(loader)
    got = [next(it) for _ in range(3)]
    expect = [mix[d] for d in _take(mix.sampler(rank=1, world=2), 12)]
    assert [s for b in got for s in b] == expect
