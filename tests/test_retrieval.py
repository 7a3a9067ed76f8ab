"""Retrieval: recall@K against hand-computed percentages; the ITC -> ITM re-ranking score matrix against a
reference built from transformers' Blip2ForImageTextRetrieval; chunking, image sources and two processes."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest
import torch

import blip2
from blip2.metrics import recall_at_k
from blip2.retrieval import score_matrix
from hf_models import pixels, retrieval_hf, text_ids

N_IMG, N_TXT, K = 6, 9, 3


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops on a busy 2-core machine spend milliseconds in OpenMP barriers; one thread is 100x faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.no_grad():
        yield
    torch.set_num_threads(n)


# ------------------------------------------------------------------------------------------------ recall@K
# 3 images x 6 captions; captions 2i and 2i+1 belong to image i. Ranks (0 = first) worked out by hand:
# i2t: image 0's caption 0 is first; image 1's best caption (3, 0.5) is behind captions 0 and 1 -> rank 2;
#      image 2's best caption (4, 0.6) is behind 1, 2, 3 -> rank 3.
I2T = [[0.9, 0.1, 0.8, 0.3, 0.2, 0.05],
       [0.7, 0.6, 0.2, 0.5, 0.1, 0.4],
       [0.3, 0.9, 0.8, 0.7, 0.6, 0.1]]
# t2i ranks of the true image: captions 0..5 -> 0, 2, 0, 1, 0, 2
T2I = [[0.9, 0.1, 0.2], [0.2, 0.5, 0.4], [0.3, 0.6, 0.1], [0.7, 0.6, 0.1], [0.1, 0.2, 0.3], [0.5, 0.4, 0.3]]
IMG2TXT = [[0, 1], [2, 3], [4, 5]]
TXT2IMG = [0, 0, 1, 1, 2, 2]


def test_recall_at_k_hand_computed():
    r = recall_at_k(torch.tensor(I2T), torch.tensor(T2I), IMG2TXT, TXT2IMG, ks=(1, 2, 3))
    expected = {"i2t_r1": 100 / 3, "i2t_r2": 100 / 3, "i2t_r3": 200 / 3, "i2t_mean": 400 / 9,
                "t2i_r1": 50.0, "t2i_r2": 200 / 3, "t2i_r3": 100.0, "t2i_mean": 650 / 9, "mean": 1050 / 18}
    assert r.keys() == expected.keys()
    for key, v in expected.items():
        assert r[key] == pytest.approx(v, abs=1e-4), key


def test_recall_at_k_default_ks_numpy_and_names():
    r = recall_at_k(np.array(I2T), np.array(T2I), IMG2TXT, TXT2IMG)
    assert list(r) == ["i2t_r1", "i2t_r5", "i2t_r10", "i2t_mean", "t2i_r1", "t2i_r5", "t2i_r10", "t2i_mean", "mean"]
    assert r["i2t_r1"] == pytest.approx(100 / 3, abs=1e-4) and r["i2t_r5"] == r["i2t_r10"] == 100.0
    assert r["t2i_r1"] == pytest.approx(50.0) and r["t2i_r5"] == 100.0
    assert r["mean"] == pytest.approx((100 / 3 + 50 + 400) / 6, abs=1e-4)


def test_recall_ties_and_minus_inf_count_against_the_ground_truth():
    # image 0's caption (2) is outside the re-ranked top k (-inf) and tied with caption 1: not in the top 2
    i2t = [[5.0, -math.inf, -math.inf], [-math.inf, 2.0, 1.0]]  # image 1: caption 1 first
    t2i = [[0.0, 1.0], [0.0, 1.0], [1.0, 1.0]]  # caption 2 ties between its image 0 and image 1
    r = recall_at_k(i2t, t2i, [[2], [0, 1]], [1, 1, 0], ks=(1, 2, 3))
    assert (r["i2t_r1"], r["i2t_r2"], r["i2t_r3"]) == (50.0, 50.0, 100.0)
    assert r["t2i_r1"] == pytest.approx(200 / 3) and r["t2i_r2"] == 100.0


def test_recall_bad_inputs():
    with pytest.raises(ValueError, match="t2i must be"):
        recall_at_k(torch.zeros(3, 6), torch.zeros(3, 6), IMG2TXT, TXT2IMG)
    with pytest.raises(ValueError, match="img2txt has 2"):
        recall_at_k(torch.zeros(3, 6), torch.zeros(6, 3), IMG2TXT[:2], TXT2IMG)
    with pytest.raises(ValueError, match="no captions"):
        recall_at_k(torch.zeros(3, 6), torch.zeros(6, 3), [[0, 1], [], [2, 3, 4, 5]], TXT2IMG)


# -------------------------------------------------------------------------------------------- score matrix
@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    hf = retrieval_hf()
    d = tmp_path_factory.mktemp("itm")
    hf.save_pretrained(d)
    px = pixels(N_IMG)
    ids = text_ids(N_TXT, 8, 120)
    mask = torch.ones_like(ids)
    for j, length in enumerate([8, 5, 3, 6, 2, 7, 4, 5, 3]):  # right padding of varied lengths
        mask[j, length:] = 0
    return hf, blip2.load(d), px, ids, mask


def _reference(hf, px, ids, mask, k):
    """The protocol computed from transformers: every pair's ITM logit and ITC similarity, -inf off the top k."""
    ni, nt = px.shape[0], ids.shape[0]
    itc = hf(pixel_values=px, input_ids=ids, attention_mask=mask).logits_per_image  # (ni, nt), no temperature
    itm = hf(pixel_values=px.repeat_interleave(nt, 0), input_ids=ids.repeat(ni, 1), attention_mask=mask.repeat(ni, 1),
             use_image_text_matching_head=True).logits_per_image[:, 1].view(ni, nt)  # row i*nt + j = (i, j)
    full = itm + itc

    def keep_top(scores, sim):
        top = sim.topk(min(k, sim.shape[1]), dim=1).indices
        return torch.full_like(scores, -torch.inf).scatter(1, top, scores.gather(1, top))

    return keep_top(full, itc), keep_top(full.t(), itc.t())


