"""One-shot check on a CUDA machine (< 8 minutes on one GPU): prints one table and writes it as JSON.

    PYTHONPATH=src python benchmarks/gpu_check.py [--json gpu_check.json] [--quick]

1. parity: `blip2.generation.generate` ids == transformers' `generate` in bf16 and fp16 (tiny and medium random
   OPT / T5 LMs from benchmarks/generation_bench.py, greedy, 5 beams);
2. speed: generate vs transformers in bf16 (opt-medium, batch 1 and 8, greedy and 5 beams; goal >= 1.5x, ids
   identical), best of 3, interleaved;
3. one stage-1 (ITC + ITM + ITG) and one stage-2 (LM loss) training step under bf16 autocast with the weights
   placed as training places them (blip2.train.runtime.place_for_training): finite losses close to fp32 and
   finite gradients;
4. the precision policy (blip2.precision) on the device: dtypes per module, the mixed model's image features
   close to fp32.
Without CUDA it says so and exits 0 (`--cpu` runs the tiny checks on the CPU, which is what the tests do).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generation_bench import build, inputs  # noqa: E402  (a sibling script: the same random LMs)

from blip2 import from_preset  # noqa: E402
from blip2.generation import GenerationConfig, generate  # noqa: E402
from blip2.precision import apply_precision, precision_plan  # noqa: E402
from blip2.stage1 import stage1_losses  # noqa: E402
from blip2.train.runtime import place_for_training  # noqa: E402


def _sync(device):
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def _hf_ids(lm, embeds, mask, kw):
    with torch.inference_mode():
        out = lm.generate(inputs_embeds=embeds, attention_mask=mask, do_sample=False, **kw)
    return out  # decoder-only with inputs_embeds only / encoder-decoder: new tokens (T5: after the start token)


def _ours(lm, embeds, mask, kw):
    return generate(lm, embeds, mask, GenerationConfig(**kw))


def _same(lm, ours, ref) -> bool:
    if lm.config.is_encoder_decoder:
        ref = ref[:, 1:]
    n = min(ours.shape[1], ref.shape[1])
    return ours.shape[1] == ref.shape[1] and bool((ours[:, :n] == ref[:, :n]).all())


def check_parity(device, dtypes, names, new: int = 10) -> list[dict]:
    rows = []
    for name in names:
        for dtype in dtypes:
            lm, dim = build(name)
            lm = lm.to(device, dtype)
            embeds, mask = (t.to(device) for t in inputs(dim))
            embeds = embeds.to(dtype)
            for beams in (1, 5):
                kw = {"max_new_tokens": new, "min_new_tokens": new, "num_beams": beams,
                      "eos_token_id": [], "pad_token_id": 1} if not lm.config.is_encoder_decoder else \
                     {"max_new_tokens": new, "min_new_tokens": new, "num_beams": beams}
                hf_kw = {k: v for k, v in kw.items() if k != "eos_token_id"}
                ok = _same(lm, _ours(lm, embeds, mask, kw), _hf_ids(lm, embeds, mask, hf_kw))
                rows.append({"check": "parity", "case": f"{name} {str(dtype)[6:]} beams={beams}", "ok": ok,
                             "value": "ids equal" if ok else "ids differ"})
    return rows


def _best(fn, device, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def check_speed(device, name: str = "opt-medium", repeats: int = 3) -> list[dict]:
    lm, dim = build(name)
    lm = lm.to(device, torch.bfloat16)
    rows = []
    for batch in (1, 8):
        embeds, mask = (t[:batch].to(device) for t in inputs(dim))
        embeds = embeds.to(torch.bfloat16)
        for beams in (1, 5):
            kw = {"max_new_tokens": 20, "min_new_tokens": 20, "num_beams": beams}
            ours, ref = _ours(lm, embeds, mask, kw), _hf_ids(lm, embeds, mask, kw)
            t_hf = _best(lambda: _hf_ids(lm, embeds, mask, kw), device, repeats)
            t_ours = _best(lambda: _ours(lm, embeds, mask, kw), device, repeats)
            ratio = t_hf / t_ours
            rows.append({"check": "speed", "case": f"{name} bf16 batch={batch} beams={beams}",
                         "ok": _same(lm, ours, ref) and ratio >= 1.5,
                         "value": f"{ratio:.2f}x (hf {t_hf * 1e3:.1f} ms, ours {t_ours * 1e3:.1f} ms)"})
    return rows


def _close(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    return bool(torch.isfinite(a).all()) and abs(a.item() - b.item()) <= tol * max(1.0, abs(b.item()))


def _grads_finite(model) -> bool:
    return all(bool(torch.isfinite(p.grad).all()) for p in model.parameters() if p.grad is not None)


def check_training(device, autocast_dtype=torch.bfloat16, tol: float = 0.1) -> list[dict]:
    rows, g = [], torch.Generator().manual_seed(0)
    dev_type = "cuda" if str(device).startswith("cuda") else "cpu"
    s1 = from_preset("tiny-stage1").to(device).train()
    size = s1.cfg.vision.image_size
    px = torch.randn(4, 3, size, size, generator=g).to(device)
    ids = torch.randint(5, s1.cfg.qformer.vocab_size, (4, 12), generator=g).to(device)
    ids[:, 0] = 0
    mask = torch.ones_like(ids)
    ref = stage1_losses(s1, px, ids, mask, generator=torch.Generator(device).manual_seed(0))
    place_for_training(s1, autocast_dtype)  # as the training loop does: frozen ViT in the autocast dtype
    with torch.autocast(dev_type, dtype=autocast_dtype):
        out = stage1_losses(s1, px, ids, mask, generator=torch.Generator(device).manual_seed(0))
    sum(out.values()).backward()
    for k in out:
        rows.append({"check": "stage-1 step", "case": f"{k} autocast {str(autocast_dtype)[6:]}",
                     "ok": _close(out[k].detach().float(), ref[k].detach(), tol) and _grads_finite(s1),
                     "value": f"{out[k].item():.4f} vs fp32 {ref[k].item():.4f}"})
    s2 = from_preset("tiny-opt").to(device).train()
    s2.set_trainable()  # the stage-2 trainables: Q-Former, queries, projection
    size = s2.cfg.vision.image_size
    px = torch.randn(4, 3, size, size, generator=g).to(device)
    ids = torch.randint(5, 100, (4, 10), generator=g).to(device)
    ref = s2(px, input_ids=ids, labels=ids).loss
    place_for_training(s2, autocast_dtype)  # frozen ViT (LayerNorms fp32) and LLM in the autocast dtype
    with torch.autocast(dev_type, dtype=autocast_dtype):
        loss = s2(px, input_ids=ids, labels=ids).loss
    loss.backward()
    rows.append({"check": "stage-2 step", "case": f"lm loss autocast {str(autocast_dtype)[6:]}",
                 "ok": _close(loss.detach().float(), ref.detach(), tol) and _grads_finite(s2),
                 "value": f"{loss.item():.4f} vs fp32 {ref.item():.4f}"})
    return rows


def check_precision(device, llm_dtype=torch.float16) -> list[dict]:
    model = from_preset("tiny-opt").to(device).eval()
    size = model.cfg.vision.image_size
    px = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(device)
    with torch.no_grad():
        ref = model.encode_image(px)
        apply_precision(model, llm_dtype)
        out = model.encode_image(px)
    plan = precision_plan(model, llm_dtype)
    dtypes_ok = all(p.dtype == plan[n] for n, p in model.named_parameters())
    err = (out - ref).abs().max().item()
    return [{"check": "precision", "case": f"policy, LLM {str(llm_dtype)[6:]}", "ok": dtypes_ok and err < 5e-2,
             "value": f"dtypes {'as planned' if dtypes_ok else 'WRONG'}, max abs diff to fp32 {err:.2e}"}]


def run_checks(device, quick: bool = False) -> list[dict]:
    cuda = str(device).startswith("cuda")
    dtypes = (torch.bfloat16, torch.float16) if cuda else (torch.float32,)
    names = ("opt-tiny", "t5-tiny") if quick else ("opt-tiny", "t5-tiny", "opt-medium", "t5-medium")
    rows = check_parity(device, dtypes, names)
    if cuda and not quick:
        rows += check_speed(device)
    rows += check_training(device)
    rows += check_precision(device, torch.float16 if cuda else torch.bfloat16)
    return rows


def table(rows: list[dict]) -> str:
    out = ["| check | case | ok | value |", "|---|---|---|---|"]
    out += [f"| {r['check']} | {r['case']} | {'yes' if r['ok'] else 'NO'} | {r['value']} |" for r in rows]
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", default="gpu_check.json")
    ap.add_argument("--quick", action="store_true", help="tiny models only, no speed runs")
    ap.add_argument("--cpu", action="store_true", help="run the tiny checks on the CPU (what the tests do)")
    a = ap.parse_args(argv)
    if not torch.cuda.is_available() and not a.cpu:
        print("gpu_check: no CUDA device here; nothing checked (run it on a GPU machine, or --cpu for the tiny "
              "checks)")
        return 0
    device = "cpu" if a.cpu else "cuda"
    t0 = time.perf_counter()
    rows = run_checks(device, quick=a.quick or a.cpu)
    print(table(rows))
    Path(a.json).write_text(json.dumps({"device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
                                        "seconds": round(time.perf_counter() - t0, 1), "rows": rows}, indent=2))
    return 0 if all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
