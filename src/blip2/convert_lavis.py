"""Reading and writing Salesforce LAVIS checkpoints (`.pth` files holding `{"model": state_dict, ...}`).

LAVIS saves only what was trained (+ buffers): the Q-Former, `query_tokens`, `ln_vision`, the LLM projection
(`opt_proj` / `t5_proj` / `llm_proj`), the stage-1 heads when present, and `visual_encoder.*` only when the ViT
was trained. The frozen ViT comes from `eva_vit_g.pth` (the same keys without `visual_encoder.`) and the LLM
from its own files, so a model loaded from a LAVIS file alone keeps random weights there: `fill_from_lavis` says
so (a warning and `model.load_report`). This module holds the key map both ways, reads and writes the files and
never builds a model: `blip2.lavis_load` reads a checkpoint for a model (`read_lavis_checkpoint`) and fills a
built one (`fill_from_lavis`), and `blip2.api.load_lavis` builds the model in between.

Conversion is a declarative key map (LAVIS pattern <-> our pattern) with strict key and shape checks, as
`checkpoint.py` does for the transformers format. LAVIS-only entries are dropped on the way in: the BERT
`position_ids` buffer, and the LM-head decoder weight/bias, which LAVIS ties to the word embeddings / the head
bias (checked equal, as our head reuses those tensors).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Mapping

import torch

from .checkpoint import CheckpointError, key_pattern
from .config import Blip2Config
from .files import atomic_file

logger = logging.getLogger(__name__)

# -------------------------------------------------------------------------------------------------- key map
# (LAVIS pattern, our pattern). {n}: a layer index, {p}: weight|bias, {rest}: anything, {proj}: the name of the
# LLM projection, {llm}: the attribute LAVIS keeps the LLM under. Read top to bottom: the first match wins.
_LAYER = "Qformer.bert.encoder.layer.{n}"
_BERT_BLOCKS = [  # LAVIS sub-module -> ours, for both attention blocks of a Q-Former layer
    ("self.query", "query"), ("self.key", "key"), ("self.value", "value"),
    ("output.dense", "out"), ("output.LayerNorm", "norm"),
]
KEY_MAP: list[tuple[str, str]] = [
    ("query_tokens", "qformer.query_tokens"),
    ("Qformer.bert.embeddings.word_embeddings.weight", "qformer.embeddings.word_embeddings.weight"),
    ("Qformer.bert.embeddings.position_embeddings.weight", "qformer.embeddings.position_embeddings.weight"),
    ("Qformer.bert.embeddings.LayerNorm.{p}", "qformer.embeddings.layernorm.{p}"),
    *[(f"{_LAYER}.{blk}.{a}.{{p}}", f"qformer.layers.{{n}}.{blk}.{b}.{{p}}")
      for blk in ("attention", "crossattention") for a, b in _BERT_BLOCKS],
    (f"{_LAYER}.intermediate_query.dense.{{p}}", "qformer.layers.{n}.ffn_query.fc1.{p}"),
    (f"{_LAYER}.output_query.dense.{{p}}", "qformer.layers.{n}.ffn_query.fc2.{p}"),
    (f"{_LAYER}.output_query.LayerNorm.{{p}}", "qformer.layers.{n}.ffn_query.norm.{p}"),
    (f"{_LAYER}.intermediate.dense.{{p}}", "qformer.layers.{n}.ffn_text.fc1.{p}"),
    (f"{_LAYER}.output.dense.{{p}}", "qformer.layers.{n}.ffn_text.fc2.{p}"),
    (f"{_LAYER}.output.LayerNorm.{{p}}", "qformer.layers.{n}.ffn_text.norm.{p}"),
    ("Qformer.cls.predictions.bias", "qformer.lm_head.bias"),
    ("Qformer.cls.predictions.transform.dense.{p}", "qformer.lm_head.dense.{p}"),
    ("Qformer.cls.predictions.transform.LayerNorm.{p}", "qformer.lm_head.norm.{p}"),
    ("vision_proj.{p}", "vision_proj.{p}"),
    ("text_proj.{p}", "text_proj.{p}"),
    ("itm_head.{p}", "itm_head.{p}"),
    ("temp", "temp"),
    ("ln_vision.{p}", "ln_vision.{p}"),
    ("{proj}.{p}", "language_projection.{p}"),
    # EVA ViT-g (present only when the ViT was trained, or from eva_vit_g.pth with the prefix added)
    ("visual_encoder.cls_token", "vision.cls_token"),
    ("visual_encoder.pos_embed", "vision.pos_embed"),
    ("visual_encoder.patch_embed.proj.{p}", "vision.patch_embed.{p}"),
    ("visual_encoder.blocks.{n}.norm1.{p}", "vision.blocks.{n}.norm1.{p}"),
    ("visual_encoder.blocks.{n}.attn.qkv.weight", "vision.blocks.{n}.attn.qkv.weight"),
    ("visual_encoder.blocks.{n}.attn.q_bias", "vision.blocks.{n}.attn.q_bias"),
    ("visual_encoder.blocks.{n}.attn.v_bias", "vision.blocks.{n}.attn.v_bias"),
    ("visual_encoder.blocks.{n}.attn.proj.{p}", "vision.blocks.{n}.attn.proj.{p}"),
    ("visual_encoder.blocks.{n}.norm2.{p}", "vision.blocks.{n}.norm2.{p}"),
    ("visual_encoder.blocks.{n}.mlp.fc1.{p}", "vision.blocks.{n}.mlp.fc1.{p}"),
    ("visual_encoder.blocks.{n}.mlp.fc2.{p}", "vision.blocks.{n}.mlp.fc2.{p}"),
    # our convolutional tower (vision.kind="cnn"), under the same prefix
    ("visual_encoder.convnet.{rest}", "vision.convnet.{rest}"),
    # the LLM, only when it was trained (LAVIS's OPT/T5/LLaMA keep transformers' key layout under a prefix)
    ("{llm}.{rest}", "llm.{rest}"),
]

# LAVIS model name -> (LLM projection name, LLM attribute); None for stage 1 (no LLM)
LAVIS_ARCHITECTURES: dict[str, tuple[str, str] | None] = {
    "blip2": None,  # stage 1 (Blip2Qformer): blip2_pretrained.pth
    "blip2_feature_extractor": None,
    "blip2_image_text_matching": None,
    "blip2_opt": ("opt_proj", "opt_model"),
    "blip2_t5": ("t5_proj", "t5_model"),
    "blip2_t5_instruct": ("t5_proj", "t5_model"),
    "blip2_vicuna_instruct": ("llm_proj", "llm_model"),
}
_PROJ_NAMES = ("opt_proj", "t5_proj", "llm_proj")
_LLM_NAMES = ("opt_model", "t5_model", "llm_model")

# LAVIS-only entries (ties and buffers) handled outside the map
DECODER_W = "Qformer.cls.predictions.decoder.weight"  # tied to Qformer.bert.embeddings.word_embeddings.weight
DECODER_B = "Qformer.cls.predictions.decoder.bias"  # tied to Qformer.cls.predictions.bias
WORD_EMBEDDINGS = "Qformer.bert.embeddings.word_embeddings.weight"
_HEAD_BIAS = "Qformer.cls.predictions.bias"


_FIELDS = {"proj": "|".join(_PROJ_NAMES), "llm": "|".join(_LLM_NAMES)}
_FORWARD = [(key_pattern(lavis, **_FIELDS), ours) for lavis, ours in KEY_MAP]
_BACKWARD = [(key_pattern(ours, **_FIELDS), lavis) for lavis, ours in KEY_MAP]


def part_of(key: str) -> str:
    """The part of our model a parameter belongs to (what the load report talks about)."""
    if key.startswith("qformer.lm_head."):
        return "qformer.lm_head"
    head = key.split(".")[0]
    if head in ("vision_proj", "text_proj", "itm_head", "temp"):
        return "stage1_heads"
    return head  # vision, ln_vision, qformer, language_projection, llm


# ------------------------------------------------------------------------------------------ state dicts
def lavis_to_ours(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Translate a LAVIS state dict. Returns (our state dict, keys nothing maps).

    Drops `position_ids` buffers and the tied LM-head decoder (checked equal to the word embeddings / the
    head bias: CheckpointError otherwise). Any of opt_proj / t5_proj / llm_proj becomes language_projection."""
    out, unknown, _ = translate(state)
    return out, unknown


