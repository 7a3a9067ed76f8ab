"""Training throughput on CPU (fp32): samples/s of the training step for stage 1 and stage 2, with pixels vs with
the frozen-feature cache (`blip2 cache-features`), and peak memory.

Models (random weights, generated colour images through the real data path, augmentation off):
  stage 1  ViT 6x256 @ 128 px / patch 16 (65 tokens), Q-Former 2x64 with 8 queries, ITC + ITM + ITG
  stage 2  the same encoder and Q-Former + a tiny random OPT (4 layers x 128)
A step is what the training loop does: next batch (image decoding + transform, or cache reads; tokenisation),
forward, backward, clipping, AdamW. The pixel and the cache runs of a stage are built side by side in this
process and their timed steps alternate, so the ratio is measured under the same machine load.

Peak memory: each (stage, mode) is rerun for a few steps in a fresh subprocess that reports its RSS once the
model and data are built, and the resident-set peak of the steps alone (the kernel's peak mark is reset after
the build, which peaks higher than training at this scale; `ru_maxrss`, the lifetime peak, where that fails).

    PYTHONPATH=src .venv/bin/python benchmarks/training.py [--steps 10] [--batch-size 8] [--json out.json]
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

VISION = {"image_size": 128, "patch_size": 16, "hidden_size": 256, "num_layers": 6, "num_heads": 4,
          "mlp_hidden_size": 1024}
QFORMER = {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 256, "num_query_tokens": 8}
OPT = {"hidden_size": 128, "ffn_dim": 512, "num_hidden_layers": 4, "num_attention_heads": 4,
       "word_embed_proj_dim": 128}
PRESET = {"stage1": "tiny-stage1", "stage2": "tiny-opt"}


def run_config(stage: str, out: Path, batch_size: int, cache: Path | None):
    import yaml

    from blip2.train.config import load_run_config

    model = {"preset": PRESET[stage], "tiny_tokenizers": True, "vision": VISION, "qformer": QFORMER}
    if stage == "stage2":
        model["llm"] = OPT
    data = {"train": "synthetic:colors", "batch_size": batch_size, "max_text_len": 16, "augment": False,
            "feature_cache": str(cache) if cache else None}
    doc = {"stage": stage, "model": model, "data": data, "output_dir": str(out), "precision": "fp32",
           "optim": {"lr": 1e-4}}
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{stage}-{'cache' if cache else 'pixels'}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_run_config(path)


class Trainer:
    """One model + data stream + optimizer; `step()` is one training step as blip2.train.loop does it."""

    def __init__(self, cfg):
        from blip2.train.build import build_model
        from blip2.train.loop import Objective
        from blip2.train.optim import build_optimizer
        from blip2.train.pipeline import TrainData

        torch.manual_seed(cfg.seed)
        self.model = build_model(cfg, Path(cfg.output_dir) / "work").train()
        self.objective = Objective(self.model, cfg.stage)
        self.optimizer = build_optimizer(self.model, cfg)
        self.data = TrainData(cfg, self.model, 0, 1)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.n = 0
        # time spent inside the frozen encoder (what the cache saves, with the image decoding)
        self.encoder_s, self._t = 0.0, 0.0
        self.model.vision.register_forward_pre_hook(lambda *_: setattr(self, "_t", time.perf_counter()))
        self.model.vision.register_forward_hook(
            lambda *_: setattr(self, "encoder_s", self.encoder_s + time.perf_counter() - self._t))

    def step(self) -> dict:
        """{"data", "compute", "encoder"} seconds of one step, and its "samples"."""
        self.encoder_s = 0.0
        t0 = time.perf_counter()
        batch = self.data.next_batch()
        batch.pop("skipped")
        t1 = time.perf_counter()
        out = self.objective(batch, torch.Generator().manual_seed(self.n))
        out["loss"].backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.n += 1
        return {"data": t1 - t0, "compute": time.perf_counter() - t1, "encoder": self.encoder_s,
                "samples": int(batch["input_ids"].shape[0])}


def _median(xs: list[float]) -> float:
    xs = sorted(xs)
    return (xs[(len(xs) - 1) // 2] + xs[len(xs) // 2]) / 2


def bench_stage(stage: str, work: Path, steps: int, warmup: int, batch_size: int) -> dict:
    from blip2.train.cache_features import cache_features

    cache = work / "feature_cache"
    t0 = time.perf_counter()
    cache_features(run_config(stage, work, batch_size, cache), progress=False)
    cache_s = time.perf_counter() - t0  # includes building the model and generating the images
    trainers = {"pixels": Trainer(run_config(stage, work, batch_size, None)),
                "cache": Trainer(run_config(stage, work, batch_size, cache))}
    for _ in range(warmup):
        for t in trainers.values():
            t.step()
    log = {m: [] for m in trainers}
    for _ in range(steps):  # alternate the modes: neighbouring steps see the same load on this machine
        for mode, t in trainers.items():
            log[mode].append(t.step())
    res = {"stage": stage, "batch_size": batch_size, "steps": steps, "cache_build_s": round(cache_s, 2)}
    step_s = {m: [r["data"] + r["compute"] for r in rows] for m, rows in log.items()}
    for mode, rows in log.items():
        res[f"{mode}_step_ms"] = 1000 * _median(step_s[mode])
        res[f"{mode}_samples_per_s"] = batch_size / _median(step_s[mode])
        res[f"{mode}_data_ms"] = 1000 * _median([r["data"] for r in rows])
        res[f"{mode}_encoder_ms"] = 1000 * _median([r["encoder"] for r in rows])
    # the ratio of each pixel step to the cache step right after it, median over the pairs
    res["speedup"] = _median([p / c for p, c in zip(step_s["pixels"], step_s["cache"])])
    res["encoder_share_of_pixel_step"] = _median([r["encoder"] / s for r, s in zip(log["pixels"], step_s["pixels"])])
    res["decode_share_of_pixel_step"] = _median([r["data"] / s for r, s in zip(log["pixels"], step_s["pixels"])])
    return res


def peak_memory(stage: str, mode: str, work: Path, steps: int, batch_size: int, threads: int) -> dict:
    """Run `steps` steps of one mode in a fresh process: {"rss_built_mb", "build_peak_mb", "steps_peak_rss_mb"}."""
    cmd = [sys.executable, __file__, "--probe", stage, mode, "--work", str(work), "--steps", str(steps),
           "--batch-size", str(batch_size), "--threads", str(threads)]
    r = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TQDM_DISABLE": "1"})
    if r.returncode != 0:
        raise RuntimeError(f"memory probe {stage}/{mode} failed: {r.stderr[-2000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _reset_peak() -> bool:
    """Reset the kernel's peak-RSS mark (Linux: "5" > /proc/self/clear_refs), so that the peak read after the
    steps is theirs and not the model build's (building peaks higher: imports, tokenizer training)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_mb() -> float:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024  # kB
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # lifetime peak, KiB on Linux


