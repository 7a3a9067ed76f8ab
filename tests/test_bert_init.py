"""Q-Former initialised from a BERT checkpoint directory: text-only outputs equal BERT's (transformers)."""

from __future__ import annotations

import pytest
import torch

from blip2.checkpoint import CheckpointError
from blip2.convert_bert import init_qformer_from_bert, qformer_config_from_bert
from blip2.qformer import QFormer



@pytest.fixture(autouse=True)
def _no_grad():
    with torch.no_grad():
        yield


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=90, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48,
                     max_position_embeddings=40, type_vocab_size=2)
    bert = BertForMaskedLM(cfg).eval()
    with torch.no_grad():
        for p in bert.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # non-trivial biases and norms
    d = tmp_path_factory.mktemp("bert")
    bert.save_pretrained(d)
    return d, bert


def _qformer(d, **kw):
    cfg = qformer_config_from_bert(d, num_query_tokens=4, encoder_hidden_size=16, hidden_dropout=0.0,
                                   attention_dropout=0.0, **kw)
    torch.manual_seed(1)
    q = QFormer(cfg).eval()
    report = init_qformer_from_bert(q, d)
    return q, report


def test_text_pass_equals_bert(bert_dir):
    d, bert = bert_dir
    q, _ = _qformer(d)
    ids = torch.randint(1, 90, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    ref = bert(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    out = q(None, ids, mask, mode="itc", with_queries=False).text_output
    torch.testing.assert_close(out[0], ref.hidden_states[-1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1, :5], ref.hidden_states[-1][1, :5], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(q.lm_logits(out)[0], ref.logits[0], atol=1e-4, rtol=1e-4)


def test_query_ffn_copied_and_cross_attention_random(bert_dir):
    d, _ = bert_dir
    q, report = _qformer(d)
    for layer in q.layers:
        torch.testing.assert_close(layer.ffn_query.fc1.weight, layer.ffn_text.fc1.weight)
        torch.testing.assert_close(layer.ffn_query.norm.bias, layer.ffn_text.norm.bias)
    assert any("crossattention" in k for k in report["random"])
    assert "query_tokens" in report["random"]
    assert not any("crossattention" in k for k in report["copied"])


def test_dec_token_row_appended(bert_dir):
    d, bert = bert_dir
    q, _ = _qformer(d, vocab_size=91)  # BERT vocabulary + [DEC]
    w = q.embeddings.word_embeddings.weight
    torch.testing.assert_close(w[:90], bert.bert.embeddings.word_embeddings.weight)
    assert w.shape[0] == 91


def test_shape_mismatch_is_a_clear_error(bert_dir):
    d, _ = bert_dir
    cfg = qformer_config_from_bert(d, num_query_tokens=4, encoder_hidden_size=16, intermediate_size=40)
    with pytest.raises(CheckpointError, match=r"ffn_text\.fc1\.(weight|bias): BERT shape"):
        init_qformer_from_bert(QFormer(cfg), d)
