"""Reading and writing checkpoints: the transformers format (Blip2ForConditionalGeneration,
Blip2ForImageTextRetrieval, InstructBlipForConditionalGeneration directories).

Conversion is a declarative key map (ours <-> transformers) with strict key and shape checks. This module never
builds a model: `blip2.api.load_pretrained` does, from `read_checkpoint`; `save_pretrained` takes one. Weight
files: single or sharded safetensors, legacy `.bin` (loaded with weights_only=True). Tied weights may be absent
from the file or present. `find_checkpoint` is the one resolver of what a user may name as a model.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .config import Blip2Config, ConfigError
from .files import atomic_dir


class CheckpointError(ValueError):
    """A checkpoint directory or file is missing, corrupt, or does not match the model."""


# ------------------------------------------------------------------------------------------------- key map
# (our key pattern, transformers key pattern). {n} = a layer index. Order matters only for readability.
_VISION = [
    ("vision.patch_embed.{p}", "vision_model.embeddings.patch_embedding.{p}"),
    ("vision.cls_token", "vision_model.embeddings.class_embedding"),
    ("vision.pos_embed", "vision_model.embeddings.position_embedding"),
    ("vision.blocks.{n}.norm1.{p}", "vision_model.encoder.layers.{n}.layer_norm1.{p}"),
    ("vision.blocks.{n}.attn.qkv.weight", "vision_model.encoder.layers.{n}.self_attn.qkv.weight"),
    # q_bias / v_bias <-> qkv.bias = cat(q_bias, 0, v_bias): handled as a fused pair below
    ("vision.blocks.{n}.attn.proj.{p}", "vision_model.encoder.layers.{n}.self_attn.projection.{p}"),
    ("vision.blocks.{n}.norm2.{p}", "vision_model.encoder.layers.{n}.layer_norm2.{p}"),
    ("vision.blocks.{n}.mlp.fc1.{p}", "vision_model.encoder.layers.{n}.mlp.fc1.{p}"),
    ("vision.blocks.{n}.mlp.fc2.{p}", "vision_model.encoder.layers.{n}.mlp.fc2.{p}"),
    ("ln_vision.{p}", "vision_model.post_layernorm.{p}"),
    ("vision.convnet.{rest}", "vision_model.convnet.{rest}"),  # our convolutional tower (no transformers class)
]
_QFORMER_LAYERS = [
    ("qformer.layers.{n}.attention.query.{p}", "qformer.encoder.layer.{n}.attention.attention.query.{p}"),
    ("qformer.layers.{n}.attention.key.{p}", "qformer.encoder.layer.{n}.attention.attention.key.{p}"),
    ("qformer.layers.{n}.attention.value.{p}", "qformer.encoder.layer.{n}.attention.attention.value.{p}"),
    ("qformer.layers.{n}.attention.out.{p}", "qformer.encoder.layer.{n}.attention.output.dense.{p}"),
    ("qformer.layers.{n}.attention.norm.{p}", "qformer.encoder.layer.{n}.attention.output.LayerNorm.{p}"),
    ("qformer.layers.{n}.crossattention.query.{p}", "qformer.encoder.layer.{n}.crossattention.attention.query.{p}"),
    ("qformer.layers.{n}.crossattention.key.{p}", "qformer.encoder.layer.{n}.crossattention.attention.key.{p}"),
    ("qformer.layers.{n}.crossattention.value.{p}", "qformer.encoder.layer.{n}.crossattention.attention.value.{p}"),
    ("qformer.layers.{n}.crossattention.out.{p}", "qformer.encoder.layer.{n}.crossattention.output.dense.{p}"),
    ("qformer.layers.{n}.crossattention.norm.{p}", "qformer.encoder.layer.{n}.crossattention.output.LayerNorm.{p}"),
    ("qformer.layers.{n}.ffn_query.fc1.{p}", "qformer.encoder.layer.{n}.intermediate_query.dense.{p}"),
    ("qformer.layers.{n}.ffn_query.fc2.{p}", "qformer.encoder.layer.{n}.output_query.dense.{p}"),
    ("qformer.layers.{n}.ffn_query.norm.{p}", "qformer.encoder.layer.{n}.output_query.LayerNorm.{p}"),
    ("qformer.layers.{n}.ffn_text.fc1.{p}", "qformer.encoder.layer.{n}.intermediate.dense.{p}"),
    ("qformer.layers.{n}.ffn_text.fc2.{p}", "qformer.encoder.layer.{n}.output.dense.{p}"),
    ("qformer.layers.{n}.ffn_text.norm.{p}", "qformer.encoder.layer.{n}.output.LayerNorm.{p}"),
]
_COMMON = [("qformer.query_tokens", "query_tokens"), ("language_projection.{p}", "language_projection.{p}"),
           ("llm.{rest}", "language_model.{rest}")]
_EMBED_BLIP2 = [("qformer.embeddings.layernorm.{p}", "qformer.layernorm.{p}")]
_EMBED_INSTRUCT = [
    ("qformer.embeddings.word_embeddings.{p}", "qformer.embeddings.word_embeddings.{p}"),
    ("qformer.embeddings.position_embeddings.{p}", "qformer.embeddings.position_embeddings.{p}"),
    ("qformer.embeddings.layernorm.{p}", "qformer.embeddings.layernorm.{p}"),
]
_EMBED_RETRIEVAL = [
    ("qformer.embeddings.word_embeddings.{p}", "embeddings.word_embeddings.{p}"),
    ("qformer.embeddings.position_embeddings.{p}", "embeddings.position_embeddings.{p}"),
    ("qformer.embeddings.layernorm.{p}", "qformer.layernorm.{p}"),
    ("vision_proj.{p}", "vision_projection.{p}"),
    ("text_proj.{p}", "text_projection.{p}"),
    ("itm_head.{p}", "itm_head.{p}"),
]
KEY_MAPS = {
    "blip2": _VISION + _QFORMER_LAYERS + _COMMON + _EMBED_BLIP2,
    "instructblip": _VISION + _QFORMER_LAYERS + _COMMON + _EMBED_INSTRUCT,
    "blip2-retrieval": _VISION + _QFORMER_LAYERS + _COMMON + _EMBED_RETRIEVAL,
}
# our keys that transformers does not store (defaults are kept): the contrastive temperature, and the Q-Former's
# LM head (stage 1 / Q-Former captioning), which transformers' retrieval class lacks (the LAVIS layout keeps it)
NOT_IN_HF = {"temp"}
NOT_IN_HF_PREFIXES = ("qformer.lm_head.",)

_QKV_BIAS = re.compile(r"^vision_model\.encoder\.layers\.(\d+)\.self_attn\.qkv\.bias$")


# the fields of a key template: a layer number, a parameter kind, any tail
KEY_FIELDS = {"n": r"\d+", "p": "weight|bias", "rest": ".+"}


def key_pattern(template: str, **fields: str) -> re.Pattern:
    """A key template such as "encoder.layer.{n}.output.dense.{p}" -> an anchored regex with a named group per
    `{field}` (KEY_FIELDS; `fields` adds more: name -> regex). The one compiler of every converter's key map."""
    rx = re.escape(template)
    for name, sub in {**KEY_FIELDS, **fields}.items():
        rx = rx.replace(re.escape("{" + name + "}"), f"(?P<{name}>{sub})")
    return re.compile(f"^{rx}$")


