"""Shard the frozen LLM across processes (FSDP2 `fully_shard`) when it does not fit one device.

Each decoder block becomes an FSDP unit: its weights live sharded and are all-gathered block by block during
forward/backward (the embeddings and the head stay whole: BLIP-2 embeds the text itself, outside the LLM's
forward). The LLM is frozen, so no gradients of its own are reduced; the
trainable parts (Q-Former, projection, ln_vision) stay replicated under DDP, which is told to leave the
sharded LLM alone.
"""

from __future__ import annotations

import torch
from torch.distributed.fsdp import fully_shard  # FSDP2's public API (torch >= 2.6)


def _blocks(llm: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated transformer blocks (a ModuleList of identical layer classes) of a transformers LM."""
    found = []
    for module in llm.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) > 1 and len({type(m) for m in module}) == 1:
            found.extend(module)
    return found


def shard_frozen_llm(model, device: torch.device) -> list[str]:
    """Shard `model.llm` in place; returns the names of the LLM's parameters and buffers (for DDP to ignore)."""
    llm = model.llm
    blocks = _blocks(llm)
    if not blocks:
        raise RuntimeError(f"fsdp: found no repeated transformer blocks in {type(llm).__name__}")
    names = {id(p): n for n, p in llm.named_parameters()}
    ignored = [f"model.llm.{names[id(p)]}" for b in blocks for p in b.parameters()]
    for block in blocks:
        fully_shard(block)  # the embeddings / head stay replicated: the model embeds the prompt itself
    return ignored


def ddp_ignore(module: torch.nn.Module, names: list[str]) -> None:
    """Tell DDP (before wrapping `module`) to leave these parameters and buffers alone: FSDP owns them.

    DDP has no public API for this: `_set_params_and_buffers_to_ignore_for_model` is a private static method of
    DistributedDataParallel (checked against torch 2.13, the version the suite runs with). This is the one place
    the package calls a torch-private function."""
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)


def full_state_dict(model) -> dict:
    """The model's state dict with every sharded tensor gathered whole (collective: every rank calls it)."""
    out = {}
    for k, v in model.state_dict().items():
        out[k] = v.full_tensor() if hasattr(v, "full_tensor") else v
    return out
