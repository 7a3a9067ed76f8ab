"""AdamW without weight decay on biases, norms and 1-D parameters; per-step linear warmup + cosine decay."""

from __future__ import annotations

import math

import torch


def param_groups(model: torch.nn.Module, weight_decay: float, lr_scale: dict[str, float] | None = None) -> list[dict]:
    """Decay / no-decay groups, split further by `lr_scale` ({parameter-name prefix: multiplier of the schedule's
    lr}; the longest matching prefix wins, 1.0 where none matches). Each group carries its "lr_scale"."""
    lr_scale = lr_scale or {}
    groups: dict[tuple[bool, float], list] = {}
    skip = model.no_weight_decay() if hasattr(model, "no_weight_decay") else set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        decay = not (p.ndim < 2 or name in skip or "norm" in name.lower())
        prefixes = [k for k in lr_scale if name.startswith(k)]
        scale = float(lr_scale[max(prefixes, key=len)]) if prefixes else 1.0
        groups.setdefault((decay, scale), []).append(p)
    order = sorted(groups, key=lambda k: (not k[0], k[1]))  # decay first, then by scale: a stable layout
    return [{"params": groups[k], "weight_decay": weight_decay if k[0] else 0.0, "lr_scale": k[1]} for k in order]


def lr_at(step: int, base_lr: float, min_lr: float, warmup_steps: int, warmup_lr: float, max_steps: int) -> float:
    """Learning rate for optimizer step `step` (0-based): linear warmup from warmup_lr to base_lr over
    warmup_steps, then cosine from base_lr down to min_lr at max_steps."""
    if step < warmup_steps:
        return warmup_lr + (base_lr - warmup_lr) * step / warmup_steps
    span = max(1, max_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    return min_lr + (base_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(model, cfg) -> torch.optim.AdamW:
    o = cfg.optim
    kwargs = {"lr": o.lr, "betas": tuple(o.betas), "eps": o.eps}
    groups = [g for g in param_groups(model, o.weight_decay, o.lr_scale) if g["params"]]
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return torch.optim.AdamW(groups, **kwargs)
