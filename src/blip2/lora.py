"""LoRA adapters through `peft` on the LLM, the Q-Former or the image encoder of a Blip2Model.

    add_lora(model, r=8)                   wrap model.llm (and/or qformer, vision) in a peft LoRA model
    save_adapters(model, dir)              the PEFT adapter directory (peft's own format), stage tensors beside it
    merge_lora(model)                      fold the adapters into the base weights (a plain model again)
    load_adapters(model, dir)              apply a directory written by save_adapters

A wrapped part is a `peft.PeftModel` (attribute access reaches the wrapped module, so the model's code is
unchanged); its base weights are frozen, its adapters trainable. The LLM and the image encoder are frozen
anyway, so with LoRA on them the trainable set is the adapters plus what the stage trains; with LoRA on the
Q-Former, its attention projections are frozen and adapted, its other weights (queries, norms, FFNs) still train.

peft is an optional extra (`pip install blip2[lora]`): it is imported inside the functions that need it.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

PARTS = ("llm", "qformer", "vision")

# The linear layers LoRA adapts by default: the attention projections (the LoRA paper adapts W_q and W_v; for
# LLaMA-family models q/k/v/o is the usual choice). Names as transformers (LLMs) and this package (Q-Former,
# ViT) give the modules; peft matches them as name suffixes.
DEFAULT_TARGETS = {
    "opt": ["q_proj", "v_proj"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj"],
    "t5": ["q", "v"],
    "qformer": ["query", "value"],  # self- and cross-attention (blip2.qformer.Attention)
    "vit": ["qkv", "proj"],  # blip2.vision.Attention
}
STAGE_TENSORS = "stage_tensors.safetensors"  # the non-adapter trainable tensors, next to the adapters


class LoraError(ValueError):
    pass


def _peft():
    try:  # deferred: peft is an optional extra (lora)
        import peft
    except ImportError:
        raise LoraError("LoRA needs the `peft` package: pip install 'blip2[lora]'") from None
    return peft


def default_targets(model, part: str) -> list[str]:
    """The default target module names for one part of `model`."""
    if part == "llm":
        kind = model.llm.config.model_type
    elif part == "qformer":
        kind = "qformer"
    else:
        kind = "vit" if model.cfg.vision.kind == "eva" else model.cfg.vision.kind
    if kind not in DEFAULT_TARGETS:
        raise LoraError(f"lora.target_modules: no default target modules for {part} of type {kind!r}; give "
                        f"lora.target_modules (the names of its linear layers, e.g. {DEFAULT_TARGETS['llama']})")
    return list(DEFAULT_TARGETS[kind])


def lora_parts(model) -> list[str]:
    """The parts of `model` that wear a peft wrapper."""
    peft = _peft() if any(type(getattr(model, p, None)).__module__.startswith("peft") for p in PARTS) else None
    return [p for p in PARTS if peft is not None and isinstance(getattr(model, p, None), peft.PeftModel)]


def add_lora(model, r: int, alpha: float = 16.0, dropout: float = 0.05, target_modules=None,
             on=("llm",)) -> None:
    """Wrap the named parts of `model` in place. target_modules: names for every part, or None for each part's
    defaults (`DEFAULT_TARGETS`)."""
    peft = _peft()
    if r <= 0:
        raise LoraError(f"lora.r: must be > 0 to add adapters, got {r}")
    for part in on:
        if part not in PARTS:
            raise LoraError(f"lora.on: {part!r} is not one of {list(PARTS)}")
        module = getattr(model, part, None)
        if module is None:
            raise LoraError(f"lora.on: the model has no {part}")
        targets = list(target_modules) if target_modules else default_targets(model, part)
        cfg = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets)
        was_trainable = {n for n, p in module.named_parameters() if p.requires_grad}
        try:
            wrapped = peft.get_peft_model(module, cfg)
        except ValueError as e:  # peft: none of the target modules exists in the part
            raise LoraError(f"lora.target_modules {targets} on {part}: {str(e).splitlines()[0]}") from None
        # peft freezes every base weight; the part's weights that were trainable and are not adapted train on
        for name, p in wrapped.base_model.model.named_parameters():
            if name in was_trainable and "lora_" not in name:
                p.requires_grad_(True)
        setattr(model, part, wrapped)


def lora_train_mode(model, mode: bool) -> None:
    """LoRA dropout follows the training mode even inside a frozen part kept in eval mode."""
    for name, m in model.named_modules():
        if name.endswith("lora_dropout"):
            m.train(mode)


def plain_name(name: str) -> str:
    """A parameter name without peft's wrapper levels (the name in the unwrapped model)."""
    return name.replace("base_model.model.", "").replace(".base_layer.", ".")


def stage_tensors(model) -> dict[str, torch.Tensor]:
    """The trainable tensors that are not adapters, by their plain names (what the stage trained)."""
    return {plain_name(n): p.detach().contiguous().cpu() for n, p in model.named_parameters()
            if p.requires_grad and "lora_" not in n}


def save_adapters(model, directory: str | Path) -> None:
    """The LLM's adapter as a PEFT adapter directory (`peft.PeftModel.from_pretrained(llm, directory)` loads it),
    the Q-Former's / encoder's in subdirectories `qformer/` / `vision/`, and the stage's other trainable tensors
    in `stage_tensors.safetensors`. Written into `directory` (the caller makes it atomic)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    for part in lora_parts(model):
        getattr(model, part).save_pretrained(str(d if part == "llm" else d / part))
    save_file(stage_tensors(model), str(d / STAGE_TENSORS))


def merge_lora(model) -> None:
    """Fold every part's adapters into its base weights; the parts become the plain modules again."""
    for part in lora_parts(model):
        setattr(model, part, getattr(model, part).merge_and_unload())


def load_adapters(model, directory: str | Path, merge: bool = False) -> None:
    """Apply a directory written by `save_adapters` (or a plain PEFT adapter directory for the LLM) to `model`."""
    peft = _peft()
    d = Path(directory)
    subdirs = {"llm": d, "qformer": d / "qformer", "vision": d / "vision"}
    found = [p for p, sd in subdirs.items() if (sd / "adapter_config.json").is_file()]
    if not found:
        raise LoraError(f"{d}: no adapter_config.json (expected a PEFT adapter directory, e.g. a run's adapter/)")
    for part in found:
        module = getattr(model, part, None)
        if module is None:
            raise LoraError(f"{subdirs[part]}: an adapter for the {part}, which this model does not have")
        try:
            setattr(model, part, peft.PeftModel.from_pretrained(module, str(subdirs[part])))
        except (ValueError, RuntimeError, KeyError) as e:
            raise LoraError(f"{subdirs[part]}: the adapter does not fit the model's {part} "
                            f"({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if (d / STAGE_TENSORS).is_file():
        _copy_stage_tensors(model, load_file(str(d / STAGE_TENSORS)), d / STAGE_TENSORS)
    if merge:
        merge_lora(model)


def _copy_stage_tensors(model, tensors: dict[str, torch.Tensor], source: Path) -> None:
    own = {plain_name(n): p for n, p in model.named_parameters()}
    unknown = sorted(set(tensors) - set(own))
    if unknown:
        raise LoraError(f"{source}: tensors with no place in the model: {unknown[:5]}")
    with torch.no_grad():
        for k, v in tensors.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise LoraError(f"{source}: {k} has shape {list(v.shape)}, the model {list(own[k].shape)}")
            own[k].copy_(v)
