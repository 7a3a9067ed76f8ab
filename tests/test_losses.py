"""Stage-1 losses against hand computations (plain Python math, no torch loss functions)."""

from __future__ import annotations

import math

import torch

from blip2 import losses


def _ce_smoothed(logits: list[float], target: list[float], eps: float = 0.1) -> float:
    """Cross-entropy with label smoothing, by hand: q = (1 - eps) * target + eps / C; -sum q log softmax."""
    m = max(logits)
    lse = m + math.log(sum(math.exp(x - m) for x in logits))
    C = len(logits)
    return -sum(((1 - eps) * t + eps / C) * (x - lse) for x, t in zip(logits, target))


def test_itc_similarity_is_max_over_queries():
    img = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # 1 image, 2 queries
    txt = torch.tensor([[0.6, 0.8], [1.0, 0.0]])
    s = losses.itc_similarity(img, txt)
    torch.testing.assert_close(s, torch.tensor([[0.8, 1.0]]))


def test_itc_loss_by_hand():
    torch.manual_seed(0)
    img = torch.nn.functional.normalize(torch.randn(3, 2, 4), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    temp = torch.tensor(0.5)
    loss, sim_i2t, sim_t2i = losses.itc_loss(img, txt, temp)
    S = [[max(float(img[i, q] @ txt[j]) for q in range(2)) / 0.5 for j in range(3)] for i in range(3)]
    i2t = sum(_ce_smoothed(S[i], [float(i == j) for j in range(3)]) for i in range(3)) / 3
    t2i = sum(_ce_smoothed([S[i][j] for i in range(3)], [float(i == j) for i in range(3)]) for j in range(3)) / 3
    assert abs(loss.item() - (i2t + t2i) / 2) < 1e-5
    assert abs(sim_i2t[0, 1].item() - S[0][1]) < 1e-6 and abs(sim_t2i[0, 1].item() - S[1][0]) < 1e-6


def test_itc_soft_targets_when_image_ids_repeat():
    torch.manual_seed(1)
    img = torch.nn.functional.normalize(torch.randn(3, 2, 4), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(3, 4), dim=-1)
    ids = torch.tensor([7, 7, 9])  # texts 0 and 1 describe the same image
    loss, sim_i2t, sim_t2i = losses.itc_loss(img, txt, torch.tensor(1.0), losses.pair_positives(ids))
    target = [[0.5, 0.5, 0.0], [0.5, 0.5, 0.0], [0.0, 0.0, 1.0]]
    i2t = sum(_ce_smoothed(sim_i2t[i].tolist(), target[i]) for i in range(3)) / 3
    t2i = sum(_ce_smoothed(sim_t2i[i].tolist(), target[i]) for i in range(3)) / 3
    assert abs(loss.item() - (i2t + t2i) / 2) < 1e-5


def test_hard_negatives_follow_softmax_and_skip_positives():
    sim = torch.tensor([[0.0, 2.0, 0.0, 0.0], [1.0, 0.0, 1.0, 1.0], [0.0, 0.0, 0.0, 3.0], [5.0, 5.0, 5.0, 5.0]])
    g = torch.Generator().manual_seed(0)
    counts = torch.zeros(4, 4)
    for _ in range(4000):
        neg_t, _ = losses.sample_hard_negatives(sim, sim, generator=g)
        counts[torch.arange(4), neg_t] += 1
    assert counts.diagonal().sum() == 0  # a positive is never a negative
    p = counts / counts.sum(1, keepdim=True)
    # row 0: softmax over {1: 2.0, 2: 0, 3: 0} by hand
    e = [math.exp(2.0), 1.0, 1.0]
    expected = [x / sum(e) for x in e]
    assert all(abs(p[0, j + 1].item() - expected[j]) < 0.03 for j in range(3))
    assert all(abs(p[3, j].item() - 1 / 3) < 0.03 for j in range(3))


def test_hard_negatives_exclude_same_image_ids():
    sim = torch.zeros(4, 4)
    ids = torch.tensor([0, 0, 1, 1])
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        neg_t, neg_i = losses.sample_hard_negatives(sim, sim, losses.pair_positives(ids), generator=g)
        assert (ids[neg_t] != ids).all() and (ids[neg_i] != ids).all()


def test_identical_captions_of_different_images_are_positives_not_negatives():
    """Pairs 0 and 2 show different pictures with the same caption (padding differs in length only where the
    mask is 0): each text is a soft ITC target of both images and never a hard negative of either."""
    ids = torch.tensor([[101, 5, 6, 102, 0], [101, 7, 102, 0, 0], [101, 5, 6, 102, 9], [101, 8, 102, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 0, 0]])
    image_ids = torch.tensor([0, 1, 2, 3])
    pos = losses.pair_positives(image_ids, ids, mask)
    expected = torch.eye(4, dtype=torch.bool)
    expected[0, 2] = expected[2, 0] = True
    assert torch.equal(pos, expected)
    torch.manual_seed(2)
    img = torch.nn.functional.normalize(torch.randn(4, 2, 4), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(4, 4), dim=-1)
    loss, sim_i2t, sim_t2i = losses.itc_loss(img, txt, torch.tensor(1.0), pos)
    target = [[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0.5, 0, 0.5, 0], [0, 0, 0, 1]]
    i2t = sum(_ce_smoothed(sim_i2t[i].tolist(), target[i]) for i in range(4)) / 4
    t2i = sum(_ce_smoothed(sim_t2i[i].tolist(), target[i]) for i in range(4)) / 4
    assert abs(loss.item() - (i2t + t2i) / 2) < 1e-5
    sim = torch.zeros(4, 4)
    sim[0, 2] = sim[2, 0] = 50.0  # the shared caption would be by far the hardest negative
    g = torch.Generator().manual_seed(0)
    for _ in range(200):
        neg_t, neg_i = losses.sample_hard_negatives(sim, sim, pos, generator=g)
        assert not pos[torch.arange(4), neg_t].any() and not pos[torch.arange(4), neg_i].any()


def test_a_batch_of_one_caption_keeps_its_other_images_as_negatives():
    ids = torch.tensor([[101, 5, 102]] * 3)
    pos = losses.pair_positives(torch.tensor([0, 1, 2]), ids, torch.ones(3, 3, dtype=torch.long))
    assert torch.equal(pos, torch.eye(3, dtype=torch.bool))


def test_itm_loss_by_hand():
    logits = torch.tensor([[0.0, 2.0], [1.0, 0.0], [0.5, 0.5]])  # rows: positive, negative, negative
    expected = (-math.log(math.exp(2) / (1 + math.exp(2))) - math.log(math.exp(1) / (math.exp(1) + 1))
                + math.log(2)) / 3
    assert abs(losses.itm_loss(logits).item() - expected) < 1e-6


def test_itg_loss_by_hand_smoothed_token_mean():
    logits = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [0.0, 0.0, 0.0]])  # (N=3 tokens, V=3)
    targets = torch.tensor([1, 1, -100])  # the third is ignored
    expected = (_ce_smoothed([1.0, 0.0, 0.0], [0, 1, 0]) + _ce_smoothed([0.0, 2.0, 0.0], [0, 1, 0])) / 2
    assert abs(losses.itg_loss(logits, targets).item() - expected) < 1e-6