def _translate(key: str, rules: list[tuple[str, str]], forward: bool) -> str | None:
    for ours, theirs in rules:
        src, dst = (theirs, ours) if forward else (ours, theirs)
        m = key_pattern(src).match(key)
        if m:
            return dst.format(**m.groupdict())
    return None


def hf_to_ours(state: dict[str, torch.Tensor], architecture: str) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Translate a transformers state dict. Returns (our state dict, keys nothing maps)."""
    rules = KEY_MAPS[architecture]
    out, unknown = {}, []
    for k, v in state.items():
        m = _QKV_BIAS.match(k)
        if m:
            D = v.shape[0] // 3
            n = m.group(1)
            if v[D:2 * D].abs().max() > 0:
                raise CheckpointError(f"{k}: the key bias slice is not zero; this ViT has biases on q and v only")
            out[f"vision.blocks.{n}.attn.q_bias"] = v[:D]
            out[f"vision.blocks.{n}.attn.v_bias"] = v[2 * D:]
            continue
        if k.endswith("position_ids"):  # non-persistent buffers some writers store
            continue
        ours = _translate(k, rules, forward=True)
        if ours is None:
            unknown.append(k)
        else:
            out[ours] = v
    return out, unknown


def ours_to_hf(state: dict[str, torch.Tensor], architecture: str) -> dict[str, torch.Tensor]:
    rules = KEY_MAPS[architecture]
    out = {}
    for k, v in state.items():
        if k in NOT_IN_HF or k.startswith(NOT_IN_HF_PREFIXES) or k.endswith(".attn.v_bias"):
            continue
        if k.endswith(".attn.q_bias"):
            n = k.split(".")[2]
            v_bias = state[f"vision.blocks.{n}.attn.v_bias"]
            out[f"vision_model.encoder.layers.{n}.self_attn.qkv.bias"] = torch.cat([v, torch.zeros_like(v), v_bias])
            continue
        theirs = _translate(k, rules, forward=False)
        if theirs is None:
            raise CheckpointError(f"no transformers name for parameter {k!r} (architecture {architecture})")
        out[theirs] = v
    return out


# ------------------------------------------------------------------------------------------------ files
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")


def _read_file(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise CheckpointError(f"weight file {path} is missing")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except CheckpointError:
        raise
    except Exception as e:  # safetensors / pickle errors: one line naming the file
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"weight file {path} is corrupt or truncated ({type(e).__name__}: {msg})") from None


def weight_files(directory: str | Path) -> list[Path]:
    """The weight files of a transformers checkpoint directory: its shards in order (from the index file), or
    its single weight file."""
    d = Path(directory)
    for name in INDEX_FILES:
        idx = d / name
        if idx.is_file():
            try:
                weight_map = json.loads(idx.read_text())["weight_map"]
            except Exception as e:
                raise CheckpointError(f"{idx}: not a valid index file ({e})") from None
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (d / s).is_file()]
            if missing:
                raise CheckpointError(f"{d}: shard(s) {missing} listed in {name} are missing")
            return [d / s for s in shards]
    for name in WEIGHT_FILES:
        if (d / name).is_file():
            return [d / name]
    raise CheckpointError(f"{d}: no weights found (expected one of {list(WEIGHT_FILES + INDEX_FILES)})")


def read_weights(directory: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers checkpoint directory (single file or sharded with an index)."""
    state = {}
    for f in weight_files(directory):
        state.update(_read_file(f))
    return state


