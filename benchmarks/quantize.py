"""Quantised inference on CPU: decode latency int8 vs fp32, answer agreement on the quickstart, peak memory of
a streamed int8 load of a >= 1B-parameter checkpoint.

1. Decode latency (ms per new token, greedy; the difference of two generation lengths, so the prefill cancels)
   at batch 1 and 8 for a medium random LLaMA (220M parameters) and for the quickstart's trained InstructBLIP
   (SmolLM2-135M): fp32 and each of `--schemes` (default `int8`: per-token int8 with calibrated smoothing;
   `int8-dynamic`: PyTorch's dynamic int8; `int8-weight-only`: torchao). Timings are interleaved and the best
   of `--repeats` is kept (a shared machine).
2. The quickstart's held-out VQA questions (runs/quickstart/eval/vqa_test.json: test scenes, 60 per family),
   answered greedily by the fp32 model and each scheme's: agreement of the answers and the accuracy of each
   (the `blip2 eval` scorer).
3. Peak resident memory (VmHWM, each load in its own process) of `blip2.load` of a random 1.0B-parameter
   InstructBLIP-shaped checkpoint (LLaMA LLM, 1 GB shards, written to a temporary directory and deleted):
   fp32 vs `quantize="int8"` (streamed). (ru_maxrss would not do: a child inherits its parent's.)

    .venv/bin/python benchmarks/quantize.py [--quickstart runs/quickstart] [--parts medium quickstart memory]
                                            [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import blip2
from blip2.config import Blip2Config
from blip2.model import Blip2Model

MEDIUM = dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=12, num_attention_heads=16,
              num_key_value_heads=16, vocab_size=32000)
BILLION = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=18, num_attention_heads=16,
               num_key_value_heads=16, vocab_size=32000, tie_word_embeddings=False)  # 1.04B parameters


def config_with_llm(llm: dict) -> Blip2Config:
    d = Blip2Config.from_preset("tiny-llama-instruct").to_dict()
    d["llm"]["hf_config"].update(llm)
    return Blip2Config.from_dict(d)


def _save_random(llm: dict, directory: Path, shard: int = 2**30) -> int:
    torch.manual_seed(0)
    model = Blip2Model(config_with_llm(llm)).eval()
    model.save_pretrained(directory, max_shard_size=shard)
    return sum(p.numel() for p in model.unique_parameters())


def _decode_inputs(model, batch: int, images=None):
    size = model.cfg.vision.image_size
    if images is None:
        px = torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))
    else:
        px = model.pixel_values(images[:batch])
    ids = torch.randint(10, 100, (batch, 12), generator=torch.Generator().manual_seed(1))
    kw = {"pixel_values": px, "input_ids": ids}
    if model.cfg.architecture == "instructblip":
        kw["qformer_input_ids"] = torch.randint(10, 100, (batch, 8), generator=torch.Generator().manual_seed(2))
    return kw


def _generate_s(model, kw, n: int) -> float:
    t = time.perf_counter()
    with torch.inference_mode():
        model.generate(**kw, max_new_tokens=n, min_new_tokens=n, num_beams=1)
    return time.perf_counter() - t


def decode_ms(models: dict, batch: int, repeats: int, images=None, short: int = 2, long: int = 10) -> dict:
    """ms per decoded token for each model, interleaved, best of `repeats`."""
    inputs = {k: _decode_inputs(m, batch, images) for k, m in models.items()}
    best = {k: float("inf") for k in models}
    for k, m in models.items():  # warm-up
        _generate_s(m, inputs[k], short)
    for _ in range(repeats):
        for k, m in models.items():
            per = (_generate_s(m, inputs[k], long) - _generate_s(m, inputs[k], short)) / (long - short)
            best[k] = min(best[k], per * 1000)
    return {k: round(v, 2) for k, v in best.items()}


def latency_table(name: str, models: dict, repeats: int, images=None) -> dict:
    out = {}
    for batch in (1, 8):
        ms = decode_ms(models, batch, repeats, images)
        out[f"batch{batch}"] = {**ms, **{f"speedup_{k}": round(ms["fp32"] / ms[k], 2) for k in ms if k != "fp32"}}
        print(f"{name} batch {batch}: " + ", ".join(f"{k} {v} ms/token" for k, v in ms.items())
              + "; " + ", ".join(f"{k} x{out[f'batch{batch}'][f'speedup_{k}']}" for k in ms if k != "fp32"),
              flush=True)
    return out


def vqa_agreement(models: dict, quickstart: Path, work: Path) -> dict:
    """Greedy answers of each model ("fp32" and schemes) on the quickstart's held-out VQA questions, scored by
    `blip2 eval`'s code; agreement and accuracy change of each scheme against fp32."""
    from blip2.evaluation import evaluate
    from blip2.prompts import VQA_TEMPLATE

    world, data = quickstart / "world", quickstart / "eval" / "vqa_test.json"  # what the quickstart evaluated
    gen = {"num_beams": 1, "max_new_tokens": 6, "min_new_tokens": 1}  # the quickstart's VQA decoding
    res, answers = {}, {}
    for name, model in models.items():
        t = time.perf_counter()
        rep = evaluate("vqa", model, str(data), images=str(world), output=str(work / name), generation=gen,
                       template=VQA_TEMPLATE, progress=False)
        res[name] = {"accuracy": round(rep["metrics"]["accuracy"], 2), "seconds": round(time.perf_counter() - t, 1)}
        preds = json.loads((work / name / "predictions.json").read_text())
        answers[name] = {p["question_id"]: p["answer"] for p in preds}
    ref = answers["fp32"]
    out = {"questions": len(ref), "accuracy_fp32": res["fp32"]["accuracy"], "seconds": res}
    for name in answers:
        if name == "fp32":
            continue
        same = sum(ref[k] == answers[name].get(k) for k in ref)
        out[name] = {"agreement_pct": round(100 * same / len(ref), 1), "accuracy": res[name]["accuracy"],
                     "accuracy_change": round(res[name]["accuracy"] - res["fp32"]["accuracy"], 2)}
        print(f"quickstart VQA ({len(ref)} held-out questions): {name} agrees with fp32 on "
              f"{out[name]['agreement_pct']} %, accuracy fp32 {out['accuracy_fp32']} -> {name} "
              f"{out[name]['accuracy']}", flush=True)
    return out


