"""`blip2.generation.generate` must return exactly the ids of transformers' `lm.generate(inputs_embeds=...)`.

The reference is transformers itself, run on tiny random LMs built with its own classes (OPT, Llama with
grouped-query attention, T5 with an untied head), on left-padded random `inputs_embeds`.
"""

from __future__ import annotations


import pytest
import torch
from transformers import (LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM, T5Config,
                          T5ForConditionalGeneration)
from transformers.utils import logging as hf_logging

from blip2.generation import GenerationConfig, generate

hf_logging.set_verbosity_error()
# transformers warns that the repetition penalty sees only new tokens with inputs_embeds: replicated on purpose
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

B, L, D, V = 3, 9, 64, 256
PADS = (0, 2, 5)  # left padding per row
NEW = 8


def _randomize(lm, seed: int, weight_std: float | None = None):
    """transformers' init gives nearly flat logits (T5: one dominant token); a wide random LM head (and for
    T5 random weights of a larger scale) makes the choices clear-cut and varied from step to step."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in lm.named_parameters() if weight_std is not None else ():
            if "norm" in name:
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            elif name == "shared.weight":
                p.copy_(torch.randn(p.shape, generator=g))
            else:
                p.copy_(weight_std * torch.randn(p.shape, generator=g))
        head = lm.get_output_embeddings().weight
        head.copy_(0.5 * torch.randn(head.shape, generator=g))
    return lm.eval()


@pytest.fixture(scope="module")
def opt():
    torch.manual_seed(0)
    cfg = OPTConfig(vocab_size=V, hidden_size=D, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                    word_embed_proj_dim=D, max_position_embeddings=128, bos_token_id=2, eos_token_id=2,
                    pad_token_id=1, tie_word_embeddings=False)  # tied + sharpened head would repeat one token
    return _randomize(OPTForCausalLM(cfg), 1)


@pytest.fixture(scope="module")
def llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=D, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
                      pad_token_id=0, tie_word_embeddings=False)
    return _randomize(LlamaForCausalLM(cfg), 2)


@pytest.fixture(scope="module")
def t5():
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=V, d_model=D, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0, eos_token_id=1,
                   decoder_start_token_id=0)
    return _randomize(T5ForConditionalGeneration(cfg), 3, weight_std=0.3)


@pytest.fixture(params=["opt", "llama", "t5"])
def lm(request):
    return request.getfixturevalue(request.param)


@pytest.fixture(params=["opt", "llama"])
def causal_lm(request):
    return request.getfixturevalue(request.param)


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    embeds = torch.randn(B, L, D, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for row, pads in enumerate(PADS):
        mask[row, :pads] = 0
    return embeds, mask


def reference(lm, embeds, mask, seed=None, input_ids=None, position_ids=None, **kw) -> torch.Tensor:
    """transformers' new tokens."""
    extra = {k: v for k, v in (("input_ids", input_ids), ("position_ids", position_ids)) if v is not None}
    if seed is not None:
        torch.manual_seed(seed)
    with torch.no_grad():
        out = lm.generate(inputs_embeds=embeds, attention_mask=mask, **extra, **kw)
    if lm.config.is_encoder_decoder:
        assert (out[:, 0] == lm.generation_config.decoder_start_token_id).all()
        return out[:, 1:]
    if input_ids is not None:  # transformers returns the prompt ids too
        assert torch.equal(out[:, : input_ids.shape[1]], input_ids.repeat_interleave(out.shape[0] // B, 0))
        return out[:, input_ids.shape[1] :]
    assert out.shape[1] <= kw.get("max_new_tokens", 20)  # with inputs_embeds only: new tokens only
    return out


def ours(lm, embeds, mask, seed=None, input_ids=None, position_ids=None, **kw) -> torch.Tensor:
    if seed is not None:
        torch.manual_seed(seed)
    return generate(lm, embeds, mask, GenerationConfig(**kw), input_ids=input_ids, position_ids=position_ids)


def assert_same(lm, seed=None, embeds_mask=None, **kw):
    embeds, mask = embeds_mask if embeds_mask is not None else _inputs()
    ref = reference(lm, embeds, mask, seed=seed, **kw)
    got = ours(lm, embeds, mask, seed=seed, **kw)
    assert got.shape == ref.shape and torch.equal(got, ref), f"{kw}\ntransformers:\n{ref}\nours:\n{got}"
    return got


def _eos_candidate(lm, step: int, row: int = 0, num_beams: int = 1) -> int:
    """The token that decoding without EOS produces at `step` in `row` (best beam): using it as EOS makes
    the decoding stop there, so stopping is exercised."""
    embeds, mask = _inputs()
    out = reference(lm, embeds, mask, max_new_tokens=step + 1, num_beams=num_beams, eos_token_id=None,
                    pad_token_id=0)
    return int(out[row, step])


# ----------------------------------------------------------------------------------------------------------
# Parity with transformers


def test_greedy(lm):
    got = assert_same(lm, max_new_tokens=NEW)
    assert got.shape == (B, NEW) and len(got.unique()) > 3  # not degenerate


@pytest.mark.parametrize("num_beams,length_penalty,num_return_sequences", [
    (3, 1.0, 1), (3, 0.0, 2), (3, -1.0, 2), (5, 1.0, 2), (5, 0.0, 1), (5, -1.0, 2)])
def test_beam_search(lm, num_beams, length_penalty, num_return_sequences):
    got = assert_same(lm, max_new_tokens=NEW, num_beams=num_beams, length_penalty=length_penalty,
                      num_return_sequences=num_return_sequences)
    assert got.shape[0] == B * num_return_sequences


@pytest.mark.parametrize("early_stopping", [False, True, "never"])
@pytest.mark.parametrize("length_penalty", [1.0, 2.0])
def test_beam_search_early_stopping(lm, early_stopping, length_penalty):
    """Many EOS ids (the tokens the beams pick at steps 1-2) fill the finished pools early, so when to stop
    (the early_stopping / length_penalty heuristics) decides the result."""
    embeds, mask = _inputs()
    beams = reference(lm, embeds, mask, max_new_tokens=3, num_beams=3, num_return_sequences=3, eos_token_id=None,
                      pad_token_id=0)
    eos = sorted(set(beams[:, 1:3].flatten().tolist()))
    assert_same(lm, max_new_tokens=10, num_beams=3, num_return_sequences=3, eos_token_id=eos,
                early_stopping=early_stopping, length_penalty=length_penalty)


@pytest.mark.parametrize("kw", [
    dict(temperature=0.7, top_k=20, top_p=0.9),
    dict(),  # transformers' sampling defaults: top_k=50
    dict(top_k=0, top_p=0.5),
    dict(top_k=None, temperature=1.3, num_return_sequences=2),
])
def test_sampling_same_seed_same_ids(lm, kw):
    got = assert_same(lm, seed=7, max_new_tokens=NEW, do_sample=True, **kw)
    other = ours(lm, *_inputs(), seed=8, max_new_tokens=NEW, do_sample=True, **kw)
    assert not torch.equal(got, other)  # the seed matters, so the RNG really is consumed the same way


@pytest.mark.parametrize("kw", [dict(temperature=0.8, top_k=30), dict(top_k=0, top_p=0.05)])
def test_beam_sampling(lm, kw):
    # top_p=0.05 leaves only the kept minimum: 1 + number of EOS ids with beams (1 without)
    assert_same(lm, seed=3, max_new_tokens=NEW, do_sample=True, num_beams=3, num_return_sequences=2, **kw)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_repetition_penalty(lm, num_beams):
    got = assert_same(lm, max_new_tokens=NEW, num_beams=num_beams, repetition_penalty=1.5)
    plain = ours(lm, *_inputs(), max_new_tokens=NEW, num_beams=num_beams)
    assert not torch.equal(got, plain)  # the penalty changes something here


@pytest.mark.parametrize("num_beams", [1, 3])
def test_repetition_penalty_sees_prompt_ids(causal_lm, num_beams):
    """With input_ids next to inputs_embeds (placeholders at visual positions), the prompt ids join the
    penalised history (pad positions excluded)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(3, V, (B, L), generator=g)
    ids[:, :4] = 250  # "image" placeholder ids
    assert_same(causal_lm, max_new_tokens=NEW, num_beams=num_beams, repetition_penalty=1.5, input_ids=ids)


@pytest.mark.parametrize("num_beams", [1, 3])
def test_min_new_tokens_suppresses_eos(lm, num_beams):
    eos = _eos_candidate(lm, 1, num_beams=num_beams)
    got = assert_same(lm, max_new_tokens=NEW, min_new_tokens=4, num_beams=num_beams, eos_token_id=eos)
    assert not (got[:, :4] == eos).any()


@pytest.mark.parametrize("num_beams,length_penalty", [(1, 1.0), (3, 0.0), (5, 0.0), (3, 1.0), (5, -1.0)])
def test_eos_stops_and_pads(lm, num_beams, length_penalty):
    eos = _eos_candidate(lm, 3, num_beams=num_beams)
    got = assert_same(lm, max_new_tokens=NEW, num_beams=num_beams, eos_token_id=eos, pad_token_id=0,
                      num_return_sequences=min(2, num_beams), length_penalty=length_penalty)
    if length_penalty == 0.0 or num_beams == 1:  # (a positive penalty may rank longer hypotheses first)
        assert (got == eos).any()  # stopping is exercised


def test_greedy_stops_early_when_all_rows_end(lm):
    """A list of EOS ids, one per row: every row ends by step 2 and decoding stops there."""
    eos = [_eos_candidate(lm, 2, row) for row in range(B)]
    got = assert_same(lm, max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    assert got.shape[1] <= 3


def test_t5_beam_fill_is_eos_when_pad_is_zero(t5):
    """transformers fills finished beam hypotheses with `pad or eos[0]`: T5's pad id 0 gives EOS."""
    eos = _eos_candidate(t5, 2, num_beams=3)
    got = assert_same(t5, max_new_tokens=NEW, num_beams=3, eos_token_id=eos, num_return_sequences=3)
    ended_early = (got[:, 2] == eos) & (got[:, 3:] == eos).all(1)  # EOS at step 2, then the fill
    assert ended_early.any()


def test_no_padding_and_no_mask(lm):
    embeds, _ = _inputs()
    ones = torch.ones(B, L, dtype=torch.long)
    assert_same(lm, embeds_mask=(embeds, ones), max_new_tokens=NEW)
    assert torch.equal(ours(lm, embeds, None, max_new_tokens=NEW), reference(lm, embeds, ones, max_new_tokens=NEW))


def test_explicit_position_ids(causal_lm):
    embeds, mask = _inputs()
    pos = ((mask.cumsum(-1) - 1).clamp(min=0) + 3) * mask  # shifted positions, pads at 0
    assert_same(causal_lm, max_new_tokens=NEW, position_ids=pos)
    assert_same(causal_lm, max_new_tokens=NEW, num_beams=3, position_ids=pos)


# ----------------------------------------------------------------------------------------------------------
# Semantics independent of transformers: a row of a left-padded batch decodes as that row alone


@pytest.mark.parametrize("num_beams", [1, 3])
def test_batched_equals_one_by_one(lm, num_beams):
    embeds, mask = _inputs()
    eos = _eos_candidate(lm, 3, num_beams=num_beams)
    kw = dict(max_new_tokens=NEW, num_beams=num_beams, eos_token_id=eos, pad_token_id=0)
    batched = ours(lm, embeds, mask, **kw)
    # finished rows are padded; beam search pads with `pad or eos` (transformers treats a pad id of 0 as unset)
    fill = (kw["pad_token_id"] or kw["eos_token_id"]) if num_beams > 1 else kw["pad_token_id"]
    for row, pads in enumerate(PADS):
        alone = ours(lm, embeds[row : row + 1, pads:], None, **kw)[0]
        n = alone.shape[0]
        assert torch.equal(batched[row, :n], alone), f"row {row}"
        assert (batched[row, n:] == fill).all()  # the batch ran longer for other rows: padding only


def test_unset_special_tokens_come_from_the_lm_generation_config(lm):
    """Like `lm.generate` without the arguments: EOS (and pad = EOS) from `lm.generation_config`."""
    gc = lm.generation_config
    saved = gc.eos_token_id, gc.pad_token_id
    try:
        for num_beams in (1, 3):
            gc.eos_token_id, gc.pad_token_id = _eos_candidate(lm, 2, num_beams=num_beams), None
            got = assert_same(lm, max_new_tokens=NEW, num_beams=num_beams, length_penalty=0.0)
            assert (got == gc.eos_token_id).any()
    finally:
        gc.eos_token_id, gc.pad_token_id = saved


def test_returns_an_ordinary_tensor(opt):
    ids = ours(opt, *_inputs(), max_new_tokens=3)
    assert not ids.is_inference()
    ids[ids == ids[0, 0]] = 0  # in-place edits work


def test_warns_about_generation_config_settings_it_does_not_apply(opt):
    opt.generation_config.no_repeat_ngram_size = 2
    try:
        with pytest.warns(UserWarning, match="no_repeat_ngram_size"):
            ours(opt, *_inputs(), max_new_tokens=3)
    finally:
        opt.generation_config.no_repeat_ngram_size = None


# ----------------------------------------------------------------------------------------------------------
# Validation


@pytest.mark.parametrize("kw,words", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(min_new_tokens=-1), "min_new_tokens"),
    (dict(num_beams=0), "num_beams"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_k=-1), "top_k"),
    (dict(top_p=1.5), "top_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(early_stopping="sometimes"), "early_stopping"),
    (dict(num_return_sequences=2), "num_return_sequences"),
    (dict(num_beams=2, num_return_sequences=3), "num_return_sequences"),
    (dict(eos_token_id=[2, -1]), "eos_token_id"),
    (dict(pad_token_id=-1), "pad_token_id"),
])
def test_config_validation(kw, words):
    with pytest.raises(ValueError, match=words):
        GenerationConfig(**kw)