def iter_weights(directory: str | Path):
    """(name, tensor) of a transformers checkpoint directory one tensor at a time, shard by shard: a streaming
    loader holds one tensor (and the open shard's mapped pages) beside what it has built."""
    for f in weight_files(directory):
        if f.suffix != ".safetensors":
            yield from _read_file(f).items()  # a pickled .bin file: memory-mapped, read whole
            continue
        try:
            with safe_open(str(f), framework="pt") as sf:
                for key in sf.keys():
                    yield key, sf.get_tensor(key)
        except Exception as e:  # safetensors errors: one line naming the file
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CheckpointError(f"weight file {f} is corrupt or truncated ({type(e).__name__}: {msg})") from None


def read_config(directory: str | Path) -> Blip2Config:
    p = Path(directory) / "config.json"
    if not p.is_file():
        raise CheckpointError(f"{directory}: no config.json (is this a transformers checkpoint directory?)")
    try:
        d = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p}: invalid JSON ({e})") from None
    return Blip2Config.from_hf(d, where=str(p))


# ------------------------------------------------------------------------------------------- state dict
def tied_names(model: torch.nn.Module) -> dict[str, list[str]]:
    """name -> all names of the same tensor (tied weights)."""
    by_id: dict[int, list[str]] = {}
    for n, t in list(model.named_parameters(remove_duplicate=False)) + list(model.named_buffers(remove_duplicate=False)):
        by_id.setdefault(id(t), []).append(n)
    return {n: names for names in by_id.values() for n in names}


def _untie_if_different(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A file may hold different values for names the model ties (Flan-T5's head vs its embeddings, while
    transformers' T5 config always ties): give each such name its own parameter."""
    for names in {id(v): v for v in tied_names(model).values()}.values():
        given = [n for n in names if n in state]
        if len(given) < 2:
            continue
        first = state[given[0]]
        for n in given[1:]:
            if state[n].shape == first.shape and torch.equal(state[n], first):
                continue
            mod_name, _, attr = n.rpartition(".")
            mod = model.get_submodule(mod_name)
            old = getattr(mod, attr)
            setattr(mod, attr, torch.nn.Parameter(torch.empty_like(old), requires_grad=old.requires_grad))


def load_into(model: torch.nn.Module, state: dict[str, torch.Tensor], source: str, allow_missing=()) -> None:
    """Copy `state` (our names) into `model`, strictly: every parameter must be given (tied aliases count)
    with the right shape; extra keys are errors."""
    _untie_if_different(model, state)
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(dict(model.named_buffers(remove_duplicate=False)))
    persistent = set(model.state_dict().keys())
    aliases = tied_names(model)
    unexpected = sorted(k for k in state if k not in own)
    mismatched = [f"{k}: file {list(v.shape)} vs model {list(own[k].shape)}"
                  for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape)]
    missing = sorted(k for k in persistent if k not in state and not any(a in state for a in aliases.get(k, []))
                     and k not in allow_missing)
    if unexpected or mismatched or missing:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)}: {_short(missing)}")
        if unexpected:
            parts.append(f"unexpected {len(unexpected)}: {_short(unexpected)}")
        if mismatched:
            parts.append(f"shape mismatch {len(mismatched)}: {_short(mismatched)}")
        raise CheckpointError(f"{source}: weights do not match the model: " + "; ".join(parts))
    with torch.no_grad():
        for k, v in state.items():
            t = own[k]
            t.copy_(v.to(dtype=t.dtype) if t.is_floating_point() else v)


