"""Presets vs the public Salesforce checkpoints: architecture facts and parameter counts.

The reference is written here, independently of `blip2.config`: one transformers `config.json` dict per public
checkpoint, copied from the Hugging Face hub (source cited next to each), built with transformers' own classes
on the meta device (no memory, no download) and checked against a published parameter figure. Then:
  * our preset's `to_hf()` must resolve to the same architecture fields as the hub config,
  * transformers built from our `to_hf()` must have exactly as many parameters as from the hub config,
  * our own `Blip2Model` built from the preset must have exactly that many parameters too.

Counts are "as the checkpoint stores them": every tensor once. Flan-T5 has an untied LM head (hub
`tie_word_embeddings: false`, a separate `lm_head.weight` in the files), but transformers 5 forces
`T5Config.tie_word_embeddings=True`, ties `lm_head` to `shared` at construction and unties only while loading
a file whose two tensors differ; on the meta device we add the head back by hand.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

transformers = pytest.importorskip("transformers")

# ----------------------------------------------------------------------------------------- hub facts
# Only the keys the hub files set; everything else is a transformers default, exactly as when the hub file loads.
# Sources (HF = https://huggingface.co/Salesforce):
#   OPT_27  HF/blip2-opt-2.7b config.json @ec3c346 (transformers 4.47.0.dev0: `<image>` = 50265 appended to the
#           50265-token GPT-2 vocabulary, embeddings resized with pad_to_multiple_of=64 -> 50304).
#   OPT_67  facebook/opt-6.7b shapes as in HF/blip2-opt-6.7b; vocab 50304 / image token 50265 assumed from the
#           same 4.47 update (not seen directly; 50272 vs 50304 changes the count by 131k, below 0.01B).
#   T5_XL   HF/blip2-flan-t5-xl config.json (4.47.0.dev0, quoted in a transformers issue) and the conversion
#           script `T5Config.from_pretrained("google/flan-t5-xl", dense_act_fn="gelu", bos_token_id=1)`.
#   T5_XXL  HF/blip2-flan-t5-xxl config.json @e9ddf63 and HF/instructblip-flan-t5-xxl config.json @0a81e90.
#   ITM     HF/blip2-itm-vit-g config.json @ef22649 (and refs/pr/6): Q-Former vocab 30523, text input on.
#   VIC_7   HF/instructblip-vicuna-7b config.json @92cb457 (4.47.0.dev0): vocab 32064 (32000 + [PAD] +
#           <image> padded to 64), image token 32001, pad 32000; bos/eos 0/1 inherited from
#           decapoda-research/llama-7b-hf (see VICUNA_TOKENS below).
#   VIC_13  HF/instructblip-vicuna-13b shapes (4.36 config: 5120/13824/40/40); the 4.47 update assumed as VIC_7
#           (its added_tokens.json has <image> = 32001).
# InstructBLIP Q-Formers have the [DEC] token: vocab 30522 + 1 = 30523 (conversion script and every hub config).
_OPT = {"model_type": "opt", "eos_token_id": 50118, "vocab_size": 50304}
_T5 = {"model_type": "t5", "bos_token_id": 1, "d_kv": 64, "decoder_start_token_id": 0, "dense_act_fn": "gelu",
       "eos_token_id": 1, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True, "is_gated_act": True,
       "layer_norm_epsilon": 1e-6, "num_layers": 24, "num_decoder_layers": 24, "pad_token_id": 0,
       "relative_attention_max_distance": 128, "relative_attention_num_buckets": 32,
       "tie_word_embeddings": False, "vocab_size": 32128}
_VICUNA = {"model_type": "llama", "bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 32000,
           "hidden_act": "silu", "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "vocab_size": 32064}
OPT_27 = {**_OPT, "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32, "num_attention_heads": 32,
          "word_embed_proj_dim": 2560}
OPT_67 = {**_OPT, "hidden_size": 4096, "ffn_dim": 16384, "num_hidden_layers": 32, "num_attention_heads": 32,
          "word_embed_proj_dim": 4096}
T5_XL = {**_T5, "d_model": 2048, "d_ff": 5120, "num_heads": 32}
T5_XXL = {**_T5, "d_model": 4096, "d_ff": 10240, "num_heads": 64}
VIC_7 = {**_VICUNA, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32}
VIC_13 = {**_VICUNA, "hidden_size": 5120, "intermediate_size": 13824, "num_hidden_layers": 40,
          "num_attention_heads": 40, "num_key_value_heads": 40}
IB_QFORMER = {"vocab_size": 30523}


def _blip2(text, image_token):
    return {"architectures": ["Blip2ForConditionalGeneration"], "model_type": "blip-2", "num_query_tokens": 32,
            "image_token_index": image_token, "qformer_config": {}, "vision_config": {}, "text_config": text}


def _instructblip(text, image_token):
    return {"architectures": ["InstructBlipForConditionalGeneration"], "model_type": "instructblip",
            "num_query_tokens": 32, "image_token_index": image_token, "qformer_config": dict(IB_QFORMER),
            "vision_config": {}, "text_config": text, "tie_word_embeddings": False}


HUB = {
    "blip2-opt-2.7b": _blip2(OPT_27, 50265),
    "blip2-opt-6.7b": _blip2(OPT_67, 50265),
    "blip2-flan-t5-xl": _blip2(T5_XL, 32100),
    "blip2-flan-t5-xxl": _blip2(T5_XXL, 32100),
    "blip2-itm-vit-g": {"architectures": ["Blip2ForImageTextRetrieval"], "model_type": "blip-2",
                        "num_query_tokens": 32, "image_text_hidden_size": 256, "vision_config": {},
                        "qformer_config": {"use_qformer_text_input": True, "vocab_size": 30523}},
    "instructblip-vicuna-7b": _instructblip(VIC_7, 32001),
    "instructblip-vicuna-13b": _instructblip(VIC_13, 32001),
    "instructblip-flan-t5-xl": _instructblip(T5_XL, 32100),
    "instructblip-flan-t5-xxl": _instructblip(T5_XXL, 32100),
}
NAMES = sorted(HUB)

# The Vicuna hub configs say bos 0 / eos 1 (copied from decapoda-research/llama-7b-hf, whose ids are wrong for
# this tokenizer). The checkpoint's tokenizer (hub special_tokens_map.json: bos = eos = unk = "</s>",
# pad = "[PAD]"; LAVIS sets the same) has "</s>" = 2, and transformers' own integration test expects prompts to
# start `[32001] * 32 + [2, ...]`. A preset should carry the ids the model really uses.
VICUNA_TOKENS = {"bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 32000}

# Published sizes. "B": (billions as printed, source) from the hub's safetensors "Model size" as mirrored on
# promptlayer.com/models/<name> (3.74B also shown by hf.co/qcee/wd, a re-save with the 4.47 opt-2.7b config).
# "bytes": exact fp32 model.safetensors size = 4 bytes/param + a JSON header. "GB": fp32 safetensors shard
# sizes as the hub file listing prints them (3 significant digits, 1 GB = 1e9 bytes).
PUBLISHED = {
    "blip2-opt-2.7b": {"B": "3.74"},  # promptlayer.com/models/blip2-opt-27b-3cd6
    "blip2-opt-6.7b": {"B": "7.75"},  # promptlayer.com/models/blip2-opt-67b
    "blip2-flan-t5-xl": {"B": "3.94"},  # promptlayer.com/models/blip2-flan-t5-xl-5c18
    "blip2-flan-t5-xxl": {"B": "12.2"},  # promptlayer.com/models/blip2-flan-t5-xxl
    "blip2-itm-vit-g": {"bytes": 4_688_228_520},  # HF/blip2-itm-vit-g commit ef22649, model.safetensors
    "instructblip-vicuna-7b": {"GB": ["9.9", "9.96", "9.92", "1.88"]},  # tree @92cb457
    "instructblip-vicuna-13b": {"GB": ["9.87", "9.87", "9.94", "9.94", "9.87", "7.28"]},  # tree refs/pr/3
    "instructblip-flan-t5-xl": {"GB": ["9.98", "6.11"]},  # tree main (#9)
    "instructblip-flan-t5-xxl": {"GB": ["9.99", "9.97", "9.87", "10", "9.42"]},  # tree @68a664f
}
HEADER_BYTES = 1_000_000  # generous bound on one safetensors JSON header (~100 kB for ~1000 tensors)


# ------------------------------------------------------------------------------------------- helpers
def _hf_classes(d: dict):
    from transformers import (Blip2Config, Blip2ForConditionalGeneration, Blip2ForImageTextRetrieval,
                              InstructBlipConfig, InstructBlipForConditionalGeneration)

    arch = d["architectures"][0]
    return {
        "Blip2ForConditionalGeneration": (Blip2Config, Blip2ForConditionalGeneration),
        "Blip2ForImageTextRetrieval": (Blip2Config, Blip2ForImageTextRetrieval),
        "InstructBlipForConditionalGeneration": (InstructBlipConfig, InstructBlipForConditionalGeneration),
    }[arch]


def _hf_config(d: dict):
    config_cls, _ = _hf_classes(d)
    return config_cls.from_dict(copy.deepcopy(d))


def _checkpoint_numel(d: dict) -> int:
    """Parameters of the transformers model for config dict `d`, counted as its checkpoint stores them."""
    _, model_cls = _hf_classes(d)
    with torch.device("meta"):
        model = model_cls(_hf_config(d))
    n = sum(p.numel() for p in model.parameters())  # parameters() yields each tied tensor once
    lm = getattr(model, "language_model", None)
    untied_head = (d.get("text_config") or {}).get("tie_word_embeddings") is False
    if lm is not None and untied_head and hasattr(lm, "lm_head"):
        if lm.lm_head.weight is lm.get_input_embeddings().weight:  # transformers 5 tied it anyway (T5)
            n += lm.lm_head.weight.numel()
    return n


@functools.lru_cache(maxsize=None)
def hub_numel(name: str) -> int:
    return _checkpoint_numel(HUB[name])


def _ours(name: str):
    from blip2.config import Blip2Config

    return Blip2Config.from_preset(name)


def _gb_bounds(sizes: list[str]) -> tuple[float, float]:
    """Byte range of a sum of sizes printed with 3 significant digits ("9.9" may be 9.895..9.905 GB; "10" may
    be 9.95..10.05 GB)."""
    lo = hi = 0.0
    for s in sizes:
        v = float(s)
        half = 0.005 if v < 10 else 0.05
        lo, hi = lo + (v - half) * 1e9, hi + (v + half) * 1e9
    return lo, hi


# ------------------------------------------------------------------------- reference vs published
def test_hub_reference_is_not_tautological():
    """The reference can fail: a Q-Former vocab off by one, or Flan-T5's head counted as tied, change counts."""
    d = copy.deepcopy(HUB["instructblip-flan-t5-xl"])
    d["qformer_config"]["vocab_size"] = 30522
    assert hub_numel("instructblip-flan-t5-xl") - _checkpoint_numel(d) == 768
    d = copy.deepcopy(HUB["blip2-flan-t5-xl"])
    d["text_config"]["tie_word_embeddings"] = True
    assert hub_numel("blip2-flan-t5-xl") - _checkpoint_numel(d) == 32128 * 2048


