"""`build_model` for a model assembled from parts: an LLM directory (config, weights, tokenizer), the vision and
Q-Former sections, `qformer_init` as a list, and the Q-Former initialised from a BERT directory."""

from __future__ import annotations

import pytest
import torch

from blip2.train.build import build_model
from blip2.train.config import ModelSection, RunConfig

VISION = dict(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4, mlp_hidden_size=64)
QFORMER = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=48, num_query_tokens=4,
               vocab_size=100, max_position_embeddings=64)
PARTS = ("vision.", "ln_vision.", "qformer.", "language_projection.")


@pytest.fixture(scope="module")
def llm_dir(tmp_path_factory):
    """A tiny random LlamaForCausalLM (untied head) and a tiny Llama tokenizer in one directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from blip2.tiny import make_llama_tokenizer

    d = tmp_path_factory.mktemp("llama")
    make_llama_tokenizer(d, vocab_size=400)
    cfg = LlamaConfig(vocab_size=400, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                      eos_token_id=2, tie_word_embeddings=False)
    torch.manual_seed(0)
    llm = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in llm.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norms are ones at init
    llm.save_pretrained(d)
    return d, llm


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    """A tiny random BERT with the Q-Former's width, depth and FFN size, and a tiny BERT tokenizer."""
    from fixtures import save_tiny_bert

    return save_tiny_bert(tmp_path_factory.mktemp("bert"), seed=1, hidden_size=QFORMER["hidden_size"],
                          num_hidden_layers=QFORMER["num_layers"], num_attention_heads=QFORMER["num_heads"],
                          intermediate_size=QFORMER["intermediate_size"])


def _cfg(stage: str, llm: str, **model) -> RunConfig:
    return RunConfig(stage=stage, model=ModelSection(llm_path=str(llm), vision=dict(VISION), qformer=dict(QFORMER),
                                                     image_token=False, **model))


def _build(cfg: RunConfig, work, seed: int = 0):
    torch.manual_seed(seed)
    return build_model(cfg, work)


def _parts(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.startswith(PARTS)}


# ------------------------------------------------------------------------------------------ from parts
def test_stage2_from_llm_directory(llm_dir, tmp_path):
    from transformers import AutoTokenizer, LlamaConfig

    d, ref = llm_dir
    model = _build(_cfg("stage2", d), tmp_path / "work")
    assert model.cfg.architecture == "blip2" and model.cfg.llm.model_type == "llama"
    assert not model.cfg.qformer.use_text and model.processor.qformer_tokenizer is None

    ours, theirs = model.llm.state_dict(), ref.state_dict()
    assert set(ours) == set(theirs)
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k
    saved = LlamaConfig.from_pretrained(str(d))
    assert model.llm.config.hidden_size == saved.hidden_size == 48
    assert model.llm.config.num_hidden_layers == saved.num_hidden_layers == 3
    assert model.language_projection.out_features == saved.hidden_size

    tok = AutoTokenizer.from_pretrained(str(d))
    got = model.processor.tokenizer
    assert type(got) is type(tok) and got.get_vocab() == tok.get_vocab()
    text = "a photo of a cat on a couch"
    assert got(text)["input_ids"] == tok(text)["input_ids"]
    # the frozen towers are frozen, the Q-Former trains
    assert not any(p.requires_grad for p in model.llm.parameters())
    assert not any(p.requires_grad for p in model.vision.parameters())
    assert all(p.requires_grad for p in model.qformer.parameters())


