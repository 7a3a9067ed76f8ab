"""The user-facing API end to end (images and strings in, strings out) against transformers' processors and
`generate` on the same checkpoint directory; batched equals one by one; the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

import blip2
from fixtures import sample_image
from hf_models import checkpoint_with_processor



@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield

IMAGES = [sample_image(40), sample_image((48, 36)).rotate(90), sample_image(33).convert("L")]
PROMPTS = ["a photo of", "Question: what is the man holding? Short answer:", "describe the image"]


_checkpoint = checkpoint_with_processor  # kinds: "blip2-opt", "instructblip-llama", "instructblip-t5"


KINDS = ["blip2-opt", "instructblip-llama", "instructblip-t5"]


@pytest.fixture(scope="module", params=KINDS)
def ckpt(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    hf, proc = _checkpoint(request.param, d)
    return request.param, d, hf, proc


# transformers' generate defaults, spelled out: our methods default to the original implementation's settings
HF_DEFAULTS = dict(num_beams=1, min_new_tokens=0, length_penalty=1.0, repetition_penalty=1.0,
                   repetition_context="prompt+generated")


def _reference_texts(kind, hf, proc, images, prompts, **gen):
    padding_side = "right" if kind.endswith("t5") else "left"
    proc.tokenizer.padding_side = padding_side
    inputs = proc(images=images, text=prompts, return_tensors="pt", padding=True)
    out = hf.generate(**inputs, **gen)
    if not kind.endswith("t5"):
        out = out[:, inputs["input_ids"].shape[1]:]
    return [t.strip() for t in proc.tokenizer.batch_decode(out, skip_special_tokens=True)]


@pytest.mark.parametrize("gen", [dict(max_new_tokens=8), dict(max_new_tokens=8, num_beams=3),
                                 dict(max_new_tokens=6, num_beams=2, repetition_penalty=1.5, min_new_tokens=3)])
def test_text_api_matches_transformers_pipeline(ckpt, gen):
    kind, d, hf, proc = ckpt
    model = blip2.load(d)
    assert model.processor is not None
    ours = model.instruct(IMAGES, PROMPTS, **{**HF_DEFAULTS, **gen})
    assert ours == _reference_texts(kind, hf, proc, IMAGES, PROMPTS, **gen)


def test_batched_equals_one_by_one(ckpt):
    kind, d, hf, proc = ckpt
    model = blip2.load(d)
    for gen in (dict(max_new_tokens=7), dict(max_new_tokens=7, num_beams=3)):
        batched = model.instruct(IMAGES, PROMPTS, **gen)
        single = [model.instruct([img], [p], **gen)[0] for img, p in zip(IMAGES, PROMPTS)]
        assert batched == single


def test_caption_and_answer_helpers(ckpt):
    kind, d, hf, proc = ckpt
    model = blip2.load(d)
    caps = model.caption(IMAGES[:2], max_new_tokens=5)
    assert len(caps) == 2 and all(isinstance(c, str) for c in caps)
    g = dict(max_new_tokens=4, num_beams=1, min_new_tokens=0, repetition_penalty=1.0)
    ans = model.answer(IMAGES[:1], "what is the man holding?", **g)
    q = "Question: what is the man holding? Short answer:"
    assert ans == model.instruct(IMAGES[:1], [q], **g)


# The original implementation's defaults, read from LAVIS by hand: blip2_opt.py / blip2_t5.py `generate`
# (num_beams=5, max_length=30, min_length=1, repetition_penalty=1.0, length_penalty=1.0),
# blip2_vicuna_instruct.py / blip2_t5_instruct.py `generate` (num_beams=5, max_length=256, min_length=1,
# repetition_penalty=1.5, length_penalty=1), `predict_answers` (num_beams=5, max_len=10, min_len=1,
# length_penalty=0 for OPT / Vicuna, -1 for Flan-T5). T5's min_length counts the decoder start token.
ORIGINAL = {
    "blip2-opt": {"caption": (5, 30, 1, 1.0, 1.0), "instruct": (5, 30, 1, 1.0, 1.0), "answer": (5, 10, 1, 0.0, 1.0)},
    "instructblip-llama": {"caption": (5, 256, 1, 1.0, 1.5), "instruct": (5, 256, 1, 1.0, 1.5),
                           "answer": (5, 10, 1, 0.0, 1.5)},
    "instructblip-t5": {"caption": (5, 256, 0, 1.0, 1.5), "instruct": (5, 256, 0, 1.0, 1.5),
                        "answer": (5, 10, 0, -1.0, 1.5)},
}


def test_methods_default_to_the_original_generation_settings(ckpt, monkeypatch):
    kind, d, hf, proc = ckpt
    model = blip2.load(d)
    seen = []
    monkeypatch.setattr(model, "generate", lambda *a, **kw: seen.append(kw) or torch.zeros(1, 1, dtype=torch.long))
    keys = ("num_beams", "max_new_tokens", "min_new_tokens", "length_penalty", "repetition_penalty")
    for kind_, call in (("caption", lambda: model.caption(IMAGES[:1])),
                        ("instruct", lambda: model.instruct(IMAGES[:1], ["describe the image"])),
                        ("answer", lambda: model.answer(IMAGES[:1], "what is it?"))):
        call()
        assert tuple(seen[-1][k] for k in keys) == ORIGINAL[kind][kind_], kind_
        assert seen[-1]["repetition_context"] == "generated"  # the original penalises generated tokens only
    model.instruct(IMAGES[:1], ["describe"], num_beams=2, max_new_tokens=3)  # arguments override
    assert (seen[-1]["num_beams"], seen[-1]["max_new_tokens"]) == (2, 3)
    model.instruct(IMAGES[:1], ["describe"], do_sample=True)  # sampling alone: one sequence, not beam sampling
    assert seen[-1]["num_beams"] == 1 and seen[-1]["do_sample"]


def test_generate_returns_new_tokens_only(ckpt):
    kind, d, hf, proc = ckpt
    model = blip2.load(d)
    px = model.processor.images(IMAGES[:2])
    ids, mask = model.processor.tokenize_prompts(PROMPTS[:2])
    kw = {}
    if kind.startswith("instructblip"):
        kw["qformer_input_ids"], kw["qformer_attention_mask"] = model.processor.tokenize_qformer(PROMPTS[:2])
    out = model.generate(px, input_ids=ids, attention_mask=mask, max_new_tokens=5, min_new_tokens=5, **kw)
    assert out.shape == (2, 5) and out.dtype == torch.long
    out = model.generate(px, input_ids=ids, attention_mask=mask, max_new_tokens=4, num_beams=3,
                         num_return_sequences=2, **kw)
    assert out.shape[0] == 4


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "blip2.cli", *map(str, args)], capture_output=True, text=True)


def test_cli_caption_ask_instruct_info(ckpt, tmp_path):
    kind, d, hf, proc = ckpt
    img = tmp_path / "photo.png"
    IMAGES[0].save(img)
    r = _cli("caption", img, img, "--model", d, "--max-new-tokens", "5", "--num-beams", "2", "--json")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    assert [row["image"] for row in rows] == [str(img)] * 2
    model = blip2.load(d)
    assert rows[0]["caption"] == model.caption([img], max_new_tokens=5, num_beams=2)[0]
    r = _cli("ask", img, "what is it?", "--model", d, "--max-new-tokens", "3", "--json")
    assert r.returncode == 0 and "answer" in json.loads(r.stdout)[0], r.stderr
    r = _cli("instruct", img, "Describe it.", "--model", d, "--max-new-tokens", "3")
    assert r.returncode == 0, r.stderr
    r = _cli("info", d, "--json")
    assert r.returncode == 0 and json.loads(r.stdout)["architecture"] == kind.split("-")[0]


def test_cli_bad_image_is_one_line(ckpt, tmp_path):
    _, d, _, _ = ckpt
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    r = _cli("caption", bad, "--model", d)
    assert r.returncode == 2
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "broken.jpg" in lines[0], r.stderr


def test_cli_help_lists_commands():
    r = _cli("--help")
    assert r.returncode == 0
    for cmd in ("caption", "ask", "instruct", "info", "demo"):
        assert cmd in r.stdout


def test_a_retrieval_checkpoint_has_no_generation_defaults_and_says_why_it_cannot_answer(tmp_path):
    from hf_models import retrieval_hf

    retrieval_hf().save_pretrained(tmp_path / "itm")
    model = blip2.load(tmp_path / "itm")
    assert model.generation_defaults("answer") == {}
    with pytest.raises(ValueError, match="no language model"):
        model.generate(torch.zeros(1, 3, model.cfg.vision.image_size, model.cfg.vision.image_size))
