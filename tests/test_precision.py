"""The precision policy (blip2.precision): the dtype of every module as the original assigns it, on CPU."""

from __future__ import annotations

import copy

import pytest
import torch

import blip2
from blip2.precision import apply_precision, precision_plan
from fixtures import sample_image
from hf_models import checkpoint_with_processor


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("prec")
    checkpoint_with_processor("blip2-opt", d)
    return blip2.load(d)


@pytest.mark.parametrize("llm_dtype", [torch.float16, torch.bfloat16])
def test_dtype_per_module(model, llm_dtype):
    m = apply_precision(copy.deepcopy(model), llm_dtype)
    block = m.vision.blocks[0]
    assert m.vision.patch_embed.weight.dtype == torch.float16 and m.vision.pos_embed.dtype == torch.float16
    assert all(p.dtype == torch.float16 for p in block.attn.parameters())
    assert all(p.dtype == torch.float16 for p in block.mlp.parameters())
    assert block.norm1.weight.dtype == torch.float32 and block.norm2.bias.dtype == torch.float32  # LayerNorms fp32
    assert m.ln_vision.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in m.qformer.parameters())
    assert m.language_projection.weight.dtype == torch.float32
    assert all(p.dtype == llm_dtype for p in m.llm.parameters())
    plan = precision_plan(m, llm_dtype)
    assert all(p.dtype == plan[n] for n, p in m.named_parameters())


def test_mixed_model_runs_close_to_fp32(model):
    m = apply_precision(copy.deepcopy(model), torch.bfloat16)
    apply_precision(m, torch.bfloat16)  # idempotent: no second set of hooks
    px = model.processor.images([sample_image(40)])
    ref = model.encode_image(px)
    out = m.encode_image(px)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=5e-2)  # an fp16 ViT, fp32 LayerNorms
    assert not torch.equal(out, ref)  # it did run in fp16
    caps = m.caption(px, max_new_tokens=3, num_beams=1)
    assert len(caps) == 1 and isinstance(caps[0], str)
