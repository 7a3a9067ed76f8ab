"""Configuration dataclasses for BLIP-2 / InstructBLIP, validated on construction, with named presets.

One config per part (vision tower, Q-Former, LLM) and one for the whole model. `Blip2Config.from_hf(dict)`
reads a transformers `config.json`; `Blip2Config.to_hf()` writes one that transformers' own classes load.
Presets are plain dicts of keyword arguments: `Blip2Config.from_preset("blip2-opt-2.7b")`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import AutoConfig

ARCHITECTURES = ("blip2", "instructblip", "blip2-retrieval")

# transformers class name <-> our architecture name
HF_ARCHITECTURES = {
    "Blip2ForConditionalGeneration": "blip2",
    "Blip2Model": "blip2",
    "InstructBlipForConditionalGeneration": "instructblip",
    "InstructBlipModel": "instructblip",
    "Blip2ForImageTextRetrieval": "blip2-retrieval",
}
HF_MODEL_TYPES = {"blip-2": "blip2", "instructblip": "instructblip"}


class ConfigError(ValueError):
    """A configuration value is missing, of the wrong type or out of range."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _from_dict(cls, d: dict[str, Any], where: str):
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; allowed: {sorted(names)}")
    return cls(**d)


@dataclass
class VisionConfig:
    """The frozen image encoder.

    kind="eva": our EVA/CLIP-style pre-LN ViT (EVA ViT-g/14 with the defaults), `num_layers` blocks are built
    (BLIP-2 uses 39 of the 40 pretrained blocks). kind="timm": any timm ViT by `timm_name`, features taken
    after block `timm_block` (negative counts from the end; -2 = the second-to-last block, as BLIP-2 does).
    kind="cnn": a small convolutional tower (`vision.ConvTower`): one conv stage per entry of `cnn_channels`,
    each halving the resolution, so `patch_size` (the total stride) must be 2 ** len(cnn_channels); it gives
    (image_size / patch_size)^2 tokens of width `hidden_size`. It has no transformers class: checkpoints with it
    load in blip2 only.
    """

    kind: str = "eva"
    image_size: int = 224
    patch_size: int = 14
    hidden_size: int = 1408
    num_layers: int = 39
    num_heads: int = 16
    mlp_hidden_size: int = 6144
    layer_norm_eps: float = 1e-6
    qkv_bias: bool = True
    hidden_act: str = "gelu"
    ln_vision_eps: float = 1e-5  # the trainable LayerNorm after the tower (LAVIS 1e-5; transformers: layer_norm_eps)
    timm_name: str | None = None
    timm_block: int = -2
    timm_pretrained: bool = False
    cnn_channels: tuple[int, ...] = (32, 64, 128)

    def __post_init__(self):
        _check(self.kind in ("eva", "timm", "cnn"), f"vision.kind must be 'eva', 'timm' or 'cnn', got {self.kind!r}")
        self.cnn_channels = tuple(int(c) for c in self.cnn_channels)
        if self.kind == "cnn":
            _check(len(self.cnn_channels) >= 1 and min(self.cnn_channels) > 0,
                   f"vision.cnn_channels must be positive widths, got {list(self.cnn_channels)}")
            _check(self.patch_size == 2 ** len(self.cnn_channels),
                   f"vision.patch_size {self.patch_size} must be 2 ** len(cnn_channels) = "
                   f"{2 ** len(self.cnn_channels)} for kind='cnn' (each conv stage halves the resolution)")
            _check(self.hidden_size % 4 == 0, f"vision.hidden_size {self.hidden_size} must be divisible by 4 "
                                              "for kind='cnn' (2-D sine-cosine position codes)")
        if self.kind == "timm":
            _check(bool(self.timm_name), "vision.timm_name is required when vision.kind='timm'")
        _check(self.image_size > 0 and self.patch_size > 0, "vision.image_size and patch_size must be > 0")
        _check(self.image_size % self.patch_size == 0,
               f"vision.image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        _check(self.hidden_size % self.num_heads == 0,
               f"vision.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        _check(self.num_layers >= 1, "vision.num_layers must be >= 1")
        _check(self.hidden_act in ("gelu", "quick_gelu"), f"vision.hidden_act {self.hidden_act!r} unsupported")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


@dataclass
class QFormerConfig:
    """The Q-Former: a BERT-shaped transformer with learned queries and cross-attention to the image.

    `use_text=True` builds the text side (word/position embeddings and the text FFN in every layer): needed for
    stage 1 and InstructBLIP; BLIP-2 generation checkpoints drop it. `lm_head=True` adds the BERT MLM/LM head
    (stage-1 ITG and Q-Former captioning).
    """

    vocab_size: int = 30522
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    bos_token_id: int | None = None  # the [DEC] id when known
    cross_attention_frequency: int = 2
    encoder_hidden_size: int = 1408
    num_query_tokens: int = 32
    initializer_range: float = 0.02  # std of the random init (BERT's 0.02 suits width 768; scale ~1/sqrt(width))
    use_text: bool = False
    lm_head: bool = False

    def __post_init__(self):
        _check(self.hidden_size % self.num_heads == 0,
               f"qformer.hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        _check(self.cross_attention_frequency >= 1, "qformer.cross_attention_frequency must be >= 1")
        _check(self.num_query_tokens >= 1, "qformer.num_query_tokens must be >= 1")
        _check(0.0 <= self.hidden_dropout < 1 and 0.0 <= self.attention_dropout < 1, "qformer dropout must be in [0, 1)")
        _check(self.hidden_act in ("gelu", "gelu_new", "relu"), f"qformer.hidden_act {self.hidden_act!r} unsupported")
        if self.lm_head:
            _check(self.use_text, "qformer.lm_head=True needs use_text=True")

    def has_cross_attention(self, layer: int) -> bool:
        return layer % self.cross_attention_frequency == 0


@dataclass
class LLMConfig:
    """The frozen language model: a transformers config dict (`model_type` plus its fields)."""

    hf_config: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        _check("model_type" in self.hf_config, "llm.hf_config needs a 'model_type' (e.g. 'opt', 'llama', 't5')")
        self.hf_config = dict(self.hf_config)
        self.hf_config.pop("_name_or_path", None)

    @property
    def model_type(self) -> str:
        return self.hf_config["model_type"]

    @property
    def is_encoder_decoder(self) -> bool:
        if "is_encoder_decoder" in self.hf_config:
            return bool(self.hf_config["is_encoder_decoder"])
        return self.model_type in ("t5", "mt5", "umt5", "bart", "mbart", "pegasus", "longt5")

    def to_transformers(self):
        """The transformers config object."""
        d = dict(self.hf_config)
        mt = d.pop("model_type")
        try:
            return AutoConfig.for_model(mt, **d)
        except ValueError as e:
            raise ConfigError(f"llm.hf_config: transformers does not know model_type {mt!r}: {e}") from None

    @property
    def hidden_size(self) -> int:
        c = self.hf_config
        for k in ("hidden_size", "d_model", "n_embd"):
            if k in c:
                return int(c[k])
        return int(self.to_transformers().hidden_size)


@dataclass
class Blip2Config:
    """The whole model. architecture: 'blip2' (Q-Former -> LLM), 'instructblip' (instruction into the
    Q-Former too), 'blip2-retrieval' (no LLM; stage-1 heads for ITC/ITM)."""

    architecture: str = "blip2"
    vision: VisionConfig = field(default_factory=VisionConfig)
    qformer: QFormerConfig = field(default_factory=QFormerConfig)
    llm: LLMConfig | None = None
    image_text_hidden_size: int = 256  # ITC projection width (stage-1 heads)
    image_token_index: int | None = None  # the LLM's image placeholder id (transformers >= 4.47 checkpoints)
    stage1_heads: bool = False  # vision_proj / text_proj / itm_head / temp
    qformer_max_text_len: int = 128  # InstructBLIP instruction length in the Q-Former
    vision_trainable: bool = False  # the image encoder is frozen in every BLIP-2 stage
    llm_trainable: bool = False  # the LLM is frozen too
    # token ids put in front of the visual prompt (decoder-only LLMs): a small LLM treats its first position as
    # an attention sink and cannot read a soft prompt placed there; a real token first fixes that. None (no
    # prefix) in every public checkpoint; the quickstart's SmolLM2 uses its <|endoftext|>.
    llm_prefix_ids: list[int] | None = None

    def __post_init__(self):
        if isinstance(self.vision, dict):
            self.vision = _from_dict(VisionConfig, self.vision, "vision")
        if isinstance(self.qformer, dict):
            self.qformer = _from_dict(QFormerConfig, self.qformer, "qformer")
        if isinstance(self.llm, dict):
            self.llm = _from_dict(LLMConfig, self.llm, "llm")
        _check(self.architecture in ARCHITECTURES,
               f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.architecture == "blip2-retrieval":
            _check(self.llm is None, "architecture 'blip2-retrieval' has no LLM; remove the llm section")
            self.stage1_heads = True
        else:
            _check(self.llm is not None, f"architecture {self.architecture!r} needs an llm section")
        if self.architecture == "instructblip" or self.stage1_heads:
            self.qformer.use_text = True
        if self.llm_prefix_ids:
            _check(not self.is_encoder_decoder, "llm_prefix_ids is for decoder-only LLMs")
            self.llm_prefix_ids = [int(i) for i in self.llm_prefix_ids]
        if self.vision.kind in ("eva", "cnn"):
            # the cross-attention K/V input width must equal the vision width
            self.qformer.encoder_hidden_size = self.vision.hidden_size

    # ----------------------------------------------------------------------------------------------- presets
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "Blip2Config":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
        d = copy.deepcopy(PRESETS[name])
        d.update(overrides)
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Blip2Config":
        return _from_dict(cls, copy.deepcopy(d), "config")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def num_query_tokens(self) -> int:
        return self.qformer.num_query_tokens

    @property
    def is_encoder_decoder(self) -> bool:
        return self.llm is not None and self.llm.is_encoder_decoder

    # ----------------------------------------------------------------------------------- transformers format
    @classmethod
    def from_hf(cls, d: dict[str, Any], where: str = "config.json") -> "Blip2Config":
        """Build from a transformers Blip2/InstructBlip `config.json` dict."""
        archs = d.get("architectures") or []
        arch = None
        for a in archs:
            if a in HF_ARCHITECTURES:
                arch = HF_ARCHITECTURES[a]
                break
        if arch is None:
            mt = d.get("model_type")
            if mt not in HF_MODEL_TYPES:
                raise ConfigError(
                    f"{where}: unsupported model type {mt!r} (architectures {archs}); "
                    f"supported: {sorted(HF_ARCHITECTURES)}")
            arch = HF_MODEL_TYPES[mt]
        v = d.get("vision_config") or {}
        q = d.get("qformer_config") or {}
        cnn = {"kind": "cnn", "cnn_channels": tuple(v.get("cnn_channels") or ())} \
            if v.get("encoder_kind") == "cnn" else {}
        vision = VisionConfig(
            **cnn,
            image_size=_int(v.get("image_size", 224)),
            patch_size=_int(v.get("patch_size", 14)),
            hidden_size=v.get("hidden_size", 1408),
            num_layers=v.get("num_hidden_layers", 39),
            num_heads=v.get("num_attention_heads", 16),
            mlp_hidden_size=v.get("intermediate_size", 6144),
            layer_norm_eps=v.get("layer_norm_eps", 1e-6),
            qkv_bias=v.get("qkv_bias", True),
            hidden_act=v.get("hidden_act", "gelu"),
            ln_vision_eps=v.get("layer_norm_eps", 1e-6),  # transformers' post_layernorm uses the tower's eps
        )
        qformer = QFormerConfig(
            vocab_size=q.get("vocab_size", 30522),
            hidden_size=q.get("hidden_size", 768),
            num_layers=q.get("num_hidden_layers", 12),
            num_heads=q.get("num_attention_heads", 12),
            intermediate_size=q.get("intermediate_size", 3072),
            hidden_act=q.get("hidden_act", "gelu"),
            hidden_dropout=q.get("hidden_dropout_prob", 0.1),
            attention_dropout=q.get("attention_probs_dropout_prob", 0.1),
            max_position_embeddings=q.get("max_position_embeddings", 512),
            layer_norm_eps=q.get("layer_norm_eps", 1e-12),
            pad_token_id=q.get("pad_token_id", 0) if q.get("pad_token_id") is not None else 0,
            bos_token_id=q.get("bos_token_id"),
            cross_attention_frequency=q.get("cross_attention_frequency", 2),
            encoder_hidden_size=q.get("encoder_hidden_size", vision.hidden_size),
            num_query_tokens=d.get("num_query_tokens", 32),
            use_text=bool(q.get("use_qformer_text_input", False)) or arch != "blip2",
            lm_head=False,
        )
        llm = None
        if arch != "blip2-retrieval":
            t = dict(d.get("text_config") or {})
            if "model_type" not in t:
                t["model_type"] = "opt"  # transformers' default text model for BLIP-2
            for k in ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype"):
                t.pop(k, None)
            llm = LLMConfig(hf_config=t)
        return cls(
            architecture=arch,
            vision=vision,
            qformer=qformer,
            llm=llm,
            image_text_hidden_size=d.get("image_text_hidden_size", 256),
            image_token_index=d.get("image_token_index", d.get("image_token_id")),
            llm_prefix_ids=d.get("llm_prefix_ids"),
        )

    def to_hf(self) -> dict[str, Any]:
        """A transformers `config.json` dict for the matching transformers class."""
        v, q = self.vision, self.qformer
        _check(v.kind in ("eva", "cnn"), "only the EVA/CLIP ViT tower (vision.kind='eva') and our convolutional "
                                         "tower (vision.kind='cnn') can be written as a checkpoint directory")
        if v.kind == "cnn":  # ours only: transformers has no class for it (our loader reads these fields)
            vision = {"encoder_kind": "cnn", "cnn_channels": list(v.cnn_channels), "hidden_size": v.hidden_size,
                      "image_size": v.image_size, "patch_size": v.patch_size, "layer_norm_eps": v.ln_vision_eps}
        else:
            vision = {
                "hidden_size": v.hidden_size, "intermediate_size": v.mlp_hidden_size,
                "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
                "image_size": v.image_size, "patch_size": v.patch_size, "hidden_act": v.hidden_act,
                "layer_norm_eps": v.layer_norm_eps, "qkv_bias": v.qkv_bias, "attention_dropout": 0.0,
            }
        qformer = {
            "vocab_size": q.vocab_size, "hidden_size": q.hidden_size, "num_hidden_layers": q.num_layers,
            "num_attention_heads": q.num_heads, "intermediate_size": q.intermediate_size,
            "hidden_act": q.hidden_act, "hidden_dropout_prob": q.hidden_dropout,
            "attention_probs_dropout_prob": q.attention_dropout,
            "max_position_embeddings": q.max_position_embeddings, "layer_norm_eps": q.layer_norm_eps,
            "pad_token_id": q.pad_token_id, "cross_attention_frequency": q.cross_attention_frequency,
            "encoder_hidden_size": q.encoder_hidden_size,
        }
        if q.bos_token_id is not None:
            qformer["bos_token_id"] = q.bos_token_id
        out: dict[str, Any] = {
            "num_query_tokens": q.num_query_tokens,
            "vision_config": vision,
            "qformer_config": qformer,
        }
        if self.architecture == "instructblip":
            out.update(model_type="instructblip", architectures=["InstructBlipForConditionalGeneration"])
        elif self.architecture == "blip2-retrieval":
            qformer["use_qformer_text_input"] = True
            out.update(model_type="blip-2", architectures=["Blip2ForImageTextRetrieval"],
                       image_text_hidden_size=self.image_text_hidden_size)
        else:
            out.update(model_type="blip-2", architectures=["Blip2ForConditionalGeneration"])
        if self.llm is not None:
            out["text_config"] = dict(self.llm.hf_config)
        if self.image_token_index is not None:
            out["image_token_index"] = self.image_token_index
        if self.llm_prefix_ids:  # ours only: transformers' classes ignore it (they would put no prefix)
            out["llm_prefix_ids"] = list(self.llm_prefix_ids)
        return out

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2))


def _int(x) -> int:
    if isinstance(x, (list, tuple)):
        _check(len(set(x)) == 1, f"non-square sizes are not supported: {x}")
        return int(x[0])
    return int(x)


# ------------------------------------------------------------------------------------------------------ presets
# Architectures of the public checkpoints (random weights). LLM fields follow the public config.json files.
# VisionConfig defaults are EVA ViT-g/14 @224 with 39 blocks; the transformers checkpoints use eps 1e-6 for
# ln_vision (LAVIS: 1e-5)
EVA_G = {"ln_vision_eps": 1e-6}

_OPT = {"model_type": "opt", "activation_function": "relu", "do_layer_norm_before": True,
        "enable_bias": True, "layer_norm_elementwise_affine": True, "max_position_embeddings": 2048,
        "bos_token_id": 2, "eos_token_id": 50118, "pad_token_id": 1, "vocab_size": 50304,
        "tie_word_embeddings": True}
_T5 = {"model_type": "t5", "d_kv": 64, "feed_forward_proj": "gated-gelu", "is_encoder_decoder": True,
       "relative_attention_num_buckets": 32, "relative_attention_max_distance": 128, "layer_norm_epsilon": 1e-6,
       "vocab_size": 32128, "tie_word_embeddings": False, "pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 1,
       "decoder_start_token_id": 0, "dense_act_fn": "gelu", "is_gated_act": True}
# Vicuna: 32000 + [PAD] + <image>, padded to a multiple of 64; the tokenizer's BOS is </s> (2)
_VICUNA = {"model_type": "llama", "hidden_act": "silu", "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
           "bos_token_id": 2, "eos_token_id": 2, "pad_token_id": 32000, "vocab_size": 32064,
           "tie_word_embeddings": False}
_QFORMER_DEC = {"vocab_size": 30523}  # BERT + [DEC]

_TINY_VISION = {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                "mlp_hidden_size": 64}
_TINY_QFORMER = {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "num_query_tokens": 4,
                 "vocab_size": 100, "max_position_embeddings": 64, "initializer_range": 0.1}

PRESETS: dict[str, dict[str, Any]] = {
    "blip2-opt-2.7b": {
        "architecture": "blip2", "vision": EVA_G, "image_token_index": 50265,
        "llm": {"hf_config": {**_OPT, "hidden_size": 2560, "ffn_dim": 10240, "num_hidden_layers": 32,
                              "num_attention_heads": 32, "word_embed_proj_dim": 2560}},
    },
    "blip2-opt-6.7b": {
        "architecture": "blip2", "vision": EVA_G, "image_token_index": 50265,
        "llm": {"hf_config": {**_OPT, "hidden_size": 4096, "ffn_dim": 16384, "num_hidden_layers": 32,
                              "num_attention_heads": 32, "word_embed_proj_dim": 4096}},
    },
    "blip2-flan-t5-xl": {
        "architecture": "blip2", "vision": EVA_G, "image_token_index": 32100,
        "llm": {"hf_config": {**_T5, "d_model": 2048, "d_ff": 5120, "num_layers": 24, "num_decoder_layers": 24,
                              "num_heads": 32}},
    },
    "blip2-flan-t5-xxl": {
        "architecture": "blip2", "vision": EVA_G, "image_token_index": 32100,
        "llm": {"hf_config": {**_T5, "d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_decoder_layers": 24,
                              "num_heads": 64}},
    },
    "blip2-itm-vit-g": {
        "qformer": _QFORMER_DEC, "architecture": "blip2-retrieval", "vision": EVA_G, "llm": None,
    },
    "instructblip-vicuna-7b": {
        "qformer": _QFORMER_DEC, "architecture": "instructblip", "vision": EVA_G, "image_token_index": 32001,
        "llm": {"hf_config": {**_VICUNA, "hidden_size": 4096, "intermediate_size": 11008,
                              "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32}},
    },
    "instructblip-vicuna-13b": {
        "qformer": _QFORMER_DEC, "architecture": "instructblip", "vision": EVA_G, "image_token_index": 32001,
        "llm": {"hf_config": {**_VICUNA, "hidden_size": 5120, "intermediate_size": 13824,
                              "num_hidden_layers": 40, "num_attention_heads": 40, "num_key_value_heads": 40}},
    },
    "instructblip-flan-t5-xl": {
        "qformer": _QFORMER_DEC, "architecture": "instructblip", "vision": EVA_G, "image_token_index": 32100,
        "llm": {"hf_config": {**_T5, "d_model": 2048, "d_ff": 5120, "num_layers": 24, "num_decoder_layers": 24,
                              "num_heads": 32}},
    },
    "instructblip-flan-t5-xxl": {
        "qformer": _QFORMER_DEC, "architecture": "instructblip", "vision": EVA_G, "image_token_index": 32100,
        "llm": {"hf_config": {**_T5, "d_model": 4096, "d_ff": 10240, "num_layers": 24, "num_decoder_layers": 24,
                              "num_heads": 64}},
    },
    # Small configurations for tests and demos (random weights, seconds on a CPU).
    "tiny-stage1": {
        "architecture": "blip2-retrieval", "stage1_heads": True, "llm": None, "image_text_hidden_size": 32,
        "vision": _TINY_VISION,
        "qformer": {**_TINY_QFORMER, "use_text": True, "lm_head": True},
    },
    "tiny-t5": {
        "architecture": "blip2", "vision": _TINY_VISION, "qformer": _TINY_QFORMER,
        "llm": {"hf_config": {**_T5, "d_model": 32, "d_kv": 8, "d_ff": 64, "num_layers": 2, "num_decoder_layers": 2,
                              "num_heads": 4, "vocab_size": 128}},
    },
    "tiny-llama-instruct": {
        "architecture": "instructblip", "vision": _TINY_VISION, "qformer": _TINY_QFORMER,
        "llm": {"hf_config": {**_VICUNA, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 128,
                              "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0,
                              "max_position_embeddings": 256}},
    },
    "tiny-opt": {
        "architecture": "blip2",
        "vision": {"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
                   "mlp_hidden_size": 64},
        "qformer": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64,
                    "num_query_tokens": 4, "vocab_size": 100, "max_position_embeddings": 64},
        "llm": {"hf_config": {**_OPT, "hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4, "word_embed_proj_dim": 32, "vocab_size": 128,
                              "eos_token_id": 2, "max_position_embeddings": 128}},
    },
}
