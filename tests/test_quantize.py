"""Quantised loading: int8 on CPU for OPT, LLaMA and T5 LLMs close to fp32, generation end to end, the streamed
load equal to quantising a loaded model, clear errors for schemes this machine cannot run."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import blip2
from blip2.checkpoint import save_pretrained
from blip2.int8 import Int8Linear
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
