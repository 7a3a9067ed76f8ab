"""Stage-1 captioning with the Q-Former as the decoder."""

from __future__ import annotations

import pytest
import torch

from blip2.config import VisionConfig
from blip2.model import Blip2Model
from blip2.qformer_caption import qformer_generate
from blip2.stage1 import stage1_config

EOS, DEC = 3, 39


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    cfg = stage1_config(VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4,
                                     mlp_hidden_size=64),
                        num_query_tokens=4, vocab_size=40, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_position_embeddings=40, initializer_range=0.3)
    return Blip2Model(cfg).eval()


PX = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def _full_pass_greedy(model, px, n):
    """Greedy decoding by re-running the whole [queries; text] ITG pass each step (no cache)."""
    qf = model.qformer
    ids = torch.full((px.shape[0], 1), DEC)
    image = model.encode_image(px)
    for _ in range(n):
        out = qf(image, input_ids=ids, mode="itg")
        nxt = qf.lm_logits(out.text_output[:, -1]).argmax(-1)
        ids = torch.cat([ids, nxt[:, None]], 1)
    return ids[:, 1:]


@torch.no_grad()
def test_greedy_equals_uncached_full_passes(model):
    ours = qformer_generate(model, PX, eos_token_id=[], num_beams=1, max_new_tokens=6, min_new_tokens=0)
    assert torch.equal(ours, _full_pass_greedy(model, PX, 6))


@torch.no_grad()
def test_min_and_max_length(model):
    with torch.no_grad():
        model.qformer.lm_head.bias[EOS] += 50.0  # EOS would win at every step
    try:
        out = qformer_generate(model, PX, eos_token_id=EOS, num_beams=3, max_new_tokens=10, min_new_tokens=4)
        assert out.shape[1] == 5  # 4 forced tokens, then EOS
        assert (out[:, :4] != EOS).all() and (out[:, 4] == EOS).all()
        out = qformer_generate(model, PX, eos_token_id=EOS, num_beams=1, max_new_tokens=10, min_new_tokens=0)
        assert out.shape[1] == 1
    finally:
        with torch.no_grad():
            model.qformer.lm_head.bias[EOS] -= 50.0


@torch.no_grad()
def test_beam_search_shapes_and_one_beam_is_greedy(model):
    greedy = qformer_generate(model, PX, eos_token_id=EOS, num_beams=1, max_new_tokens=7, min_new_tokens=0)
    out = qformer_generate(model, PX, eos_token_id=EOS, num_beams=4, num_return_sequences=2, max_new_tokens=7)
    assert out.shape[0] == 6 and out.shape[1] <= 7
    assert greedy.shape[0] == 3


def test_caption_method_decodes_with_the_bert_tokenizer(tmp_path):
    from transformers import BertConfig, BertForMaskedLM

    from blip2 import from_bert
    from fixtures import make_bert_tokenizer, sample_image

    d = make_bert_tokenizer(tmp_path / "bert")
    from transformers import AutoTokenizer

    n = len(AutoTokenizer.from_pretrained(d))
    BertForMaskedLM(BertConfig(vocab_size=n, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                               intermediate_size=64, max_position_embeddings=64)).save_pretrained(d)
    vision = VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, mlp_hidden_size=64)
    model = from_bert(d, vision=vision, num_query_tokens=4).eval()
    assert model.processor.tokenizer.bos_token == "[DEC]"
    assert model.cfg.qformer.vocab_size == n + 1
    caps = model.caption([sample_image(40), sample_image(50)], max_new_tokens=5, min_new_tokens=2, num_beams=2)
    assert len(caps) == 2 and all(isinstance(c, str) and c for c in caps)