def probe(stage: str, mode: str, work: Path, steps: int, batch_size: int) -> None:
    cache = work / "feature_cache" if mode == "cache" else None
    t = Trainer(run_config(stage, work, batch_size, cache))
    built = _rss_mb()
    build_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    reset = _reset_peak()
    for _ in range(steps):
        t.step()
    print(json.dumps({"rss_built_mb": round(built, 1), "build_peak_mb": round(build_peak, 1),
                      "steps_peak_rss_mb": round(_peak_mb(), 1), "peak_is_steps_only": reset}))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: stable figures on a shared machine, where OpenMP spin-waits)")
    ap.add_argument("--memory-steps", type=int, default=3, help="steps of each memory probe (0: skip them)")
    ap.add_argument("--stages", nargs="+", default=["stage1", "stage2"], choices=["stage1", "stage2"])
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--probe", nargs=2, metavar=("STAGE", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    torch.set_num_threads(a.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    if a.probe:
        probe(*a.probe, a.work, a.steps, a.batch_size)
        return 0

    rows = []
    with tempfile.TemporaryDirectory(prefix="blip2-train-bench-") as tmp:
        for stage in a.stages:
            work = Path(tmp) / stage
            row = bench_stage(stage, work, a.steps, a.warmup, a.batch_size)
            if a.memory_steps:
                for mode in ("pixels", "cache"):
                    m = peak_memory(stage, mode, work, a.memory_steps, a.batch_size, a.threads)
                    row.update({f"{mode}_{k}": v for k, v in m.items()})
            rows.append(row)

    print(f"CPU fp32, {a.threads} threads, batch {a.batch_size}, {a.steps} timed steps per mode "
          f"(torch {torch.__version__})")
    head = ("stage", "pixels samples/s", "cache samples/s", "speedup", "pixel step: encoder / data",
            "RSS MB built -> step peak: pixels / cache")
    print(" | ".join(head))
    for r in rows:
        mem = " / ".join(f"{r[m + '_rss_built_mb']:.0f} -> {r[m + '_steps_peak_rss_mb']:.0f}"
                         for m in ("pixels", "cache")) if "cache_steps_peak_rss_mb" in r else "-"
        print(" | ".join([r["stage"], f"{r['pixels_samples_per_s']:.1f}", f"{r['cache_samples_per_s']:.1f}",
                          f"{r['speedup']:.2f}x",
                          f"{r['encoder_share_of_pixel_step']:.0%} / {r['decode_share_of_pixel_step']:.0%}", mem]))
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
