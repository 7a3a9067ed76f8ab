"""Initialise a Q-Former from any BERT-family checkpoint directory (BLIP-2 paper §3.2;
LAVIS Blip2Base.init_Qformer).

BERT's embeddings, self-attention, text FFN and MLM head are copied; cross-attention stays random; then every
query FFN is copied from its text twin. The Q-Former has no token-type embedding, so BERT's type-0 vector
(which BERT adds to every token) is folded into the position table: text-only Q-Former outputs then equal
BERT's outputs exactly. A declarative key map, with strict shape checks.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from .checkpoint import CheckpointError, key_pattern, read_weights
from .config import QFormerConfig

# (BERT key pattern, our Q-Former key pattern); {n} = layer, {p} = weight|bias
BERT_KEY_MAP = [
    ("embeddings.word_embeddings.weight", "embeddings.word_embeddings.weight"),
    ("embeddings.position_embeddings.weight", "embeddings.position_embeddings.weight"),
    ("embeddings.LayerNorm.{p}", "embeddings.layernorm.{p}"),
    ("encoder.layer.{n}.attention.self.query.{p}", "layers.{n}.attention.query.{p}"),
    ("encoder.layer.{n}.attention.self.key.{p}", "layers.{n}.attention.key.{p}"),
    ("encoder.layer.{n}.attention.self.value.{p}", "layers.{n}.attention.value.{p}"),
    ("encoder.layer.{n}.attention.output.dense.{p}", "layers.{n}.attention.out.{p}"),
    ("encoder.layer.{n}.attention.output.LayerNorm.{p}", "layers.{n}.attention.norm.{p}"),
    ("encoder.layer.{n}.intermediate.dense.{p}", "layers.{n}.ffn_text.fc1.{p}"),
    ("encoder.layer.{n}.output.dense.{p}", "layers.{n}.ffn_text.fc2.{p}"),
    ("encoder.layer.{n}.output.LayerNorm.{p}", "layers.{n}.ffn_text.norm.{p}"),
    ("cls.predictions.transform.dense.{p}", "lm_head.dense.{p}"),
    ("cls.predictions.transform.LayerNorm.{p}", "lm_head.norm.{p}"),
    ("cls.predictions.bias", "lm_head.bias"),
]
# BERT keys that have no place in the Q-Former
IGNORED = re.compile(r"(pooler\.|cls\.seq_relationship|cls\.predictions\.decoder|position_ids|token_type_embeddings)")


_RULES = [(key_pattern(b), ours) for b, ours in BERT_KEY_MAP]


def _normalise(key: str) -> str:
    """Strip model prefixes (bert., model., 0.auto_model.) and old TF names (gamma/beta)."""
    for pre in ("bert.", "model.", "0.auto_model.", "auto_model."):
        if key.startswith(pre):
            key = key[len(pre):]
    return key.replace("LayerNorm.gamma", "LayerNorm.weight").replace("LayerNorm.beta", "LayerNorm.bias")


def qformer_config_from_bert(directory: str | Path, **overrides) -> QFormerConfig:
    """A Q-Former config with the BERT checkpoint's shape (layers, width, heads, FFN, vocab, positions)."""
    p = Path(directory) / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{directory}: no config.json (expected a BERT-family checkpoint directory)")
    c = json.loads(p.read_text())
    fields = dict(vocab_size=c["vocab_size"], hidden_size=c["hidden_size"], num_layers=c["num_hidden_layers"],
                  num_heads=c["num_attention_heads"], intermediate_size=c["intermediate_size"],
                  hidden_act=c.get("hidden_act", "gelu"), max_position_embeddings=c["max_position_embeddings"],
                  layer_norm_eps=c.get("layer_norm_eps", 1e-12), pad_token_id=c.get("pad_token_id", 0) or 0,
                  hidden_dropout=c.get("hidden_dropout_prob", 0.1),
                  attention_dropout=c.get("attention_probs_dropout_prob", 0.1), use_text=True, lm_head=True)
    fields.update(overrides)
    return QFormerConfig(**fields)


def init_qformer_from_bert(qformer, directory: str | Path) -> dict[str, list[str]]:
    """Copy BERT weights into `qformer` (in place). Returns {"copied": [...], "random": [...]} (our keys).
    A Q-Former without a text side gets BERT's attention layers and the text FFN as its query FFN.

    A vocabulary larger than BERT's (the appended [DEC] token) keeps its extra rows randomly initialised."""
    state = {_normalise(k): v for k, v in read_weights(directory).items()}
    own = qformer.state_dict()
    copied: dict[str, torch.Tensor] = {}
    for k, v in state.items():
        if IGNORED.search(k):
            continue
        for rx, ours in _RULES:
            m = rx.match(k)
            if m:
                copied[ours.format(**m.groupdict())] = v
                break
    if "embeddings.position_embeddings.weight" in copied:
        tt = state.get("embeddings.token_type_embeddings.weight")
        if tt is not None:
            copied["embeddings.position_embeddings.weight"] = copied["embeddings.position_embeddings.weight"] + tt[0]
    if "embeddings.word_embeddings.weight" not in own:  # a Q-Former without its text side (BLIP-2 generation):
        # the query path takes BERT's self-attention and, for its FFN, the text FFN (as the text side would)
        copied = {k.replace(".ffn_text.", ".ffn_query."): v for k, v in copied.items()
                  if not k.startswith(("embeddings.word_", "embeddings.position_", "lm_head."))}
    missing_layers = [k for k in copied if k not in own]
    if missing_layers:
        raise CheckpointError(f"{directory}: BERT weights do not fit this Q-Former (more layers or no text side?): "
                              f"{missing_layers[:5]}")
    with torch.no_grad():
        for k, v in copied.items():
            t = own[k]
            if k in ("embeddings.word_embeddings.weight", "lm_head.bias") and v.shape[0] < t.shape[0] \
                    and tuple(v.shape[1:]) == tuple(t.shape[1:]):
                t[: v.shape[0]].copy_(v)  # [DEC] and other appended tokens keep their random init
                continue
            if tuple(v.shape) != tuple(t.shape):
                raise CheckpointError(f"{directory}: {k}: BERT shape {list(v.shape)} vs Q-Former {list(t.shape)}")
            t.copy_(v)
        # query FFNs start as copies of the text FFNs
        for i, layer in enumerate(qformer.layers):
            if layer.ffn_text is not None and f"layers.{i}.ffn_text.fc1.weight" in copied:
                layer.ffn_query.load_state_dict(layer.ffn_text.state_dict())
    random = sorted(k for k in own if k not in copied and ".ffn_query." not in k)
    return {"copied": sorted(copied), "random": random}