@pytest.mark.parametrize("name", NAMES)
def test_hub_config_matches_published_size(name):
    n = hub_numel(name)
    pub = PUBLISHED[name]
    if "B" in pub:
        printed = pub["B"]
        decimals = len(printed.split(".")[1])
        assert abs(n / 1e9 - float(printed)) <= 0.5 * 10 ** -decimals, (
            f"{name}: transformers on the hub config has {n / 1e9:.4f}B parameters, published {printed}B")
    elif "bytes" in pub:
        header = pub["bytes"] - 4 * n
        assert 0 < header < HEADER_BYTES, (
            f"{name}: 4 x {n} parameters = {4 * n} bytes vs model.safetensors {pub['bytes']} bytes")
    else:
        lo, hi = _gb_bounds(pub["GB"])
        size = 4 * n
        assert lo - HEADER_BYTES * len(pub["GB"]) <= size <= hi, (
            f"{name}: 4 x {n} parameters = {size / 1e9:.3f} GB, hub fp32 shards {pub['GB']} = "
            f"{lo / 1e9:.3f}..{hi / 1e9:.3f} GB")


# ------------------------------------------------------------------------------ our preset's fields
VISION_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
               "patch_size", "hidden_act", "layer_norm_eps", "qkv_bias")
QFORMER_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                "hidden_act", "max_position_embeddings", "layer_norm_eps", "cross_attention_frequency",
                "encoder_hidden_size", "pad_token_id")
