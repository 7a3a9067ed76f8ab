"""Distributed helpers that are no-ops in one process (no process group needed, ever).

`gather_with_grad` is an all-gather whose backward sums the gradients of every rank's loss and returns this
rank's slice: with it, N processes (each holding B samples, DDP averaging gradients) compute exactly the
gradient of one process holding the N*B samples.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def init_process_group(cuda: bool) -> None:
    """Start the default process group from torchrun's environment: NCCL on GPUs, Gloo on CPU."""
    dist.init_process_group("nccl" if cuda else "gloo")


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.batch = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)  # (W*B, ...)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)  # every rank's loss depends on every slice
        r = dist.get_rank()
        return grad[r * ctx.batch:(r + 1) * ctx.batch]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` [B, ...] from all ranks along dim 0, differentiably. Identity in one process.
    Every rank must hold the same B."""
    if not is_distributed():
        return x
    return _GatherWithGrad.apply(x)


@torch.no_grad()
def gather(x: torch.Tensor) -> torch.Tensor:
    """All-gather without gradient (ids, masks). Identity in one process."""
    if not is_distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


@torch.no_grad()
def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    if not is_distributed():
        return x
    x = x.clone()
    dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_(x: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place all-reduce ("sum" or "max"); a no-op in one process."""
    if is_distributed():
        dist.all_reduce(x, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return x
