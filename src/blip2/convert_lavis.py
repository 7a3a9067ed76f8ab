"""Reading and writing Salesforce LAVIS checkpoints (`.pth` files holding `{"model": state_dict, ...}`).

LAVIS saves only what was trained (+ buffers): the Q-Former, `query_tokens`, `ln_vision`, the LLM projection
(`opt_proj` / `t5_proj` / `llm_proj`), the stage-1 heads when present, and `visual_encoder.*` only when the ViT
was trained. The frozen ViT comes from `eva_vit_g.pth` (the same keys without `visual_encoder.`) and the LLM
from its own files, so a model loaded from a LAVIS file alone keeps random weights there: `fill_from_lavis` says
so (a warning and `model.load_report`). This module never builds a model: `blip2.api.load_lavis` reads the file
(`read_lavis_checkpoint`), builds the model from the config it returns and fills it (`fill_from_lavis`).

Conversion is a declarative key map (LAVIS pattern <-> our pattern) with strict key and shape checks, as
`checkpoint.py` does for the transformers format. LAVIS-only entries are dropped on the way in: the BERT
`position_ids` buffer, and the LM-head decoder weight/bias, which LAVIS ties to the word embeddings / the head
bias (checked equal, as our head reuses those tensors).
"""

from __future__ import annotations

import copy
import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import load_file

from .checkpoint import CheckpointError, key_pattern, load_into, read_weights, tied_names
from .config import Blip2Config, ConfigError
from .files import atomic_file
from .vision import resize_pos_embed

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
_DECODER_W = "Qformer.cls.predictions.decoder.weight"  # tied to Qformer.bert.embeddings.word_embeddings.weight
_DECODER_B = "Qformer.cls.predictions.decoder.bias"  # tied to Qformer.cls.predictions.bias
_WORD = "Qformer.bert.embeddings.word_embeddings.weight"
_HEAD_BIAS = "Qformer.cls.predictions.bias"


_FIELDS = {"proj": "|".join(_PROJ_NAMES), "llm": "|".join(_LLM_NAMES)}
_FORWARD = [(key_pattern(lavis, **_FIELDS), ours) for lavis, ours in KEY_MAP]
_BACKWARD = [(key_pattern(ours, **_FIELDS), lavis) for lavis, ours in KEY_MAP]


def _part(key: str) -> str:
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
    out, unknown, _ = _translate(state)
    return out, unknown


def _translate(state: Mapping[str, torch.Tensor]):
    """lavis_to_ours, plus where each of our keys came from (our key -> LAVIS key)."""
    _check_ties(state)
    out, unknown, origin = {}, [], {}
    for k, v in state.items():
        if k.endswith("position_ids") or k in (_DECODER_W, _DECODER_B):
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
    if _DECODER_W in state and "qformer.embeddings.word_embeddings.weight" not in out:
        out["qformer.embeddings.word_embeddings.weight"] = state[_DECODER_W]  # one tensor in LAVIS
        origin["qformer.embeddings.word_embeddings.weight"] = _DECODER_W
    return out, unknown, origin


def _check_ties(state: Mapping[str, torch.Tensor]) -> None:
    for tied, source in ((_DECODER_W, _WORD), (_DECODER_B, _HEAD_BIAS)):
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
        out[_DECODER_B] = out[_HEAD_BIAS]
        if _WORD in out:
            out[_DECODER_W] = out[_WORD]
    return out


# ------------------------------------------------------------------------------------------------ files
def _torch_load(path: Path, what: str):
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
    obj = _torch_load(p, "LAVIS checkpoint")
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


