"""Quantised loading: int8 on CPU for OPT, LLaMA and T5 LLMs close to fp32, generation end to end, the streamed
load equal to quantising a loaded model, clear errors for schemes this machine cannot run. The `int8` scheme
(blip2.int8): per-token activation scales and calibrated smoothing keep a model with an outlier channel close to
fp32, where one scale per call (`int8-dynamic`) does not; smoothing alone is an identity in fp32; the int8 GEMM
is exact."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import blip2
from blip2.checkpoint import save_pretrained
from blip2.int8 import Int8Linear, calibrate, smooth
from blip2.quantize import QuantizeError, check_scheme, quantize_llm
from fixtures import sample_image
from hf_models import checkpoint_with_processor

pytest.importorskip("accelerate")

PRESETS = ["tiny-opt", "tiny-llama-instruct", "tiny-t5"]


@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


def _inputs(model, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = model.cfg.vision.image_size
    kw = {"pixel_values": torch.randn(2, 3, size, size, generator=g),
          "input_ids": torch.randint(3, 100, (2, 6), generator=g)}
    if model.cfg.architecture == "instructblip":
        kw["qformer_input_ids"] = torch.randint(3, 100, (2, 5), generator=g)
    if model.cfg.is_encoder_decoder:
        kw["decoder_input_ids"] = torch.randint(3, 100, (2, 4), generator=g)
    return kw


@pytest.fixture(scope="module", params=PRESETS)
def saved(request, tmp_path_factory):
    """A preset with transformers' own initialisation, saved in 3 shards (the streaming loader reads shard by
    shard)."""
    torch.manual_seed(0)
    model = blip2.from_preset(request.param).eval()
    d = tmp_path_factory.mktemp(request.param)
    save_pretrained(model, d, max_shard_size=40_000)
    assert (d / "model.safetensors.index.json").is_file()
    return request.param, d


def test_int8_is_close_to_fp32_and_generates(saved):
    name, d = saved
    ref, q = blip2.load(d), blip2.load(d, quantize="int8")
    assert q.quantized == "int8"
    assert any(isinstance(m, Int8Linear) for m in q.llm.modules())
    assert not any(type(m) is torch.nn.Linear for m in q.llm.modules())  # every LLM linear layer quantised
    assert all(type(m) is torch.nn.Linear for m in q.qformer.modules() if isinstance(m, torch.nn.Linear))
    kw = _inputs(ref)
    a, b = ref(**kw).logits, q(**kw).logits
    err = ((a - b).abs().max() / a.std()).item()
    print(f"{name}: int8 logit error {err:.3f} of the logits' std")  # reported (pytest -s)
    assert err < 0.3
    assert (a.argmax(-1) == b.argmax(-1)).float().mean() >= 0.75
    gen_kw = {k: v for k, v in kw.items() if k in ("pixel_values", "input_ids", "qformer_input_ids")}
    out = q.generate(**gen_kw, max_new_tokens=4)
    assert out.shape[0] == 2 and out.shape[1] >= 1


def test_streamed_load_equals_quantising_the_loaded_model(saved):
    _, d = saved
    later = blip2.load(d)
    quantize_llm(later, "int8")
    streamed = blip2.load(d, quantize="int8")
    kw = _inputs(later, seed=1)
    torch.testing.assert_close(streamed(**kw).logits, later(**kw).logits, rtol=0, atol=0)
    params = dict(later.named_parameters())
    assert list(params) == [n for n, _ in streamed.named_parameters()]  # the same ties
    for n, p in streamed.named_parameters():
        assert torch.equal(p, params[n]), n


def test_tied_head_is_quantised_and_the_embeddings_stay_fp32(tmp_path):
    torch.manual_seed(0)
    model = blip2.from_preset("tiny-opt").eval()
    assert model.llm.get_output_embeddings().weight is model.llm.get_input_embeddings().weight
    model.save_pretrained(tmp_path)
    q = blip2.load(tmp_path, quantize="int8")
    assert type(q.llm.get_output_embeddings()) is not torch.nn.Linear
    torch.testing.assert_close(q.llm.get_input_embeddings().weight, model.llm.get_input_embeddings().weight)


def test_caption_through_the_cli_with_quantize(tmp_path):
    hf, proc = checkpoint_with_processor("blip2-opt", tmp_path / "ckpt")
    img = tmp_path / "a.png"
    sample_image(40).save(img)
    r = subprocess.run([sys.executable, "-m", "blip2.cli", "caption", str(img), "--model", str(tmp_path / "ckpt"),
                        "--quantize", "int8", "--max-new-tokens", "4", "--num-beams", "1", "--json"],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-2000:]
    assert isinstance(json.loads(r.stdout)[0]["caption"], str)


def test_schemes_this_machine_cannot_run_name_the_alternative():
    with pytest.raises(QuantizeError, match="unknown scheme"):
        check_scheme("int3")
    if not torch.cuda.is_available():
        for scheme in ("bnb-nf4", "nf4", "bnb-int8"):
            with pytest.raises(QuantizeError, match="needs a CUDA GPU.*quantize='int8'"):
                check_scheme(scheme, "cpu")
    for scheme in ("int8", "int8-dynamic"):
        with pytest.raises(QuantizeError, match="on CUDA use 'bnb-int8'"):
            check_scheme(scheme, "cuda")
    try:
        assert check_scheme("int4", "cpu") == "int4"
    except QuantizeError as e:
        assert "use quantize='int8'" in str(e)


def test_quantize_refuses_a_model_without_an_llm(tmp_path):
    blip2.from_preset("tiny-stage1").save_pretrained(tmp_path)
    with pytest.raises(QuantizeError, match="no LLM"):
        blip2.load(tmp_path, quantize="int8")


def test_int8_weight_only_through_torchao(saved):
    pytest.importorskip("torchao")
    _, d = saved
    ref, q = blip2.load(d), blip2.load(d, quantize="int8-weight-only")
    kw = _inputs(ref)
    a, b = ref(**kw).logits, q(**kw).logits
    assert ((a - b).abs().max() / a.std()).item() < 0.2


def _with_outlier_channels(model, factor: float = 60.0):
    """The same function with an LLaMA-style outlier: channel 3 of every RMSNorm output `factor` times larger,
    the linear layers reading it scaled back (so the fp32 model is unchanged up to rounding)."""
    for layer in model.llm.model.layers:
        pairs = ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)),
                 (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj)))
        for norm, linears in pairs:
            norm.weight[3] *= factor
            for lin in linears:
                lin.weight[:, 3] /= factor
    return model


@pytest.fixture(scope="module")
def outlier_model():
    torch.manual_seed(0)
    return _with_outlier_channels(blip2.from_preset("tiny-llama-instruct").eval())


def _logit_error(ref, q, kw) -> float:
    a, b = ref(**kw).logits, q(**kw).logits
    return ((a - b).abs().max() / a.std()).item()


def test_int8_gemm_equals_the_dequantised_product():
    torch.manual_seed(0)
    lin = torch.nn.Linear(40, 24)
    q = Int8Linear.from_float(lin)
    x = torch.randn(3, 5, 40)
    scale = x.abs().amax(-1, keepdim=True) / 127  # per token, by hand
    xq = torch.round(x / scale) * scale
    wq = q.weight.float() * q.weight_scale[:, None]
    torch.testing.assert_close(q(x), F.linear(xq, wq, lin.bias), rtol=1e-5, atol=1e-5)


def test_smoothing_is_an_identity_in_fp32(outlier_model):
    model = copy.deepcopy(outlier_model)
    kw = _inputs(model)
    ref = model(**kw).logits
    stats = calibrate(model)
    for name, lin in model.llm.named_modules():
        if isinstance(lin, torch.nn.Linear):
            w, inv = smooth(lin.weight, stats[name])
            assert not torch.allclose(w, lin.weight)  # (the scales do something)
            lin.weight.copy_(w)
            lin.register_forward_pre_hook(lambda _m, args, inv=inv: (args[0] * inv,))
    torch.testing.assert_close(model(**kw).logits, ref, rtol=1e-5, atol=1e-5)


def test_per_token_smoothed_int8_is_much_closer_than_per_call_dynamic_int8(outlier_model):
    kw = _inputs(outlier_model, seed=1)
    errors = {}
    for scheme in ("int8", "int8-dynamic"):
        q = copy.deepcopy(outlier_model)
        quantize_llm(q, scheme)
        errors[scheme] = _logit_error(outlier_model, q, kw)
    print(f"logit error with an outlier channel: {errors}")  # reported (pytest -s)
    assert errors["int8"] < 0.25 * errors["int8-dynamic"]
    assert errors["int8"] < 0.1


def test_calibration_covers_every_llm_linear_layer_and_smooths_them(outlier_model):
    q = copy.deepcopy(outlier_model)
    quantize_llm(q, "int8")
    layers = [m for m in q.llm.modules() if isinstance(m, Int8Linear)]
    assert layers and not any(type(m) is torch.nn.Linear for m in q.llm.modules())
    assert all(m.inv_smooth is not None for m in layers)
    norm_in = q.llm.model.layers[0].self_attn.q_proj.inv_smooth
    assert norm_in[3] < 0.5 * norm_in.median()  # the outlier channel is divided down the most
