"""Inference speed against transformers' own classes, in one process, on the same random weights.

For a tiny and a medium BLIP-2 (OPT) it measures forward latency and `generate` throughput (batch 8, 20 new
tokens, greedy and 5 beams), checks that the generated ids are identical, and prints ours / transformers
ratios. Timings are interleaved and the best of several repeats is kept, because this machine is noisy.

    .venv/bin/python benchmarks/inference.py [--sizes tiny medium] [--repeats 5] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {
    # vision, Q-Former, OPT
    "tiny": (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8),
             dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128),
             dict(model_type="opt", hidden_size=64, ffn_dim=128, num_hidden_layers=2, num_attention_heads=4,
                  word_embed_proj_dim=64, vocab_size=1000, max_position_embeddings=256), 32),
    "medium": (dict(hidden_size=384, intermediate_size=1536, num_hidden_layers=12, num_attention_heads=6,
                    image_size=224, patch_size=16),
               dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6, intermediate_size=1536),
               dict(model_type="opt", hidden_size=768, ffn_dim=3072, num_hidden_layers=12, num_attention_heads=12,
                    word_embed_proj_dim=768, vocab_size=50272, max_position_embeddings=2048), 32),
}
IMAGE_TOKEN = 3


def build(size: str, directory: Path):
    from transformers import Blip2Config, Blip2ForConditionalGeneration

    import blip2

    v, q, t, nq = SIZES[size]
    cfg = Blip2Config(vision_config=v, qformer_config=q, text_config={**t, "bos_token_id": 2, "eos_token_id": 2,
                                                                       "pad_token_id": 1},
                      num_query_tokens=nq, image_token_index=IMAGE_TOKEN)
    torch.manual_seed(0)
    hf = Blip2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # livelier logits than the default init, so beams and tokens vary
        for p in hf.language_model.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    hf.save_pretrained(directory)
    return hf, blip2.load(directory), v["image_size"], t["vocab_size"], nq


def best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def run(size: str, repeats: int, batch: int = 8, new_tokens: int = 20) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        hf, ours, image_size, vocab, nq = build(size, Path(d))
    g = torch.Generator().manual_seed(1)
    px = torch.randn(batch, 3, image_size, image_size, generator=g)
    ids = torch.randint(4, vocab, (batch, 8), generator=g)
    ids[:, 0] = 2  # BOS
    mask = torch.ones_like(ids)
    for i in range(batch):  # left padding of different lengths
        mask[i, : i % 4] = 0
        ids[i, : i % 4] = 1
    ph = torch.full((batch, nq), IMAGE_TOKEN)
    hids, hmask = torch.cat([ph, ids], 1), torch.cat([torch.ones_like(ph), mask], 1)
    rows = []
    with torch.inference_mode():
        # forward latency
        f_ours = lambda: ours(pixel_values=px, input_ids=ids, attention_mask=mask)  # noqa: E731
        f_hf = lambda: hf(pixel_values=px, input_ids=hids, attention_mask=hmask)  # noqa: E731
        f_ours(), f_hf()  # warm-up
        t_o, t_h = [], []
        for _ in range(repeats):
            t_o.append(best(f_ours, 1))
            t_h.append(best(f_hf, 1))
        rows.append({"size": size, "what": "forward latency (s)", "ours": min(t_o), "transformers": min(t_h),
                     "speedup": min(t_h) / min(t_o), "ids_identical": None})
        for beams in (1, 5):
            kw = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, num_beams=beams)
            a = ours.generate(px, input_ids=ids, attention_mask=mask, **kw)
            b = hf.generate(pixel_values=px, input_ids=hids, attention_mask=hmask, **kw)[:, hids.shape[1]:]
            same = torch.equal(a, b)
            t_o, t_h = [], []
            for _ in range(repeats):
                t_o.append(best(lambda: ours.generate(px, input_ids=ids, attention_mask=mask, **kw), 1))
                t_h.append(best(lambda: hf.generate(pixel_values=px, input_ids=hids, attention_mask=hmask, **kw), 1))
            tokens = batch * new_tokens
            rows.append({"size": size, "what": f"generate {'greedy' if beams == 1 else f'{beams} beams'} (tok/s)",
                         "ours": tokens / min(t_o), "transformers": tokens / min(t_h),
                         "speedup": min(t_h) / min(t_o), "ids_identical": same})
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "medium"], choices=sorted(SIZES))
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    rows = []
    for s in a.sizes:
        rows += run(s, a.repeats)
    print(f"{'size':<8}{'measure':<28}{'ours':>12}{'transformers':>14}{'speedup':>9}  ids identical")
    for r in rows:
        print(f"{r['size']:<8}{r['what']:<28}{r['ours']:>12.4g}{r['transformers']:>14.4g}{r['speedup']:>8.2f}x  "
              f"{'' if r['ids_identical'] is None else r['ids_identical']}")
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(r["ids_identical"] is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