TEXT_KEYS = {
    "opt": ("vocab_size", "hidden_size", "ffn_dim", "num_hidden_layers", "num_attention_heads",
            "word_embed_proj_dim", "max_position_embeddings", "activation_function", "do_layer_norm_before",
            "enable_bias", "layer_norm_elementwise_affine", "bos_token_id", "eos_token_id", "pad_token_id"),
    "t5": ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
           "feed_forward_proj", "dense_act_fn", "is_gated_act", "layer_norm_epsilon",
           "relative_attention_num_buckets", "relative_attention_max_distance", "bos_token_id", "eos_token_id",
           "pad_token_id", "decoder_start_token_id"),
    "llama": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "hidden_act", "rms_norm_eps", "max_position_embeddings", "bos_token_id",
              "eos_token_id", "pad_token_id"),
}
# tie_word_embeddings is read from the dicts: transformers 5 rewrites it to True for every T5 config.
TIE_DEFAULT = {"opt": True, "t5": True, "llama": False}


def _expected_text(name: str, key: str, hub_value):
    if name.startswith("instructblip-vicuna") and key in VICUNA_TOKENS:
        return VICUNA_TOKENS[key]
    return hub_value


def _field_mismatches(name: str) -> list[str]:
    hub_d, ours_d = HUB[name], _ours(name).to_hf()
    hub, ours = _hf_config(hub_d), _hf_config(ours_d)
    bad = []

    def cmp(where, key, mine, want):
        if mine != want:
            bad.append(f"{where}.{key}: ours {mine!r}, hub {want!r}")

    cmp("config", "architectures", ours_d.get("architectures"), hub_d["architectures"])
    for key in ("num_query_tokens", "image_token_index"):
        cmp("config", key, getattr(ours, key, None), getattr(hub, key, None))
    if "image_text_hidden_size" in hub_d:
        cmp("config", "image_text_hidden_size", ours.image_text_hidden_size, hub.image_text_hidden_size)
    for key in VISION_KEYS:
        cmp("vision_config", key, getattr(ours.vision_config, key), getattr(hub.vision_config, key))
    for key in QFORMER_KEYS:
        cmp("qformer_config", key, getattr(ours.qformer_config, key), getattr(hub.qformer_config, key))
    if "use_qformer_text_input" in hub_d["qformer_config"]:
        cmp("qformer_config", "use_qformer_text_input", ours.qformer_config.use_qformer_text_input, True)
    if "text_config" not in hub_d:
        return bad
    mt = hub_d["text_config"]["model_type"]
    cmp("text_config", "model_type", ours.text_config.model_type, mt)
    if ours.text_config.model_type != mt:
        return bad
    for key in TEXT_KEYS[mt]:
        # getattr with a default: transformers 5 configs have no attribute for an unset token id (T5 bos)
        want = _expected_text(name, key, getattr(hub.text_config, key, None))
        cmp("text_config", key, getattr(ours.text_config, key, None), want)
    cmp("text_config", "tie_word_embeddings", ours_d["text_config"].get("tie_word_embeddings", TIE_DEFAULT[mt]),
        hub_d["text_config"].get("tie_word_embeddings", TIE_DEFAULT[mt]))
    if image_token := hub_d.get("image_token_index"):
        # the placeholder id must be a row of the (resized) embedding matrix
        if not image_token < ours.text_config.vocab_size:
            bad.append(f"image_token_index {image_token} >= text vocab_size {ours.text_config.vocab_size}")
    return bad