def translate(state: Mapping[str, torch.Tensor]):
    """lavis_to_ours, plus where each of our keys came from (our key -> LAVIS key)."""
    _check_ties(state)
    out, unknown, origin = {}, [], {}
    for k, v in state.items():
        if k.endswith("position_ids") or k in (DECODER_W, DECODER_B):
            continue
        for rx, ours in _FORWARD:
            m = rx.match(k)
            if m:
                name = ours.format(**m.groupdict())
                if name in out:  # e.g. opt_proj and llm_proj in one file
                    raise CheckpointError(f"LAVIS keys {origin[name]!r} and {k!r} both map to {name!r}")
                out[name], origin[name] = v, k
                break
        else:
            unknown.append(k)
    if DECODER_W in state and "qformer.embeddings.word_embeddings.weight" not in out:
        out["qformer.embeddings.word_embeddings.weight"] = state[DECODER_W]  # one tensor in LAVIS
        origin["qformer.embeddings.word_embeddings.weight"] = DECODER_W
    return out, unknown, origin


def _check_ties(state: Mapping[str, torch.Tensor]) -> None:
    for tied, source in ((DECODER_W, WORD_EMBEDDINGS), (DECODER_B, _HEAD_BIAS)):
        if tied in state and source in state:
            a, b = state[tied], state[source]
            if a.shape != b.shape or not torch.equal(a, b.to(a.dtype)):
                raise CheckpointError(f"{tied} differs from {source}; our Q-Former LM head reuses {source}, "
                                      f"so a head with its own decoder cannot be loaded")


