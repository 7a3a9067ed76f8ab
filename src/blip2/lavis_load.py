"""Filling a model from LAVIS files: a LAVIS checkpoint read for a config (`read_lavis_checkpoint`: which parts
it holds, the config they need), a built model filled from it (`fill_from_lavis`, with the frozen ViT from an
`eva_vit_g.pth`-style file and the LLM from its own weights), and ViT weights alone (`load_vit_weights`).
The key map and the file readers are `blip2.convert_lavis`; `blip2.api.load_lavis` builds the model in between.
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

from .checkpoint import CheckpointError, load_into, read_weights, tied_names
from .config import Blip2Config, ConfigError
from .convert_lavis import (DECODER_B, DECODER_W, LAVIS_ARCHITECTURES, WORD_EMBEDDINGS, lavis_architecture, part_of,
                            read_lavis, torch_load, translate)
from .vision import resize_pos_embed

logger = logging.getLogger(__name__)

def _read_vit(path: str | Path, num_layers: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An eva_vit_g.pth-style file (keys without `visual_encoder.`; a `{"model": ...}` wrapper or the prefix
    are accepted) as LAVIS keys. Blocks past `num_layers` and a final norm / classifier head are dropped, as
    LAVIS does (BLIP-2 uses the first 39 of 40 blocks, features before the final norm): returned as notes."""
    obj = torch_load(Path(path), "ViT weights")
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
    vit_ours, vit_unknown, vit_origin = translate(vit_lavis)
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
            state = torch_load(p, "LLM weights")
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
    parts = {part_of(k) for k in state}
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
        return "blip2_t5_instruct" if WORD_EMBEDDINGS in keys else "blip2_t5"
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
    ours, unknown, origin = translate(lavis)
    origin = {o: f"{path.name}:{k}" for o, k in origin.items()}  # our key -> file:key, for error messages
    ignored = sorted(f"{path.name}:{k}" for k in lavis if k.endswith("position_ids") or k in (DECODER_W, DECODER_B))
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
        keys = [k for k in own if part_of(k) == part]
        if keys:
            miss = [k for k in keys if k in missing]
            status[part] = "loaded" if not miss else "random" if len(miss) == len(keys) else miss
    return status


def _missing(model, own: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> set[str]:
    """State-dict names not covered by `given`; a tied name counts as given when one of its aliases is."""
    alias = tied_names(model)
    return {k for k in own if k not in given and not any(a in given for a in alias.get(k, ()))}


# ------------------------------------------------------------------------------------------------- save
def load_vit_weights(model, path: str | Path) -> list[str]:
    """Load an eva_vit_g.pth-style file into `model.vision` (blocks past the configured depth dropped, the
    position table resized to the configured image size). Returns the dropped keys."""
    vit_lavis, dropped = _read_vit(path, model.cfg.vision.num_layers)
    vit_ours, unknown, _ = translate(vit_lavis)
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