def _assert_same(a, b, what: str = ""):
    """Same -inf pattern (the same top-k candidates) and the same finite scores."""
    assert torch.equal(a.isinf(), b.isinf()), f"{what}: different candidates"
    torch.testing.assert_close(a[a.isfinite()], b[b.isfinite()], atol=1e-5, rtol=1e-5, msg=what or None)


def test_score_matrix_matches_transformers_reference(setup):
    hf, model, px, ids, mask = setup
    i2t, t2i = score_matrix(model, px, ids, mask, k=K, batch_size=4, progress=False)
    ref_i2t, ref_t2i = _reference(hf, px, ids, mask, K)
    assert i2t.shape == (N_IMG, N_TXT) and t2i.shape == (N_TXT, N_IMG)
    assert (i2t.isfinite().sum(1) == K).all() and (t2i.isfinite().sum(1) == K).all()
    assert i2t.isneginf().sum() == N_IMG * (N_TXT - K)  # everything else is -inf
    _assert_same(i2t, ref_i2t)
    _assert_same(t2i, ref_t2i)


def test_reranked_entries_pair_by_pair(setup):
    """A few entries of each direction against the model's own one-pair methods (itm_logits, itc_scores)."""
    _, model, px, ids, mask = setup
    i2t, t2i = score_matrix(model, px, ids, mask, k=K, batch_size=4, progress=False)
    pairs = [(i, int(i2t[i].argmax())) for i in (0, 3, 5)] + [(int(t2i[j].argmax()), j) for j in (1, 4, 8)]
    for i, j in pairs:
        p, t, m = px[i:i + 1], ids[j:j + 1], mask[j:j + 1]
        expected = model.itm_logits(p, t, m)[0, 1] + model.itc_scores(p, t, m)[0, 0]
        got = i2t[i, j] if i2t[i, j].isfinite() else t2i[j, i]
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_k_at_least_gallery_scores_everything(setup):
    hf, model, px, ids, mask = setup
    i2t, t2i = score_matrix(model, px, ids, mask, k=100, progress=False)
    assert i2t.isfinite().all() and t2i.isfinite().all()
    torch.testing.assert_close(t2i, i2t.t())  # every pair scored once, the same in both directions
    _assert_same(i2t, _reference(hf, px, ids, mask, 100)[0])