def lavis_architecture(cfg: Blip2Config) -> str:
    """The LAVIS model name whose layout matches our config (decides the projection / LLM key names)."""
    if cfg.llm is None:
        return "blip2"
    mt = cfg.llm.model_type
    if mt == "opt":
        return "blip2_opt"
    if mt in ("t5", "mt5", "umt5"):
        return "blip2_t5_instruct" if cfg.architecture == "instructblip" else "blip2_t5"
    return "blip2_vicuna_instruct"  # LAVIS's generic name for the other LLMs: llm_proj / llm_model


def ours_to_lavis(state: Mapping[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    """Our state dict -> LAVIS names for `architecture` (a key of LAVIS_ARCHITECTURES). The tied LM-head decoder
    entries are written as LAVIS's own state dicts have them (the same tensors as the word embeddings / bias)."""
    if architecture not in LAVIS_ARCHITECTURES:
        raise CheckpointError(f"unknown LAVIS architecture {architecture!r}; known: {sorted(LAVIS_ARCHITECTURES)}")
    names = LAVIS_ARCHITECTURES[architecture]
    out = {}
    for k, v in state.items():
        for rx, lavis in _BACKWARD:
            m = rx.match(k)
            if not m:
                continue
            if ("{proj}" in lavis or "{llm}" in lavis) and names is None:
                raise CheckpointError(f"{k!r}: LAVIS architecture {architecture!r} has no language model")
            proj, llm = names or (None, None)
            out[lavis.format(proj=proj, llm=llm, **m.groupdict())] = v
            break
        else:
            raise CheckpointError(f"no LAVIS name for parameter {k!r}")
    if _HEAD_BIAS in out:
        out[DECODER_B] = out[_HEAD_BIAS]
        if WORD_EMBEDDINGS in out:
            out[DECODER_W] = out[WORD_EMBEDDINGS]
    return out


# ------------------------------------------------------------------------------------------------ files
def torch_load(path: Path, what: str):
    if not path.is_file():
        raise CheckpointError(f"{what} {path}: no such file")
    try:
        try:
            return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):
                raise
            return torch.load(str(path), map_location="cpu", weights_only=True)  # legacy (non-zip) format
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{what} {path} cannot be read with torch.load(weights_only=True) "
                              f"({type(e).__name__}: {msg}); it is corrupt or holds pickled objects other than "
                              f"tensors and plain containers") from None


def read_lavis(path: str | Path) -> dict[str, torch.Tensor]:
    """The `"model"` state dict of a LAVIS checkpoint file."""
    p = Path(path)
    obj = torch_load(p, "LAVIS checkpoint")
    if not isinstance(obj, dict) or not isinstance(obj.get("model"), dict):
        found = sorted(map(str, obj))[:8] if isinstance(obj, dict) else type(obj).__name__
        hint = ""
        if isinstance(obj, dict) and any(str(k).startswith(("blocks.", "pos_embed")) for k in obj):
            hint = " (it looks like a bare ViT state dict such as eva_vit_g.pth: pass it as vit=)"
        raise CheckpointError(f"{p} is not a LAVIS checkpoint: expected a dict with a 'model' state dict, "
                              f"found {found}{hint}")
    state = obj["model"]
    bad = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{p}: 'model' entries that are not tensors: {bad[:8]}")
    return state


def save_lavis(model, path: str | Path, architecture: str | None = None) -> None:
    """Write `{"model": state_dict}` in the LAVIS layout, atomically (a temporary file, then a rename).

    As LAVIS's own checkpoints: only trainable parameters (requires_grad) plus buffers, so the frozen ViT and LLM
    are left out. architecture: the LAVIS model name that decides the projection / LLM key names (default: from
    the model's config, see `lavis_architecture`)."""
    arch = architecture or lavis_architecture(model.cfg)
    grads = {n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)}
    state = {k: v.detach().cpu() for k, v in model.state_dict().items() if grads.get(k, True)}
    lavis = ours_to_lavis(state, arch)
    with atomic_file(path) as tmp:
        torch.save({"model": lavis}, tmp)
