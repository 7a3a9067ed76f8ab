"""Stage-1 training-step throughput on CPU, normalised by this machine's matmul speed.

Configuration of the LAVIS anchor (measured on this kind of machine with the original code): ViT 12x384 @224/16,
Q-Former 6x384 with 32 queries, batch 16, text 32 tokens, fp32, 2 threads, train mode: 576 GFLOP per step
(forward + backward), about 8 s per step, about 0.6 of the pooled matmul throughput.

This host's matmul speed drifts, so a plain matmul is probed before every timed step and the probes are pooled.
Reported: step time, FLOP per step (counted by torch's FlopCounterMode), achieved FLOP/s, the share of the
step spent in the frozen encoder, and the "LAVIS-equivalent efficiency" = 576 GFLOP / (step time x pooled
matmul FLOP/s), whose LAVIS value is 0.6 (target: >= 1.3 x 0.6 = 0.78).

    .venv/bin/python benchmarks/stage1.py [--steps 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

LAVIS_GFLOP = 576.0
LAVIS_EFFICIENCY = 0.6


def matmul_probe(n: int = 1024, reps: int = 8) -> float:
    """FLOP/s of a plain fp32 matmul, best of `reps`."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def build(vocab: int = 30523):
    from blip2.config import VisionConfig
    from blip2.model import Blip2Model
    from blip2.stage1 import stage1_config

    torch.manual_seed(0)
    vision = VisionConfig(image_size=224, patch_size=16, hidden_size=384, num_layers=12, num_heads=6,
                          mlp_hidden_size=1536)
    cfg = stage1_config(vision, num_query_tokens=32, vocab_size=vocab, hidden_size=384, num_layers=6, num_heads=6,
                        intermediate_size=1536)
    return Blip2Model(cfg).train()


def batch(B: int = 16, T: int = 32, vocab: int = 30523):
    g = torch.Generator().manual_seed(0)
    px = torch.randn(B, 3, 224, 224, generator=g)
    ids = torch.randint(1000, vocab - 1, (B, T), generator=g)
    ids[:, 0], ids[:, -1] = 101, 102  # [CLS] ... [SEP], all 32 tokens real (the worst case)
    return px, ids, torch.ones_like(ids)


def count_flops(model, px, ids, mask) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        out = model.losses(px, ids, mask, generator=torch.Generator().manual_seed(0))
        out["loss"].backward()
    model.zero_grad(set_to_none=True)
    return float(fc.get_total_flops())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)

    model = build()
    px, ids, mask = batch()
    flops = count_flops(model, px, ids, mask)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)

    encoder_time = [0.0]
    encode = model.encode_image

    def timed_encode(x):
        t0 = time.perf_counter()
        out = encode(x)
        encoder_time[0] += time.perf_counter() - t0
        return out

    model.encode_image = timed_encode  # instrumentation only
    g = torch.Generator().manual_seed(1)

    def step():
        out = model.losses(px, ids, mask, generator=g)
        opt.zero_grad(set_to_none=True)
        out["loss"].backward()
        opt.step()

    step()  # warm-up
    probes, times, enc = [], [], []
    for _ in range(a.steps):
        probes.append(matmul_probe())
        encoder_time[0] = 0.0
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
        enc.append(encoder_time[0])
    pooled = sum(probes) / len(probes)
    t = sorted(times)[len(times) // 2]  # median step
    result = {
        "step_time_s": t,
        "steps_per_s": 1 / t,
        "gflop_per_step": flops / 1e9,
        "achieved_gflops": flops / t / 1e9,
        "pooled_matmul_gflops": pooled / 1e9,
        "fraction_of_matmul": flops / t / pooled,
        "encoder_share": sorted(e / s for e, s in zip(enc, times))[len(times) // 2],
        "lavis_equivalent_efficiency": LAVIS_GFLOP * 1e9 / (t * pooled),
    }
    result["speedup_vs_lavis"] = result["lavis_equivalent_efficiency"] / LAVIS_EFFICIENCY
    for k, v in result.items():
        print(f"{k:<30} {v:10.3f}")
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
