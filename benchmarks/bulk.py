"""Bulk captioning throughput on CPU: `blip2 caption --input` (blip2.bulk) against a plain loop that calls
`model.caption` on batches of image paths of the same size, with the same settings and the same captions.

A medium random BLIP-2 (OPT) with a small tokenizer captions N generated photo-like JPEG images (smooth colour
fields with noise, 320 x 240, so decoding costs what a real JPEG does). The model: ViT 4 x 384 at 128 px / patch
16, Q-Former 4 x 256 with 32 queries, OPT 4 x 512 (LLM weights scaled up so the random captions differ); greedy,
20 new tokens. Sizes are cut so that both runs over 512 images take a few minutes on a 2-core CPU. Each mode runs in a fresh subprocess,
one after the other, which reports its wall time, images/s and the peak resident memory of the run; the
captions of the two modes are compared. The bulk run decodes and pre-processes in DataLoader workers while the
main process runs the model.

    PYTHONPATH=src .venv/bin/python benchmarks/bulk.py [--images 512] [--batch-size 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# vision, Q-Former, OPT of the medium random model
VISION = {"image_size": 128, "patch_size": 16, "hidden_size": 384, "num_layers": 4, "num_heads": 6,
          "mlp_hidden_size": 1536}
QFORMER = {"hidden_size": 256, "num_layers": 4, "num_heads": 4, "intermediate_size": 1024, "num_query_tokens": 32}
OPT = {"hidden_size": 512, "ffn_dim": 2048, "num_hidden_layers": 4, "num_attention_heads": 8,
       "word_embed_proj_dim": 512}


def build_checkpoint(directory: Path) -> Path:
    import torch

    import blip2
    from serve import build_checkpoint as build_random  # benchmarks/serve.py, beside this file

    path = build_random((VISION, QFORMER, OPT), directory)
    model = blip2.load(path)
    with torch.no_grad():  # livelier logits than the default init, so that the captions differ
        for p in model.llm.parameters():
            if p.ndim == 2:
                p.mul_(4.0)
    model.save_pretrained(path)
    return path


def write_images(folder: Path, n: int) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)  # a smooth colour field, plus noise
        img = np.asarray(Image.fromarray(small).resize((320, 240), Image.Resampling.BICUBIC), dtype=np.int16)
        img = np.clip(img + rng.integers(-20, 21, img.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(folder / f"{i:05d}.jpg", quality=90)


def _peak_mb(who=resource.RUSAGE_SELF) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def probe(mode: str, work: Path, batch_size: int, workers: int, gen: dict) -> None:
    """One timed run in this (fresh) process; prints a JSON line."""
    import blip2
    from blip2.bulk.run import BulkJob, label_dataset

    model = blip2.load(work / "model")
    paths = sorted((work / "images").glob("*.jpg"))
    model.caption([str(paths[0])], **gen)  # warm-up (first-call allocations), as a user's loop would have
    built = _peak_mb()
    t0 = time.perf_counter()
    if mode == "loop":
        captions = []
        for k in range(0, len(paths), batch_size):
            captions += model.caption([str(p) for p in paths[k:k + batch_size]], **gen)
    else:
        out = work / "bulk.jsonl"
        label_dataset(model, BulkJob(task="caption", input=work / "images", output=out, batch_size=batch_size,
                                     workers=workers, generation=gen, progress=False, overwrite=True))
        captions = [json.loads(line)["text"] for line in out.read_text().splitlines()]
    seconds = time.perf_counter() - t0
    print(json.dumps({"mode": mode, "seconds": seconds, "images_per_s": len(paths) / seconds,
                      "peak_rss_mb": round(_peak_mb(), 1), "rss_before_run_mb": round(built, 1),
                      "worker_peak_rss_mb": round(_peak_mb(resource.RUSAGE_CHILDREN), 1),
                      "captions": captions}))


def run_probe(mode: str, work: Path, a) -> dict:
    cmd = [sys.executable, __file__, "--probe", mode, "--work", str(work), "--batch-size", str(a.batch_size),
           "--workers", str(a.workers), "--num-beams", str(a.num_beams), "--max-new-tokens", str(a.max_new_tokens)]
    if a.threads:
        cmd += ["--threads", str(a.threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"{mode} run failed: {r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--workers", type=int, default=1, help="bulk DataLoader workers (a CPU run shares the cores)")
    ap.add_argument("--num-beams", type=int, default=1)
    ap.add_argument("--max-new-tokens", type=int, default=20)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own choice)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--probe", choices=["loop", "bulk"], help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    gen = {"num_beams": a.num_beams, "max_new_tokens": a.max_new_tokens}
    if a.probe:
        import torch

        if a.threads:
            torch.set_num_threads(a.threads)
        probe(a.probe, a.work, a.batch_size, a.workers, gen)
        return 0
    with tempfile.TemporaryDirectory(prefix="blip2-bulk-bench-") as tmp:
        work = Path(tmp)
        build_checkpoint(work)
        write_images(work / "images", a.images)
        loop = run_probe("loop", work, a)
        bulk = run_probe("bulk", work, a)
    same = loop.pop("captions") == bulk.pop("captions")
    row = {"images": a.images, "batch_size": a.batch_size, "workers": a.workers, **gen,
           "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "cpus": os.cpu_count(),
           "loop": loop, "bulk": bulk, "speedup": loop["seconds"] / bulk["seconds"], "same_captions": same}
    print(f"{a.images} images, batch {a.batch_size}, {a.num_beams} beam(s), {a.max_new_tokens} new tokens, "
          f"{a.workers} workers, OMP_NUM_THREADS={row['omp_num_threads']}, {row['cpus']} CPUs")
    for r in (loop, bulk):
        print(f"  {r['mode']:<5} {r['seconds']:8.1f} s  {r['images_per_s']:7.2f} images/s  "
              f"peak RSS {r['peak_rss_mb']:.0f} MB (main process; largest worker {r['worker_peak_rss_mb']:.0f} MB)")
    print(f"  speed-up {row['speedup']:.2f}x, same captions: {same}")
    if a.json:
        a.json.write_text(json.dumps(row, indent=2))
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