def _read_vit(path: str | Path, num_layers: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An eva_vit_g.pth-style file (keys without `visual_encoder.`; a `{"model": ...}` wrapper or the prefix
    are accepted) as LAVIS keys. Blocks past `num_layers` and a final norm / classifier head are dropped, as
    LAVIS does (BLIP-2 uses the first 39 of 40 blocks, features before the final norm): returned as notes."""
    obj = _torch_load(Path(path), "ViT weights")
    if isinstance(obj, dict) and isinstance(obj.get("model"), dict):
        obj = obj["model"]
    if not isinstance(obj, dict):
        raise CheckpointError(f"ViT weights {path}: expected a state dict, found {type(obj).__name__}")
    out, dropped = {}, []
    for k, v in obj.items():
        k = k.removeprefix("visual_encoder.")
        m = re.match(r"blocks\.(\d+)\.", k)
        if (m and int(m.group(1)) >= num_layers) or k.split(".")[0] in ("norm", "fc_norm", "head"):
            dropped.append(k)
            continue
        out["visual_encoder." + k] = v
    return out, dropped


def _merge_vit(vit, num_layers: int, ours: dict, origin: dict, unknown: list, ignored: list, notes: list) -> None:
    """Add the ViT weights of an eva_vit_g.pth-style file to `ours` (ours, origin, unknown, ... are updated).
    A checkpoint that has its own `visual_encoder.*` (a trained ViT) keeps those."""
    name = Path(vit).name
    vit_lavis, dropped = _read_vit(vit, num_layers)
    vit_ours, vit_unknown, vit_origin = _translate(vit_lavis)
    unknown += [f"{name}:{k.removeprefix('visual_encoder.')}" for k in vit_unknown]
    ignored += [f"{name}:{k}" for k in dropped]
    kept = 0
    for k, v in vit_ours.items():
        src = f"{name}:{vit_origin[k].removeprefix('visual_encoder.')}"
        if not k.startswith("vision."):
            unknown.append(src)
        elif k in ours:
            kept += 1
        else:
            ours[k], origin[k] = v, src
    if kept:
        notes.append(f"{kept} ViT weight(s) come from the checkpoint's own (trained) visual_encoder, not {name}")


def _read_llm(llm, model) -> tuple[dict[str, torch.Tensor], str]:
    """LLM weights in our names (`llm.*`) from a transformers directory, a weight file, a state dict or a
    module. Files of the bare base model (keys without the `model.` prefix, as facebook/opt-* store them) fit."""
    if isinstance(llm, torch.nn.Module):
        state, source = llm.state_dict(), type(llm).__name__
    elif isinstance(llm, Mapping):
        state, source = dict(llm), "state dict"
    else:
        p = Path(llm)
        if p.is_dir():
            state = read_weights(p)
        elif p.suffix == ".safetensors":
            state = load_file(str(p))
        else:
            state = _torch_load(p, "LLM weights")
        source = str(p)
    own = set(model.state_dict())
    prefix = model.llm.base_model_prefix
    out = {}
    for k, v in state.items():
        name = f"llm.{k}"
        if name not in own and f"llm.{prefix}.{k}" in own:
            name = f"llm.{prefix}.{k}"
        out[name] = v
    return out, source


def _resolve_config(config) -> Blip2Config:
    if isinstance(config, Blip2Config):
        return copy.deepcopy(config)
    if config is None:
        raise ConfigError("load_lavis needs config=: a preset name, a Blip2Config or a config.json path "
                          "(LAVIS files do not record the architecture)")
    p = Path(config)
    if p.is_dir():
        p = p / "config.json"
    if p.is_file():
        try:
            d = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{p}: invalid JSON ({e})") from None
        # our own Blip2Config.save() format, or a transformers config.json
        return Blip2Config.from_dict(d) if "architecture" in d else Blip2Config.from_hf(d, where=str(p))
    return Blip2Config.from_preset(str(config))


def _enable_parts(cfg: Blip2Config, state: Mapping[str, torch.Tensor]) -> tuple[Blip2Config, list[str]]:
    """Turn on the optional parts the file has weights for (stage-1 heads, Q-Former text side, LM head). The sizes
    only these parts have (ITC width, Q-Former vocabulary and positions) are then taken from the file."""
    parts = {_part(k) for k in state}
    changes = []
    if "stage1_heads" in parts and not cfg.stage1_heads:
        cfg.stage1_heads = True
        w = state.get("vision_proj.weight")
        if w is not None:
            cfg.image_text_hidden_size = w.shape[0]
        changes.append(f"stage1_heads=True, image_text_hidden_size={cfg.image_text_hidden_size} "
                       f"(the file has vision_proj/text_proj/itm_head/temp)")
    text = any(".word_embeddings." in k or ".ffn_text." in k for k in state) or "qformer.lm_head" in parts
    if text and not cfg.qformer.use_text:
        q = cfg.qformer
        q.use_text = True
        words, pos = (state.get(f"qformer.embeddings.{e}.weight") for e in ("word_embeddings", "position_embeddings"))
        if words is not None:
            q.vocab_size = words.shape[0]
        if pos is not None:
            q.max_position_embeddings = pos.shape[0]
        changes.append(f"qformer.use_text=True, vocab_size={q.vocab_size}, max_position_embeddings="
                       f"{q.max_position_embeddings} (the file has the Q-Former's text embeddings / text FFN)")
    if "qformer.lm_head" in parts and not cfg.qformer.lm_head:
        cfg.qformer.lm_head = True
        changes.append("qformer.lm_head=True (the file has Qformer.cls.predictions)")
    if changes:
        cfg = Blip2Config.from_dict(cfg.to_dict())  # validate the changed config
    return cfg, changes


def _resize_pos_embed(pe: torch.Tensor, num_patches: int) -> torch.Tensor:
    """[1, 1 + n, D] -> [1, 1 + num_patches, D]: the patch grid resized bicubically, the CLS slot kept (as LAVIS's
    interpolate_pos_embed does when the image size differs from the one the table was trained for)."""
    old, new = round((pe.shape[1] - 1) ** 0.5), round(num_patches ** 0.5)
    if old * old != pe.shape[1] - 1 or new * new != num_patches:
        raise CheckpointError(f"pos_embed {list(pe.shape)}: cannot resize a non-square grid to {num_patches} patches")
    return resize_pos_embed(pe.float(), new, new).to(pe.dtype)  # resized in fp32


def _short(keys, n: int = 8) -> str:
    keys = list(keys)
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


def detect_lavis_architecture(state: Mapping[str, torch.Tensor]) -> str | None:
    """The LAVIS model a state dict comes from, judged by its LLM projection and heads (None: cannot tell)."""
    keys = set(state)
    if any(k.startswith("opt_proj.") for k in keys):
        return "blip2_opt"
    if any(k.startswith("t5_proj.") for k in keys):
        return "blip2_t5_instruct" if _WORD in keys else "blip2_t5"
    if any(k.startswith("llm_proj.") for k in keys):
        return "blip2_vicuna_instruct"
    if any(k.startswith(("vision_proj.", "itm_head.")) for k in keys):
        return "blip2"
    return None


# ------------------------------------------------------------------------------------------------- load
PARTS = ("vision", "ln_vision", "qformer", "qformer.lm_head", "language_projection", "stage1_heads", "llm")
# parts a LAVIS file may leave out entirely: the frozen ViT and the LLM have their own files, and a stage-1
# file has no LLM projection yet (stage 2 trains it)
OPTIONAL_PARTS = ("vision", "llm", "language_projection")


@dataclass
class LavisCheckpoint:
    """A LAVIS file read and translated to our names, before a model exists (`read_lavis_checkpoint`)."""

    path: Path
    cfg: Blip2Config  # the config with the parts the file has weights for switched on
    weights: dict[str, torch.Tensor]  # our key -> tensor (the file's, plus the ViT file's)
    origin: dict[str, str]  # our key -> "file:key", for error messages
    unknown: list[str]  # "file:key" of weights nothing maps
    ignored: list[str]  # "file:key" of LAVIS-only entries dropped on purpose
    notes: list[str]
    changes: list[str]  # the config parts switched on
    detected: str | None  # the LAVIS architecture the file's keys point to
    vit: str | Path | None = None


def read_lavis_checkpoint(path: str | Path, config: str | Path | Blip2Config,
                          vit: str | Path | None = None) -> LavisCheckpoint:
    """Read a LAVIS `.pth` (and an `eva_vit_g.pth`-style `vit` file) into our names, and the config of the model
    that holds them: parts the file has weights for but `config` lacks are switched on (stage-1 heads, the
    Q-Former's text side and LM head), with a warning. `blip2.api.load_lavis` builds the model and calls
    `fill_from_lavis`."""
    path = Path(path)
    cfg = _resolve_config(config)
    lavis = read_lavis(path)
    ours, unknown, origin = _translate(lavis)
    origin = {o: f"{path.name}:{k}" for o, k in origin.items()}  # our key -> file:key, for error messages
    ignored = sorted(f"{path.name}:{k}" for k in lavis if k.endswith("position_ids") or k in (_DECODER_W, _DECODER_B))
    unknown = [f"{path.name}:{k}" for k in unknown]
    notes: list[str] = []

    if vit is not None:
        _merge_vit(vit, cfg.vision.num_layers, ours, origin, unknown, ignored, notes)

    cfg, changes = _enable_parts(cfg, ours)
    for c in changes:
        logger.warning("%s: enabled %s", path, c)
    detected = detect_lavis_architecture(lavis)
    if detected and cfg.llm is not None and LAVIS_ARCHITECTURES[detected] is not None:
        expected = LAVIS_ARCHITECTURES[lavis_architecture(cfg)][0]
        got = LAVIS_ARCHITECTURES[detected][0]
        if got != expected and "llm_proj" not in (got, expected):
            notes.append(f"the file's projection is {got} (LAVIS {detected}) but the config's LLM is "
                         f"{cfg.llm.model_type!r}, which LAVIS names {expected}")
            logger.warning("%s: %s", path, notes[-1])
    return LavisCheckpoint(path, cfg, ours, origin, unknown, ignored, notes, changes, detected, vit)


def fill_from_lavis(model, ckpt: LavisCheckpoint, llm=None, strict: bool = True) -> None:
    """Copy a read LAVIS checkpoint into `model` (built from `ckpt.cfg`), with the LLM's weights from `llm` (a
    transformers directory, a weight file, a state dict or a module). What no source covers keeps its values;
    `model.load_report` lists the parts (`loaded`, `random`, `partial`) and a warning names them.

    strict=True: keys that have no place in the model, and missing weights other than whole optional parts
    (ViT, LLM, LLM projection), are errors. strict=False skips unknown keys and leaves any missing weight
    random (both reported). Shape mismatches are always errors."""
    path, cfg, ours, origin = ckpt.path, ckpt.cfg, dict(ckpt.weights), dict(ckpt.origin)
    unknown, notes = list(ckpt.unknown), list(ckpt.notes)
    llm_source = None
    if llm is not None:
        if model.llm is None:
            raise CheckpointError(f"llm= was given but the config ({cfg.architecture}) has no language model")
        llm_state, llm_source = _read_llm(llm, model)
        for k, v in llm_state.items():
            ours[k], origin[k] = v, f"{llm_source}:{k.removeprefix('llm.')}"

    own = model.state_dict()
    _fit_pos_embed(ours, own, cfg, notes)
    unknown += [origin.get(k, k) for k in ours if k not in own]
    _check_keys(path, cfg, ours, own, origin, unknown, strict)
    ours = {k: v for k, v in ours.items() if k in own}
    missing = _missing(model, own, ours)
    status = _part_status(own, missing)
    if strict:
        _check_parts(path, status)

    load_into(model, ours, str(path), allow_missing=missing)
    random = [p for p, s in status.items() if s == "random"]
    model.load_report = {
        "file": str(path), "vit_file": None if ckpt.vit is None else str(ckpt.vit), "llm_source": llm_source,
        "lavis_architecture": ckpt.detected,
        "loaded": [p for p, s in status.items() if s == "loaded"], "random": random,
        "partial": {p: s for p, s in status.items() if isinstance(s, list)},
        "config_changes": ckpt.changes, "ignored": ckpt.ignored, "unknown": unknown if not strict else [],
        "notes": notes,
    }
    _warn_left_out(path, status, unknown)


def _fit_pos_embed(ours: dict, own: Mapping[str, torch.Tensor], cfg: Blip2Config, notes: list[str]) -> None:
    """A ViT position table trained at another image size is resized to the model's (noted)."""
    pe = ours.get("vision.pos_embed")
    if pe is not None and "vision.pos_embed" in own and pe.shape != own["vision.pos_embed"].shape \
            and pe.shape[-1] == own["vision.pos_embed"].shape[-1]:
        ours["vision.pos_embed"] = _resize_pos_embed(pe, own["vision.pos_embed"].shape[1] - 1)
        notes.append(f"vision.pos_embed resized from {pe.shape[1]} to {own['vision.pos_embed'].shape[1]} "
                     f"positions (image size {cfg.vision.image_size})")


def _check_keys(path, cfg: Blip2Config, ours: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor],
                origin: Mapping[str, str], unknown: list[str], strict: bool) -> None:
    """Shapes must match; with strict, every key must have a place in the model."""
    mismatched = [f"{origin.get(k, k)} {list(v.shape)} vs model {k} {list(own[k].shape)}"
                  for k, v in ours.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if mismatched:
        raise CheckpointError(f"{path}: shape mismatch for {len(mismatched)} weight(s) (wrong config?): "
                              f"{_short(mismatched)}")
    if unknown and strict:
        raise CheckpointError(f"{path}: {len(unknown)} weight(s) with no place in a {cfg.architecture} model "
                              f"(strict=False skips them): {_short(unknown)}")


def _check_parts(path, status: dict[str, str | list[str]]) -> None:
    """strict: a part may stay random only if it is optional (ViT, LLM, projection), and none partly."""
    bad = [(p, s) for p, s in status.items() if isinstance(s, list) or (s == "random" and p not in OPTIONAL_PARTS)]
    if bad:
        lines = [f"{p}: " + ("no weights at all" if s == "random" else f"missing {_short(s, 6)}") for p, s in bad]
        raise CheckpointError(f"{path}: weights missing for the model's parts ({'; '.join(lines)}); check the "
                              f"config or pass strict=False to keep them random")


def _warn_left_out(path, status: dict[str, str | list[str]], unknown: list[str]) -> None:
    """A warning naming the parts left random (with how to fill them) and one for the skipped keys."""
    random = [p for p, s in status.items() if s == "random"]
    left = random + [f"{p} (partly)" for p, s in status.items() if isinstance(s, list)]
    if left:
        hints = {"vision": "pass vit='eva_vit_g.pth'", "llm": "pass llm=<LLM weights>",
                 "language_projection": "a stage-1 file has none; stage 2 trains it"}
        tips = "; ".join(f"{p}: {hints[p]}" for p in random if p in hints)
        logger.warning("%s: parts left with random weights: %s%s", path, ", ".join(left), f" ({tips})" if tips else "")
    if unknown:
        logger.warning("%s: skipped %d weight(s) with no place in the model: %s", path, len(unknown), _short(unknown))


def _part_status(own: Mapping[str, torch.Tensor], missing: set[str]) -> dict[str, str | list[str]]:
    """part -> "loaded" (every weight given), "random" (none given) or the list of its missing names."""
    status: dict[str, str | list[str]] = {}
    for part in PARTS:
        keys = [k for k in own if _part(k) == part]
        if keys:
            miss = [k for k in keys if k in missing]
            status[part] = "loaded" if not miss else "random" if len(miss) == len(keys) else miss
    return status


def _missing(model, own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> set[str]:
    """State-dict names not covered by `given`; a tied name counts as given when one of its aliases is."""
    alias = tied_names(model)
    return {k for k in own if k not in given and not any(a in given for a in alias.get(k, ()))}


# ------------------------------------------------------------------------------------------------- save
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


def load_vit_weights(model, path: str | Path) -> list[str]:
    """Load an eva_vit_g.pth-style file into `model.vision` (blocks past the configured depth dropped, the
    position table resized to the configured image size). Returns the dropped keys."""
    vit_lavis, dropped = _read_vit(path, model.cfg.vision.num_layers)
    vit_ours, unknown, _ = _translate(vit_lavis)
    if unknown:
        raise CheckpointError(f"ViT weights {path}: keys with no place in the EVA ViT: {_short(unknown)}")
    pe = vit_ours.get("vision.pos_embed")
    if pe is not None and pe.shape[1] != model.cfg.vision.num_patches + 1:
        vit_ours["vision.pos_embed"] = _resize_pos_embed(pe, model.cfg.vision.num_patches)
    own = model.state_dict()
    bad = [f"{k}: {list(v.shape)} vs {list(own[k].shape)}" for k, v in vit_ours.items() if k in own
           and tuple(v.shape) != tuple(own[k].shape)]
    missing = sorted(k for k in own if k.startswith("vision.") and k not in vit_ours)
    if bad or missing:
        raise CheckpointError(f"ViT weights {path} do not fit the vision config: "
                              f"{_short(bad) if bad else 'missing ' + _short(missing)}")
    with torch.no_grad():
        for k, v in vit_ours.items():
            own[k].copy_(v)
    return dropped