def test_instruct_stage_with_either_architecture(llm_dir, bert_dir, tmp_path):
    d, _ = llm_dir
    # blip2: the instruction reaches the LLM only (no Q-Former text side, no Q-Former tokenizer)
    plain = _build(_cfg("instruct", d, architecture="blip2"), tmp_path / "a")
    assert plain.cfg.architecture == "blip2"
    assert not plain.cfg.qformer.use_text and not hasattr(plain.qformer.embeddings, "word_embeddings")
    assert all(layer.ffn_text is None for layer in plain.qformer.layers)
    assert plain.processor.qformer_tokenizer is None
    # instructblip: the instruction goes into the Q-Former too
    ib = _build(_cfg("instruct", d, architecture="instructblip", qformer_tokenizer=str(bert_dir)), tmp_path / "b")
    assert ib.cfg.architecture == "instructblip" and ib.cfg.qformer.use_text
    assert hasattr(ib.qformer.embeddings, "word_embeddings")
    assert all(layer.ffn_text is not None for layer in ib.qformer.layers)
    q_tok = ib.processor.qformer_tokenizer
    assert q_tok is not None and ib.qformer.embeddings.word_embeddings.num_embeddings >= len(q_tok)
    # the default architecture of the instruct stage is instructblip
    default = _build(_cfg("instruct", d, qformer_tokenizer=str(bert_dir)), tmp_path / "c")
    assert default.cfg.architecture == "instructblip"


# ------------------------------------------------------------------------------------------ qformer_init
def test_qformer_init_list_copies_in_order(llm_dir, tmp_path):
    from blip2.checkpoint import save_pretrained

    d, _ = llm_dir
    a = _build(_cfg("stage2", d), tmp_path / "wa", seed=1)
    c = _build(_cfg("stage2", d), tmp_path / "wc", seed=3)
    save_pretrained(a, tmp_path / "A")
    save_pretrained(c, tmp_path / "C")
    pa, pc = _parts(a), _parts(c)
    assert {k.split(".")[0] for k in pa} == {p[:-1] for p in PARTS}
    assert "qformer.query_tokens" in pa

    fresh = _parts(_build(_cfg("stage2", d), tmp_path / "wf", seed=2))
    assert any(not torch.equal(fresh[k], pa[k]) for k in pa if k.startswith("qformer."))
    assert not torch.equal(fresh["language_projection.weight"], pa["language_projection.weight"])

    b = _parts(_build(_cfg("stage2", d, qformer_init=[str(tmp_path / "A")]), tmp_path / "wb", seed=2))
    assert set(b) == set(pa)
    for k, v in pa.items():
        assert torch.equal(b[k], v), k
    # a list is copied in order: the last directory wins
    b2 = _parts(_build(_cfg("stage2", d, qformer_init=[str(tmp_path / "A"), str(tmp_path / "C")]),
                       tmp_path / "wb2", seed=2))
    for k, v in pc.items():
        assert torch.equal(b2[k], v), k


# ------------------------------------------------------------------------------------------ model.bert
def test_stage2_qformer_from_bert_without_text_side(llm_dir, bert_dir, tmp_path):
    from transformers import BertModel

    d, _ = llm_dir
    model = _build(_cfg("stage2", d, bert=str(bert_dir)), tmp_path / "work")
    assert model.cfg.architecture == "blip2" and not model.cfg.qformer.use_text
    bert = BertModel.from_pretrained(str(bert_dir)).state_dict()
    for i, layer in enumerate(model.qformer.layers):
        pre = f"encoder.layer.{i}."
        pairs = [(layer.attention.query.weight, "attention.self.query.weight"),
                 (layer.attention.query.bias, "attention.self.query.bias"),
                 (layer.attention.key.weight, "attention.self.key.weight"),
                 (layer.attention.value.weight, "attention.self.value.weight"),
                 (layer.attention.out.weight, "attention.output.dense.weight"),
                 (layer.attention.norm.weight, "attention.output.LayerNorm.weight"),
                 (layer.ffn_query.fc1.weight, "intermediate.dense.weight"),
                 (layer.ffn_query.fc1.bias, "intermediate.dense.bias"),
                 (layer.ffn_query.fc2.weight, "output.dense.weight"),
                 (layer.ffn_query.norm.bias, "output.LayerNorm.bias")]
        for ours, key in pairs:
            assert torch.equal(ours, bert[pre + key]), pre + key
    # cross-attention has no BERT counterpart: it keeps its random init (different from every BERT tensor)
    cross = model.qformer.layers[0].crossattention.query.weight
    assert not torch.equal(cross, bert["encoder.layer.0.attention.self.query.weight"])
    assert torch.equal(model.qformer.embeddings.layernorm.weight, bert["embeddings.LayerNorm.weight"])
