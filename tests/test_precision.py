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


# ----------------------------------------------------------------------- where the policy applies: load and train
def _dtypes(m) -> dict:
    return {n: p.dtype for n, p in m.named_parameters()}


def _assert_policy(m, llm_dtype, vit_dtype=torch.float16, trainable=()):
    """Every module in the original's dtype: fails for a model cast wholesale (or only in part)."""
    block = m.vision.blocks[0]
    assert block.attn.qkv.weight.dtype == vit_dtype and block.mlp.fc1.weight.dtype == vit_dtype
    assert m.vision.patch_embed.weight.dtype == vit_dtype
    assert block.norm1.weight.dtype == torch.float32 and block.norm2.bias.dtype == torch.float32
    assert m.ln_vision.weight.dtype == m.qformer.query_tokens.dtype == m.language_projection.weight.dtype == torch.float32
    assert all(p.dtype == torch.float32 for p in m.qformer.parameters())
    llm = {n: p.dtype for n, p in m.llm.named_parameters()}
    assert {d for n, d in llm.items() if n not in trainable} == {llm_dtype}
    assert all(llm[n] == torch.float32 for n in trainable)


def test_resolve_policy():
    from blip2.precision import resolve_policy

    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert resolve_policy("auto", torch.bfloat16, cuda) == resolve_policy("auto", torch.float16, "cuda:1") == "original"
    assert resolve_policy("auto", torch.bfloat16, cpu) == resolve_policy("auto", torch.float16, None) == "cast"
    assert resolve_policy("original", torch.float32, cuda) == resolve_policy("auto", None, cuda) == "cast"  # fp32
    assert resolve_policy("original", torch.bfloat16, cpu) == "original"
    assert resolve_policy("cast", torch.float16, cuda) == "cast"
    with pytest.raises(ValueError, match="precision must be one of auto, original, cast"):
        resolve_policy("mixed", torch.float16, cuda)


def test_load_applies_the_policy(model, tmp_path):
    d = tmp_path / "ckpt"
    checkpoint_with_processor("blip2-opt", d)
    _assert_policy(blip2.load(d, dtype=torch.bfloat16, precision="original"), torch.bfloat16)
    cast = blip2.load(d, dtype=torch.bfloat16, precision="cast")  # the behaviour before the policy
    assert set(_dtypes(cast).values()) == {torch.bfloat16}
    assert _dtypes(blip2.load(d, dtype=torch.bfloat16)) == _dtypes(cast)  # "auto" on CPU: unchanged
    plain, fp32 = blip2.load(d), blip2.load(d, dtype=torch.float32, precision="original")
    assert all(torch.equal(a, b) and a.dtype == torch.float32 for a, b in zip(plain.parameters(), fp32.parameters()))


def test_cli_precision_option(tmp_path):
    from blip2 import cli

    a = cli.build_parser().parse_args(["eval", "--model", str(tmp_path), "--dtype", "fp16", "--precision", "original"])
    assert cli.load_options(a)["precision"] == "original" and cli.load_options(a)["dtype"] == torch.float16
    assert cli.load_options(cli.build_parser().parse_args(["eval", "--model", str(tmp_path)]))["precision"] == "auto"


def test_training_placement(model):
    from blip2.lora import add_lora
    from blip2.train.feature_cache import expected_meta, vision_fingerprint
    from blip2.train.runtime import place_for_training

    m = copy.deepcopy(model)
    m.set_trainable(vision=False, llm=False)
    add_lora(m, r=2, dropout=0.0)
    before = {n: p.detach().clone() for n, p in m.named_parameters()}
    place_for_training(m, None)  # CPU / fp32: nothing changes, bit for bit
    assert all(torch.equal(p, before[n]) and p.dtype == before[n].dtype for n, p in m.named_parameters())
    fresh_vision = copy.deepcopy(m.vision)
    place_for_training(m, torch.bfloat16)
    lora = {n for n, p in m.llm.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    _assert_policy(m, torch.bfloat16, torch.bfloat16, trainable=lora)  # LoRA weights: fp32 master weights
    assert all(p.dtype == torch.float32 for p in m.parameters() if p.requires_grad)
    # the feature cache's fingerprint for bf16 is that of the encoder as training placed it
    assert expected_meta(m, 32)["fingerprint"] == {"bfloat16": vision_fingerprint(fresh_vision, torch.bfloat16)}
    assert vision_fingerprint(fresh_vision, torch.bfloat16) != vision_fingerprint(fresh_vision.to(torch.bfloat16))
