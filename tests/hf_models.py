"""Tiny random models built with transformers' own classes: the independent reference for parity tests."""

from __future__ import annotations

import torch

VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
QFORMER = dict(hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=48, vocab_size=120,
               max_position_embeddings=64, cross_attention_frequency=2)
NUM_QUERY = 4
IMAGE_TOKEN = 250  # placeholder id inside the LLM vocabularies below

OPT = dict(model_type="opt", hidden_size=48, ffn_dim=96, num_hidden_layers=2, num_attention_heads=4,
           word_embed_proj_dim=48, vocab_size=256, max_position_embeddings=128, bos_token_id=2, eos_token_id=2,
           pad_token_id=1)
LLAMA_GQA = dict(model_type="llama", hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, vocab_size=256, max_position_embeddings=128,
                 bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
T5_UNTIED = dict(model_type="t5", d_model=48, d_kv=12, d_ff=96, num_layers=2, num_decoder_layers=2, num_heads=4,
                 vocab_size=256, feed_forward_proj="gated-gelu", tie_word_embeddings=False, pad_token_id=0,
                 eos_token_id=1, decoder_start_token_id=0, is_encoder_decoder=True)


def _randomize(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """transformers initialises many tensors to zeros/ones (biases, norms, query tokens, q/v biases); a parity
    test must exercise them, so fill every floating tensor with random values."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("qkv.bias"):
                D = p.shape[0] // 3
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
                p[D:2 * D] = 0  # the ViT has no k bias
            elif "norm" in name.lower() and name.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


def blip2_hf(text: dict | None = OPT, image_token: bool = True, seed: int = 0):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    cfg = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=dict(text),
                      num_query_tokens=NUM_QUERY, image_token_index=IMAGE_TOKEN if image_token else None)
    torch.manual_seed(seed)
    return _untie_t5(_randomize(Blip2ForConditionalGeneration(cfg), seed)).eval()


def _untie_t5(model):
    """transformers 5 always ties T5's head to its embeddings when building from a config; Flan-T5 checkpoints
    have a separate head. Give the reference model its own head so the untied path is exercised."""
    lm = model.language_model
    if lm.config.model_type == "t5":
        g = torch.Generator().manual_seed(99)
        lm.lm_head.weight = torch.nn.Parameter(torch.randn(lm.shared.weight.shape, generator=g) * 0.2)
        model.all_tied_weights_keys.pop("language_model.lm_head.weight", None)
        lm.all_tied_weights_keys.pop("lm_head.weight", None)
    return model


def instructblip_hf(text: dict = LLAMA_GQA, seed: int = 0):
    from transformers import InstructBlipConfig, InstructBlipForConditionalGeneration

    cfg = InstructBlipConfig(vision_config=VISION, qformer_config=QFORMER, text_config=dict(text),
                             num_query_tokens=NUM_QUERY, image_token_index=IMAGE_TOKEN)
    torch.manual_seed(seed)
    return _untie_t5(_randomize(InstructBlipForConditionalGeneration(cfg), seed)).eval()


def retrieval_hf(seed: int = 0):
    from transformers import Blip2Config, Blip2ForImageTextRetrieval

    cfg = Blip2Config(vision_config=VISION, qformer_config={**QFORMER, "use_qformer_text_input": True},
                      num_query_tokens=NUM_QUERY, image_text_hidden_size=16)
    torch.manual_seed(seed)
    return _randomize(Blip2ForImageTextRetrieval(cfg), seed).eval()


def pixels(batch: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def text_ids(batch: int, length: int, vocab: int, seed: int = 0, low: int = 3) -> torch.Tensor:
    return torch.randint(low, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


def with_placeholders(ids: torch.Tensor, mask: torch.Tensor | None = None, n: int = NUM_QUERY):
    """transformers' processor layout: num_query_tokens image placeholders in front of the text."""
    ph = torch.full((ids.shape[0], n), IMAGE_TOKEN, dtype=ids.dtype)
    out = torch.cat([ph, ids], 1)
    if mask is None:
        return out, torch.ones_like(out)
    return out, torch.cat([torch.ones_like(ph), mask], 1)


def checkpoint_with_processor(kind: str, d):
    """A transformers checkpoint directory (model + processor files) for `kind`, and the reference objects."""
    from transformers import (AutoTokenizer, Blip2Config, Blip2ForConditionalGeneration, Blip2Processor,
                              InstructBlipConfig, InstructBlipForConditionalGeneration, InstructBlipProcessor)
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    from fixtures import make_bert_tokenizer, make_gpt2_tokenizer, make_llama_tokenizer, make_t5_tokenizer

    llm = kind.split("-")[1]
    make = {"opt": make_gpt2_tokenizer, "llama": make_llama_tokenizer, "t5": make_t5_tokenizer}[llm]
    tok = AutoTokenizer.from_pretrained(make(d / "_tok", vocab_size=400))
    if "<image>" not in tok.get_vocab():
        tok.add_tokens(["<image>"], special_tokens=True)
    image_token = tok.convert_tokens_to_ids("<image>")
    text = {"opt": OPT, "llama": LLAMA_GQA, "t5": T5_UNTIED}[llm]
    text = {**text, "vocab_size": len(tok) + 8, "pad_token_id": tok.pad_token_id,
            "eos_token_id": tok.eos_token_id, "bos_token_id": tok.bos_token_id}
    ip = BlipImageProcessorPil(size={"height": 32, "width": 32})
    torch.manual_seed(0)
    if kind.startswith("instructblip"):
        qtok = AutoTokenizer.from_pretrained(make_bert_tokenizer(d / "_qtok"))
        cfg = InstructBlipConfig(vision_config=VISION, qformer_config={**QFORMER, "vocab_size": 400},
                                 text_config=text, num_query_tokens=NUM_QUERY, image_token_index=image_token)
        hf = InstructBlipForConditionalGeneration(cfg)
        proc = InstructBlipProcessor(image_processor=ip, tokenizer=tok, qformer_tokenizer=qtok,
                                     num_query_tokens=NUM_QUERY)
    else:
        cfg = Blip2Config(vision_config=VISION, qformer_config=QFORMER, text_config=text,
                          num_query_tokens=NUM_QUERY, image_token_index=image_token)
        hf = Blip2ForConditionalGeneration(cfg)
        proc = Blip2Processor(image_processor=ip, tokenizer=tok, num_query_tokens=NUM_QUERY)
    hf = _untie_t5(_randomize(hf, 1)).eval()
    hf.save_pretrained(d)
    proc.save_pretrained(d)
    return hf, proc
