"""Parity with transformers' own classes: tiny random models saved by transformers, loaded by blip2.load."""

from __future__ import annotations

import json

import pytest
import torch

import blip2
from hf_models import (LLAMA_GQA, NUM_QUERY, OPT, T5_UNTIED, blip2_hf, instructblip_hf, pixels, retrieval_hf,
                       text_ids, with_placeholders)



@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

CASES = {
    "blip2-opt": lambda: blip2_hf(OPT),
    "blip2-t5-untied": lambda: blip2_hf(T5_UNTIED),
    "blip2-llama": lambda: blip2_hf(LLAMA_GQA),
    "instructblip-llama-gqa": lambda: instructblip_hf(LLAMA_GQA),
    "instructblip-t5": lambda: instructblip_hf(T5_UNTIED),
}


def _inputs(name: str, B: int = 3):
    px = pixels(B)
    ids = text_ids(B, 6, 200)
    mask = torch.ones_like(ids)
    mask[1, :2] = 0  # left padding in one row
    kw = {}
    if name.startswith("instructblip"):
        q = text_ids(B, 7, 120, seed=3)
        qm = torch.ones_like(q)
        qm[0, 5:] = 0
        kw.update(qformer_input_ids=q, qformer_attention_mask=qm)
    if "t5" in name:
        kw["decoder_input_ids"] = text_ids(B, 4, 200, seed=5)
    return px, ids, mask, kw


@pytest.fixture(scope="module", params=sorted(CASES))
def pair(request, tmp_path_factory):
    hf = CASES[request.param]()
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return request.param, hf, blip2.load(d), d


def _ref_logits(name, hf, px, ids, mask, kw):
    hids, hmask = with_placeholders(ids, mask)
    out = hf(pixel_values=px, input_ids=hids, attention_mask=hmask, **kw).logits
    return out if "t5" in name else out[:, NUM_QUERY:]  # text positions


def test_forward_logits_match_transformers(pair):
    name, hf, ours, _ = pair
    px, ids, mask, kw = _inputs(name)
    ref = _ref_logits(name, hf, px, ids, mask, kw)
    out = ours(pixel_values=px, input_ids=ids, attention_mask=mask, **kw).logits
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_processor_placeholder_inputs_accepted(pair):
    name, hf, ours, _ = pair
    px, ids, mask, kw = _inputs(name)
    hids, hmask = with_placeholders(ids, mask)
    ref = _ref_logits(name, hf, px, ids, mask, kw)
    out = ours(pixel_values=px, input_ids=hids, attention_mask=hmask, **kw).logits
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_loss_matches_transformers(pair):
    name, hf, ours, _ = pair
    px, ids, mask, kw = _inputs(name)
    if "t5" in name:
        labels = kw.pop("decoder_input_ids")
        labels[0, -1] = -100
        ref = hf(pixel_values=px, input_ids=with_placeholders(ids, mask)[0],
                 attention_mask=with_placeholders(ids, mask)[1], labels=labels, **kw).loss
        out = ours(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels, **kw).loss
    else:
        labels = ids.masked_fill(mask == 0, -100)
        hids, hmask = with_placeholders(ids, mask)
        hlabels = torch.cat([torch.full((ids.shape[0], NUM_QUERY), -100), labels], 1)
        ref = hf(pixel_values=px, input_ids=hids, attention_mask=hmask, labels=hlabels, **kw).loss
        out = ours(pixel_values=px, input_ids=ids, attention_mask=mask, labels=labels, **kw).loss
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_save_pretrained_loads_in_transformers(pair, tmp_path):
    name, hf, ours, _ = pair
    ours.save_pretrained(tmp_path / "ours")
    cls = type(hf)
    back = cls.from_pretrained(tmp_path / "ours").eval()
    px, ids, mask, kw = _inputs(name)
    torch.testing.assert_close(_ref_logits(name, back, px, ids, mask, kw), _ref_logits(name, hf, px, ids, mask, kw),
                               atol=1e-6, rtol=1e-6)


