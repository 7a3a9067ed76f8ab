"""dtype policy: fp32/bf16/fp16; in fp16 the Q-Former stays fp32 (as transformers keeps it)."""

from __future__ import annotations

import pytest
import torch

import blip2
from hf_models import OPT, blip2_hf, pixels, text_ids



@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("ckpt")
    blip2_hf(OPT).save_pretrained(d)
    return d


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_reduced_precision_forward(ckpt, dtype):
    ref = blip2.load(ckpt)
    model = blip2.load(ckpt, dtype=dtype)
    assert model.vision.blocks[0].attn.qkv.weight.dtype == dtype
    assert next(model.llm.parameters()).dtype == dtype
    q_dtype = torch.float32 if dtype == torch.float16 else dtype
    assert all(p.dtype == q_dtype for p in model.qformer.parameters())
    px, ids = pixels(2), text_ids(2, 5, 200)
    out = model(pixel_values=px, input_ids=ids).logits
    assert out.dtype == dtype and torch.isfinite(out).all()
    expected = ref(pixel_values=px, input_ids=ids).logits
    # reduced precision: close to fp32 (a random tiny model, so a loose bound)
    assert (out.float() - expected).abs().max() < 0.25 * expected.abs().max()


def test_fp16_qformer_matches_transformers_policy(ckpt):
    from transformers import Blip2ForConditionalGeneration

    hf = Blip2ForConditionalGeneration.from_pretrained(ckpt, dtype=torch.float16)
    ours = blip2.load(ckpt, dtype=torch.float16)
    hf_q = {n.split(".")[0] for n, p in hf.named_parameters() if p.dtype == torch.float32}
    assert hf_q == {"query_tokens", "qformer"}  # what transformers keeps in fp32
    assert ours.qformer.query_tokens.dtype == torch.float32


def test_model_to_device_and_back(ckpt):
    model = blip2.load(ckpt)
    model.to("cpu")
    assert model.device.type == "cpu"
    if torch.cuda.is_available():  # exercised on machines with a GPU
        model.to("cuda")
        out = model(pixel_values=pixels(1).cuda(), input_ids=text_ids(1, 3, 200).cuda()).logits
        assert out.device.type == "cuda"


def test_fp16_stage1_heads(tmp_path):
    from hf_models import retrieval_hf

    retrieval_hf().save_pretrained(tmp_path)
    ref = blip2.load(tmp_path)
    model = blip2.load(tmp_path, dtype=torch.float16)
    px, ids = pixels(2), text_ids(2, 5, 120)
    itm = model.itm_logits(px, ids)
    itc = model.itc_scores(px, ids)
    assert itm.dtype == torch.float16 and torch.isfinite(itm).all()
    torch.testing.assert_close(itc.float(), ref.itc_scores(px, ids), atol=5e-2, rtol=5e-2)