@pytest.mark.parametrize("name", NAMES)
def test_preset_fields_match_hub(name):
    bad = _field_mismatches(name)
    assert not bad, f"preset {name!r} differs from the hub config:\n  " + "\n  ".join(bad)


# ------------------------------------------------------------------------------- parameter counts
@pytest.mark.parametrize("name", NAMES)
def test_preset_to_hf_has_hub_parameter_count(name):
    """transformers built from our to_hf() = transformers built from the hub config (whole architecture)."""
    n = _checkpoint_numel(_ours(name).to_hf())
    assert n == hub_numel(name), f"{name}: to_hf() gives {n} parameters, hub config {hub_numel(name)}"


def _our_numel(name: str) -> tuple[int, int, int]:
    """Our Blip2Model on meta: (unique parameters, LAVIS's ITC temperature, zero ViT k-biases not stored).

    Two storage differences from the transformers checkpoint are allowed, each exactly: transformers stores no
    temperature (see docs/architecture.md), and it stores each ViT block's qkv bias as cat(q_bias, 0, v_bias) [3D]
    where a LAVIS-style tower keeps only q_bias and v_bias [D each], so D zeros per block are not parameters here."""
    pytest.importorskip("blip2.model", reason="blip2.model not written yet")
    from blip2.model import Blip2Model

    model = Blip2Model.from_config(_ours(name), device="meta")
    params = list(model.unique_parameters())
    n = sum(p.numel() for p in params)
    temp = getattr(model, "temp", None)
    n_temp = temp.numel() if isinstance(temp, torch.nn.Parameter) and any(p is temp for p in params) else 0
    v = model.cfg.vision
    full_qkv_bias = any(k.endswith("qkv.bias") and p.numel() == 3 * v.hidden_size
                        for k, p in model.vision.named_parameters())
    k_bias = 0 if full_qkv_bias or not v.qkv_bias else v.num_layers * v.hidden_size
    return n, n_temp, k_bias


@pytest.mark.parametrize("name", NAMES)
def test_our_model_has_hub_parameter_count(name):
    n, n_temp, k_bias = _our_numel(name)
    want = hub_numel(name) - k_bias
    assert n - n_temp == want, (
        f"{name}: Blip2Model has {n} unique parameters ({n_temp} in `temp`), the transformers checkpoint "
        f"{hub_numel(name)} ({k_bias} of them zero ViT k-biases we do not store); difference {n - n_temp - want:+d}")