_PEAK = ("import sys, time, torch, blip2\n"
         "def hwm():  # the high-water mark of this process's memory (VmHWM: since exec, unlike ru_maxrss)\n"
         "    line = next(l for l in open('/proc/self/status') if l.startswith('VmHWM'))\n"
         "    return int(line.split()[1]) / 2**20\n"
         "base, t = hwm(), time.perf_counter()\n"
         "m = blip2.load(sys.argv[1], quantize=None if sys.argv[2] == 'fp32' else sys.argv[2])\n"
         "print(base, hwm(), time.perf_counter() - t)\n")
_WRITE = ("import sys, json, torch\n"
          "from transformers.initialization import no_init_weights\n"
          "sys.path.insert(0, sys.argv[3])\n"
          "from quantize import config_with_llm\n"
          "from blip2.model import Blip2Model\n"
          "torch.manual_seed(0)\n"
          "with no_init_weights():\n"
          "    model = Blip2Model(config_with_llm(json.loads(sys.argv[2]))).eval()\n"
          "with torch.no_grad():\n"
          "    for p in model.parameters():\n"
          "        p.uniform_(-0.03, 0.03)  # (cheaper than the normal initialisation; values do not matter here)\n"
          "model.save_pretrained(sys.argv[1], max_shard_size=2**30)\n"
          "print(sum(p.numel() for p in model.unique_parameters()))\n")


def _run(code: str, *args) -> str:
    r = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-2000:])
    return r.stdout


def _child_peak(directory: Path, quantize: str) -> dict:
    """Peak memory of one load, in a fresh process."""
    base, peak, secs = _run(_PEAK, directory, quantize).split()[-3:]
    return {"peak_gib": round(float(peak), 2), "after_import_gib": round(float(base), 2),
            "seconds": round(float(secs), 1)}


def load_memory(work: Path) -> dict:
    d = work / "billion"
    t = time.perf_counter()
    n = int(_run(_WRITE, d, json.dumps(BILLION), Path(__file__).parent).split()[-1])  # (written by a child: this
    # process stays small)
    print(f"wrote a {n / 1e9:.2f}B-parameter checkpoint in {time.perf_counter() - t:.0f} s", flush=True)
    try:
        fp32, int8 = _child_peak(d, "fp32"), _child_peak(d, "int8")
    finally:
        shutil.rmtree(d, ignore_errors=True)
    out = {"parameters": n, "fp32": fp32, "int8_streamed": int8,
           "ratio": round(int8["peak_gib"] / fp32["peak_gib"], 3)}
    print(f"peak RSS of the load: fp32 {fp32['peak_gib']} GiB, int8 streamed {int8['peak_gib']} GiB "
          f"(ratio {out['ratio']}; {fp32['after_import_gib']} GiB after the imports)", flush=True)
    return out


PARTS = ("medium", "quickstart", "memory")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quickstart", type=Path, default=Path("runs/quickstart"))
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--schemes", nargs="+", default=["int8", "int8-dynamic"],
                    help="quantisation schemes compared with fp32 (the medium model adds int8-weight-only)")
    a = ap.parse_args()
    torch.manual_seed(0)
    result = {"threads": torch.get_num_threads(), "targets": {"decode_speedup_batch1": 1.8, "agreement_pct": 95,
                                                              "accuracy_points": 1, "peak_rss_ratio": 0.4}}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "medium" in a.parts:
            _save_random(MEDIUM, work / "medium")
            medium = {"fp32": blip2.load(work / "medium")}
            for scheme in dict.fromkeys([*a.schemes, "int8-weight-only"]):
                medium[scheme] = blip2.load(work / "medium", quantize=scheme)
            result["medium"] = latency_table("medium LLaMA (220M)", medium, a.repeats)
            del medium
        model_dir = a.quickstart / "instruct"
        if "quickstart" not in a.parts:
            pass
        elif (model_dir / "model" / "config.json").is_file():
            qs = {"fp32": blip2.load(model_dir), **{s: blip2.load(model_dir, quantize=s) for s in a.schemes}}
            images = sorted((a.quickstart / "world" / "images" / "test").glob("*.png"))[:8]
            result["quickstart"] = latency_table("quickstart InstructBLIP (SmolLM2-135M)", qs, a.repeats,
                                                 images=[str(p) for p in images])
            result["quickstart_vqa"] = vqa_agreement(qs, a.quickstart, work)
            del qs
        else:
            print(f"{model_dir}: no finished quickstart run; its figures are skipped", flush=True)
        if "memory" in a.parts:
            result["load_memory"] = load_memory(work)
    result["peak_rss_this_process_gib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
