"""The process a run trains in: distributed set-up, mixed precision and seeding.

Shared by the training loop and `blip2 cache-features` (which must build the model exactly as training does).
In one plain process there is no process group and `setup_distributed` only picks the device.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch
import torch.distributed as dist

from ..dist import init_process_group
from ..precision import apply_precision
from .config import RunConfig


def setup_distributed(cfg: RunConfig) -> tuple[int, int, torch.device]:
    """(rank, world size, device). Under torchrun (RANK and WORLD_SIZE set) the process group is created:
    NCCL on GPUs, gloo on CPU."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        init_process_group(cuda=torch.cuda.is_available() and cfg.device != "cpu")
    rank = dist.get_rank() if dist.is_initialized() else 0
    world = dist.get_world_size() if dist.is_initialized() else 1
    if cfg.device:
        device = torch.device(cfg.device)
    elif torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    return rank, world, device


def amp_settings(cfg: RunConfig, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a grad scaler). Reduced precision only on GPUs: on CPU fp32."""
    p = cfg.precision
    if device.type != "cuda" or p == "fp32":
        return None, False
    if p == "auto":
        p = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return (torch.bfloat16, False) if p == "bf16" else (torch.float16, True)


def place_for_training(model, amp_dtype: torch.dtype | None) -> None:
    """The weights' dtypes for a run under autocast in `amp_dtype` (amp_settings), as the original trains
    (blip2.precision; LAVIS loads the ViT with vit_precision fp16 and the LLM in fp16 / bf16, then trains under
    torch.cuda.amp.autocast): the frozen ViT in amp_dtype with its LayerNorms fp32, the frozen LLM in amp_dtype,
    and ln_vision, the Q-Former, queries, projection and every trainable weight (LoRA included) fp32, the
    master weights. Without autocast (CPU, fp32) nothing changes."""
    if amp_dtype is not None:
        apply_precision(model, llm_dtype=amp_dtype, vit_dtype=amp_dtype, trainable_fp32=True)


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
