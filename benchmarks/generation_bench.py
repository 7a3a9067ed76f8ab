"""Throughput of `blip2.generation.generate` vs transformers' `generate` on the same random LMs (CPU, fp32).

Batch 8, a 40-position left-padded prompt of random `inputs_embeds` (32 "visual" + 8 text positions), 20 new
tokens (min_new_tokens=20 so every row produces all 20), greedy and 5 beams. Timings are best of N,
interleaved (transformers, ours, transformers, ...) because the machine is shared and noisy. The ids of the
two implementations are checked to be identical before timing.

    PYTHONPATH=src python benchmarks/generation_bench.py [--repeats 5] [--quick] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings

import torch
from transformers import OPTConfig, OPTForCausalLM, T5Config, T5ForConditionalGeneration
from transformers.utils import logging as hf_logging

from blip2.generation import GenerationConfig, generate

B, L, NEW = 8, 40, 20


def build(name: str):
    torch.manual_seed(0)
    if name == "opt-tiny":
        cfg = OPTConfig(vocab_size=256, hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=4,
                        word_embed_proj_dim=64, max_position_embeddings=128)
        return OPTForCausalLM(cfg).eval(), 64
    if name == "opt-medium":
        cfg = OPTConfig(vocab_size=50272, hidden_size=512, ffn_dim=2048, num_hidden_layers=6, num_attention_heads=8,
                        word_embed_proj_dim=512, max_position_embeddings=128)
        return OPTForCausalLM(cfg).eval(), 512
    if name == "t5-tiny":
        cfg = T5Config(vocab_size=256, d_model=64, d_kv=16, d_ff=256, num_layers=2, num_decoder_layers=2, num_heads=4,
                       feed_forward_proj="gated-gelu", tie_word_embeddings=False, decoder_start_token_id=0)
        return T5ForConditionalGeneration(cfg).eval(), 64
    if name == "t5-medium":
        cfg = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=1024, num_layers=6, num_decoder_layers=6,
                       num_heads=8, feed_forward_proj="gated-gelu", tie_word_embeddings=False,
                       decoder_start_token_id=0)
        return T5ForConditionalGeneration(cfg).eval(), 512
    raise ValueError(name)


def inputs(dim: int):
    g = torch.Generator().manual_seed(0)
    embeds = torch.randn(B, L, dim, generator=g)
    mask = torch.ones(B, L, dtype=torch.long)
    for row, pads in enumerate([0, 3, 6, 1, 0, 5, 2, 7]):  # left padding, different per row
        mask[row, :pads] = 0
    return embeds, mask


def bench(lm, embeds, mask, kwargs: dict, repeats: int):
    cfg = GenerationConfig(**kwargs)

    def theirs():
        with torch.inference_mode():
            out = lm.generate(inputs_embeds=embeds, attention_mask=mask, **kwargs)
        return out[:, 1:] if lm.config.is_encoder_decoder else out  # drop the decoder start token

    def ours():
        return generate(lm, embeds, mask, cfg)

    same = torch.equal(theirs(), ours())
    best_theirs = best_ours = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        theirs()
        t1 = time.perf_counter()
        ours()
        t2 = time.perf_counter()
        best_theirs, best_ours = min(best_theirs, t1 - t0), min(best_ours, t2 - t1)
    return same, best_theirs, best_ours


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="timed runs per implementation (best is kept)")
    ap.add_argument("--quick", action="store_true", help="tiny models only")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    hf_logging.set_verbosity_error()
    names = ["opt-tiny", "t5-tiny"] if args.quick else ["opt-tiny", "opt-medium", "t5-tiny", "t5-medium"]
    modes = {"greedy": dict(max_new_tokens=NEW, min_new_tokens=NEW),
             "beam5": dict(max_new_tokens=NEW, min_new_tokens=NEW, num_beams=5)}
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; batch {B}, prompt {L}, {NEW} new tokens; "
          f"best of {args.repeats}")
    print(f"{'model':<11} {'mode':<7} {'same ids':<9} {'transformers tok/s':>19} {'ours tok/s':>11} {'ratio':>6}")
    all_same = True
    for name in names:
        lm, dim = build(name)
        embeds, mask = inputs(dim)
        for mode, kwargs in modes.items():
            same, t_hf, t_ours = bench(lm, embeds, mask, kwargs, args.repeats)
            all_same &= same
            tok = B * NEW
            print(f"{name:<11} {mode:<7} {str(same):<9} {tok / t_hf:>19.0f} {tok / t_ours:>11.0f} "
                  f"{t_hf / t_ours:>6.2f}", flush=True)
    if not all_same:
        sys.exit("ids differ from transformers")


if __name__ == "__main__":
    main()