def test_chunked_equals_unchunked_and_image_sources(setup):
    _, model, px, ids, mask = setup
    ref = score_matrix(model, px, ids, mask, k=K, batch_size=64, progress=False)
    batches = [px[:4], px[4:5], px[5:]]  # uneven batches
    runs = {
        "tensor, batch 1": score_matrix(model, px, ids, mask, k=K, batch_size=1, progress=False),
        "list of dicts": score_matrix(model, [{"pixel_values": b} for b in batches], ids, mask, k=K, batch_size=3,
                                      progress=False),
        "callable of tuples": score_matrix(model, lambda: ((b, None) for b in batches), ids, mask, k=K,
                                           batch_size=2, progress=False),
        "generator, cached": score_matrix(model, iter(batches), ids, mask, k=K, batch_size=5, progress=False,
                                          cache_image_features=True),
    }
    for name, (i2t, t2i) in runs.items():
        _assert_same(i2t, ref[0], f"{name}: i2t")
        _assert_same(t2i, ref[1], f"{name}: t2i")


def test_score_matrix_errors(setup):
    _, model, px, ids, mask = setup
    with pytest.raises(ValueError, match="one-shot iterator"):
        score_matrix(model, iter([px]), ids, mask, progress=False)
    with pytest.raises(ValueError, match="stage-1 heads"):
        score_matrix(SimpleNamespace(cfg=SimpleNamespace(stage1_heads=False)), px, ids, mask)
    with pytest.raises(TypeError, match="image batch"):
        score_matrix(model, [px[0]], ids, mask, progress=False)
    walks = iter([[px[:3], px[3:]], [px[:2], px[2:]]])  # a loader that changes its batches between walks
    with pytest.raises(ValueError, match="second walk"):
        score_matrix(model, lambda: next(walks), ids, mask, progress=False)
    with pytest.raises(ValueError, match="padded on the left"):  # [CLS] must be at position 0
        score_matrix(model, px, ids, mask.flip(1), progress=False)
    assert not model.training


# ------------------------------------------------------------------------------------------- two processes
WORKER = """
import os, sys
import torch
import torch.distributed as dist
from blip2.model import Blip2Model
from blip2.retrieval import score_matrix

torch.set_num_threads(1)
dist.init_process_group("gloo")
blob = torch.load(sys.argv[1], weights_only=False)
model = Blip2Model(blob["cfg"])
model.load_state_dict(blob["state"])
i2t, t2i = score_matrix(model, blob["pixels"], blob["ids"], blob["mask"], k=blob["k"], batch_size=2, progress=False)
torch.save({"i2t": i2t, "t2i": t2i}, os.path.join(sys.argv[2], f"rank{dist.get_rank()}.pt"))
dist.destroy_process_group()
"""


def test_two_processes_equal_one(setup, tmp_path):
    _, model, px, ids, mask = setup
    ref = score_matrix(model, px, ids, mask, k=K, batch_size=2, progress=False)
    torch.save({"cfg": model.cfg, "state": model.state_dict(), "pixels": px, "ids": ids, "mask": mask, "k": K},
               tmp_path / "job.pt")
    (tmp_path / "worker.py").write_text(textwrap.dedent(WORKER))
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(tmp_path / "worker.py"), str(tmp_path / "job.pt"), str(tmp_path)]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    for rank in (0, 1):  # every process holds the full matrices
        out = torch.load(tmp_path / f"rank{rank}.pt")
        _assert_same(out["i2t"], ref[0])
        _assert_same(out["t2i"], ref[1])