def test_config_without_image_token_index(tmp_path):
    """Checkpoints saved before transformers 4.47 have no image_token_index: the visual prompt is concatenated."""
    hf = blip2_hf(OPT)
    hf.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg.pop("image_token_index", None)
    cfg.pop("image_token_id", None)
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    ours = blip2.load(tmp_path)
    assert ours.cfg.image_token_index is None
    px, ids, mask, kw = _inputs("blip2-opt")
    torch.testing.assert_close(ours(pixel_values=px, input_ids=ids, attention_mask=mask).logits,
                               _ref_logits("blip2-opt", hf, px, ids, mask, kw), atol=1e-5, rtol=1e-5)


def test_perturbed_weight_breaks_parity(tmp_path):
    """The parity check is sensitive: one changed bias moves the logits."""
    hf = blip2_hf(OPT)
    hf.save_pretrained(tmp_path)
    ours = blip2.load(tmp_path)
    ours.qformer.layers[-1].ffn_query.fc1.bias.add_(1e-2)
    px, ids, mask, kw = _inputs("blip2-opt")
    diff = (ours(pixel_values=px, input_ids=ids, attention_mask=mask).logits
            - _ref_logits("blip2-opt", hf, px, ids, mask, kw)).abs().max()
    assert diff > 1e-4


# ------------------------------------------------------------------------------------------- retrieval class
@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    hf = retrieval_hf()
    d = tmp_path_factory.mktemp("itm")
    hf.save_pretrained(d)
    return hf, blip2.load(d)


def _texts(B=4):
    ids = text_ids(B, 7, 120)
    m = torch.ones_like(ids)
    m[B - 1, 5:] = 0
    return ids, m


def test_itm_logits_match_transformers(retrieval):
    hf, ours = retrieval
    px = pixels(4)
    ids, m = _texts()
    ref = hf(pixel_values=px, input_ids=ids, attention_mask=m, use_image_text_matching_head=True).logits_per_image
    torch.testing.assert_close(ours.itm_logits(px, ids, m), ref, atol=1e-5, rtol=1e-5)


def test_itc_scores_match_transformers(retrieval):
    hf, ours = retrieval
    px = pixels(3)
    ids, m = _texts(4)
    ref = hf(pixel_values=px, input_ids=ids, attention_mask=m).logits_per_image  # [3 images, 4 texts]
    out = ours.itc_scores(px, ids, m)
    assert out.shape == (3, 4)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_retrieval_save_roundtrip(retrieval, tmp_path):
    hf, ours = retrieval
    ours.save_pretrained(tmp_path)
    back = type(hf).from_pretrained(tmp_path).eval()
    px = pixels(2)
    ids, m = _texts(2)
    a = back(pixel_values=px, input_ids=ids, attention_mask=m, use_image_text_matching_head=True).logits_per_image
    torch.testing.assert_close(ours.itm_logits(px, ids, m), a, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- vision tower alone
def test_position_interpolation_matches_transformers(tmp_path):
    """Other image sizes: bicubic position-embedding interpolation as transformers' interpolate_pos_encoding."""
    hf = blip2_hf(OPT)
    hf.save_pretrained(tmp_path)
    ours = blip2.load(tmp_path)
    px = pixels(2, size=48)  # 6x6 patches instead of 4x4
    ref = hf.vision_model(px, interpolate_pos_encoding=True).last_hidden_state
    out = ours.encode_image(px)
    assert out.shape == (2, 37, 32)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_video_frames_concatenate_queries(tmp_path):
    hf = instructblip_hf(LLAMA_GQA)
    hf.save_pretrained(tmp_path)
    ours = blip2.load(tmp_path)
    video = torch.stack([pixels(2, seed=1), pixels(2, seed=2), pixels(2, seed=3)], dim=1)  # (B, F, 3, H, W)
    q = text_ids(2, 5, 120)
    out = ours.query_features(video, q)
    assert out.shape == (2, 3 * NUM_QUERY, 32)
    # frame f's queries equal the single-image result for that frame
    torch.testing.assert_close(out[:, NUM_QUERY:2 * NUM_QUERY], ours.query_features(pixels(2, seed=2), q))
    ids = text_ids(2, 4, 200)
    logits = ours(pixel_values=video, input_ids=ids, qformer_input_ids=q).logits
    assert logits.shape == (2, 4, 256)