def test_input_validation(opt, t5):
    embeds, mask = _inputs()
    with pytest.raises(ValueError, match="inputs_embeds"):
        generate(opt, embeds[0], mask, GenerationConfig())
    with pytest.raises(ValueError, match="attention_mask"):
        generate(opt, embeds, mask[:, 1:], GenerationConfig())
    with pytest.raises(ValueError, match="decoder-only"):
        generate(t5, embeds, mask, GenerationConfig(), input_ids=torch.zeros(B, L, dtype=torch.long))
    with pytest.raises(TypeError, match="GenerationConfig"):
        generate(opt, embeds, mask, {"max_new_tokens": 3})



def test_greedy_drops_finished_rows(lm):
    """Rows that reached EOS leave the batch (the LM sees fewer rows), and the ids stay transformers'."""
    eos = [_eos_candidate(lm, step, row) for row, step in enumerate((1, 4, NEW + 1))]  # row 2 never ends
    rows_fed = []
    hook = lm.register_forward_pre_hook(
        lambda m, args, kw: rows_fed.append((kw.get("input_ids") if kw.get("input_ids") is not None
                                             else kw.get("decoder_input_ids")).shape[0])
        if (kw.get("input_ids") is not None or kw.get("decoder_input_ids") is not None) else None, with_kwargs=True)
    try:
        got = ours(lm, *_inputs(), max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0)
    finally:
        hook.remove()
    assert torch.equal(got, reference(lm, *_inputs(), max_new_tokens=NEW, eos_token_id=eos, pad_token_id=0))
    assert rows_fed[-1] < B and rows_fed == sorted(rows_fed, reverse=True)
