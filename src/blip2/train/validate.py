"""Validation during training: retrieval recall for stage 1, captioning / VQA metrics for stage 2 and
instruction tuning (through blip2.evaluation, on `data.val`, at most `val_max_samples` entries)."""

from __future__ import annotations

from pathlib import Path

from ..evaluation import evaluate
from .config import RunConfig, RunConfigError
from .objectives import objective_for
from .synthetic import resolve_annotations


def validate(cfg: RunConfig, model) -> dict:
    d = cfg.data
    if d.val is None:
        raise RunConfigError("val_every is set but data.val is not: give a validation annotation file")
    size = d.image_size or model.cfg.vision.image_size
    path, root = resolve_annotations(d.val, d.val_image_root or d.image_root, Path(cfg.output_dir) / "work", size)
    task = d.val_task or objective_for(cfg.stage).val_task(d)
    kw = {"k": 16} if task == "retrieval" else {"generation": {"num_beams": 1}}
    if d.val_prompt and task in ("caption", "vqa"):  # a caption prompt, or a VQA template with "{}"
        kw["prompt" if task == "caption" else "template"] = d.val_prompt
    report = evaluate(task, model, path, images=root, limit=cfg.val_max_samples, progress=False,
                      batch_size=d.batch_size, **kw)
    if report is None:  # not process 0
        return {}
    metrics = report.get("metrics", {})
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