def _short(keys: list[str], n: int = 8) -> str:
    return ", ".join(keys[:n]) + (f", ... (+{len(keys) - n} more)" if len(keys) > n else "")


# ------------------------------------------------------------------------------------------------ load
def find_checkpoint(path: str | Path) -> Path:
    """Where the model behind `path` is, for every command and `blip2.load`: a transformers-format directory (it
    holds config.json), a `blip2 train` run directory (its exported `model/`), or a LAVIS `.pth` / `.pt` file
    (returned as is: the caller reads it). Anything else is a CheckpointError naming the accepted forms."""
    p = Path(path)
    if p.suffix in (".pth", ".pt"):
        return p
    if not p.exists():
        raise CheckpointError(f"{p}: no such checkpoint directory")
    if p.is_dir():
        if (p / "config.json").is_file():
            return p
        if (p / "model" / "config.json").is_file():
            return p / "model"  # a `blip2 train` output directory
        if (p / "model" / "vit.pth").is_file():
            raise CheckpointError(f"{p}: a stage-0 run; its model/vit.pth is an image encoder alone (the "
                                  f"model.vit_path of later stages), not a BLIP-2 checkpoint")
    raise CheckpointError(f"{p}: no config.json: expected a transformers-format checkpoint directory, a `blip2 "
                          f"train` run directory (with model/config.json) or a LAVIS .pth file")


def read_checkpoint(directory: str | Path) -> tuple[Blip2Config, dict[str, torch.Tensor]]:
    """The config and the weights (our names) of a transformers-format directory; a weight with no place in
    the architecture is an error. `blip2.api.load_pretrained` builds the model and copies them in."""
    d = Path(directory)
    if not d.exists():
        raise CheckpointError(f"{d}: no such checkpoint directory")
    cfg = read_config(d)
    ours, unknown = hf_to_ours(read_weights(d), cfg.architecture)
    if unknown:
        raise CheckpointError(f"{d}: weights with no place in a {cfg.architecture} model: {_short(sorted(unknown))}")
    return cfg, ours


# ------------------------------------------------------------------------------------------------ save
def save_pretrained(model, path: str | Path, max_shard_size: int = 2 * 1024**3, state: dict | None = None) -> None:
    """Write config.json + safetensors (sharded above max_shard_size) + tokenizer files, atomically.
    `state`: the model's state dict when it is not `model.state_dict()` (e.g. gathered from shards)."""
    cfg: Blip2Config = model.cfg
    try:
        hf_cfg = cfg.to_hf()
    except ConfigError as e:
        raise CheckpointError(f"cannot write the transformers format: {e}") from None
    state = model.state_dict() if state is None else state
    # tied weights: write each tensor once, under its first name (transformers re-ties on load)
    seen, unique = {}, {}
    for k, v in state.items():
        key = (v.data_ptr(), tuple(v.shape), v.dtype) if v.device.type != "meta" else k
        if key in seen:
            continue
        seen[key] = k
        unique[k] = v
    hf_state = {k: v.detach().contiguous().cpu() for k, v in ours_to_hf(unique, cfg.architecture).items()}
    dtype = next(iter(hf_state.values())).dtype
    hf_cfg["torch_dtype"] = str(dtype).replace("torch.", "")

    out = Path(path)
    with atomic_dir(out) as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2))
        shards, cur, size = [], {}, 0
        for k, v in hf_state.items():
            n = v.numel() * v.element_size()
            if cur and size + n > max_shard_size:
                shards.append(cur)
                cur, size = {}, 0
            cur[k] = v
            size += n
        shards.append(cur)
        if len(shards) == 1:
            save_file(shards[0], str(tmp / "model.safetensors"), metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, sh in enumerate(shards):
                name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(sh, str(tmp / name), metadata={"format": "pt"})
                weight_map.update({k: name for k in sh})
            total = sum(v.numel() * v.element_size() for v in hf_state.values())
            (tmp / "model.safetensors.index.json").write_text(
                json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        if model.processor is not None:
            model.processor.save_pretrained(tmp)
