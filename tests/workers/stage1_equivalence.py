"""Run under torchrun (2 gloo processes) or plainly (1 process): stage-1 losses and gradients of one global
batch of 8, written to argv[1] by rank 0. Gradients are averaged across ranks as DDP does."""

import sys

import torch
import torch.distributed as dist

from blip2.config import VisionConfig
from blip2.model import Blip2Model
from blip2.stage1 import stage1_config


def main(out_path: str) -> None:
    distributed = "RANK" in __import__("os").environ
    if distributed:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if distributed else 0
    world = dist.get_world_size() if distributed else 1
    torch.manual_seed(0)
    cfg = stage1_config(VisionConfig(image_size=32, patch_size=8, hidden_size=32, num_layers=2, num_heads=4,
                                     mlp_hidden_size=64),
                        num_query_tokens=4, vocab_size=60, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_position_embeddings=32, hidden_dropout=0.0, attention_dropout=0.0)
    model = Blip2Model(cfg).train()
    g = torch.Generator().manual_seed(1)
    px = torch.randn(8, 3, 32, 32, generator=g)
    ids = torch.randint(5, 60, (8, 10), generator=g)
    ids[:, 0] = 2
    mask = torch.ones_like(ids)
    for i in range(8):
        mask[i, 10 - i % 4:] = 0  # different text lengths: ITG's token count differs per rank
    image_ids = torch.tensor([0, 1, 2, 2, 3, 4, 5, 5]) if "--image-ids" in sys.argv else None
    B = 8 // world
    sl = slice(rank * B, (rank + 1) * B)
    out = model.losses(px[sl], ids[sl], mask[sl], image_ids=None if image_ids is None else image_ids[sl],
                       generator=torch.Generator().manual_seed(2))
    out["loss"].backward()
    result = {}
    for k, v in out.items():
        v = v.detach().clone()
        if distributed:
            dist.all_reduce(v)
        result[k] = v / world
    for n, p in model.named_parameters():
        if p.grad is not None:
            g_ = p.grad.clone()
            if distributed:
                dist.all_reduce(g_)
            result["grad." + n] = g_ / world
    if rank == 0:
        torch.save(result, out_path)
    if distributed:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
