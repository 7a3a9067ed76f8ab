"""The training data stream of a run: datasets (annotation lists, webdataset shards or an instruction mixture),
sampler, collator and DataLoader, with an exact resume position."""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import DataLoader

from ..processing import ImageProcessor
from .collate import Collator
from .config import RunConfig, RunConfigError
from .data import CaptionDataset, ResumableSampler, ShardDataset, TableDataset, VQADataset
from .feature_cache import open_feature_store
from .mixture import MixtureDataset, TaskDataset
from .objectives import objective_for
from .synthetic import resolve_annotations
from .transforms import EvalTransform, TrainTransform


def _is_shards(spec) -> bool:
    return isinstance(spec, str) and ".tar" in spec


def _is_table(spec) -> bool:
    """Parquet files (a file, a pattern or a folder of them) or a saved `datasets` folder."""
    if not isinstance(spec, str):
        return False
    path = Path(spec)
    return ".parquet" in spec or (path / "state.json").is_file() or (
        path.is_dir() and any(path.glob("*.parquet")))


def _annotation_dataset(task: str, spec, image_root):
    if task == "caption":
        return CaptionDataset(spec, image_root=image_root)
    if task in ("vqa", "qgen"):
        return VQADataset(spec, image_root=image_root)
    raise RunConfigError(f"data.task: unknown task {task!r} (caption | vqa)")


class TrainData:
    """`next_batch()` gives collated batches forever (epochs roll over); `state_dict()` is the resume point."""

    def __init__(self, cfg: RunConfig, model, rank: int, world: int):
        d, objective = cfg.data, objective_for(cfg.stage)
        work_dir = Path(cfg.output_dir) / "work"
        size = d.image_size or model.cfg.vision.image_size
        ip = ImageProcessor(image_size=size)
        transform = TrainTransform(ip) if d.augment else EvalTransform(ip)
        features = None
        if d.feature_cache:  # cached encoder outputs replace the pixels (blip2 cache-features)
            if d.augment:
                raise RunConfigError("data.feature_cache holds the encoder outputs of un-augmented images: "
                                     "set data.augment=false to use it, or unset data.feature_cache")
            features = open_feature_store(d.feature_cache, model, size)
        self.collator = Collator(objective.collator_kind, model.processor,
                                 encoder_decoder=objective.encoder_decoder(model), image_transform=transform,
                                 prompt=d.prompt if objective.takes_prompt else None,
                                 max_len=objective.max_text_len(d), seed=cfg.seed, image_features=features)
        self.batch_size, self.epoch, self.sampler, self.seed = d.batch_size, 0, None, cfg.seed
        if d.mixture:
            if not objective.instruction_data:
                raise RunConfigError(f"data.mixture is for stage: instruct (instruction data), not {cfg.stage}")
            tasks = []
            for entry in d.mixture:
                unknown = set(entry) - {"name", "path", "task", "weight", "image_root"}
                if unknown or "path" not in entry or "task" not in entry:
                    raise RunConfigError(f"data.mixture entry {entry}: needs path and task; allowed keys "
                                         f"name, path, task, weight, image_root (unknown: {sorted(unknown)})")
                path, root = resolve_annotations(entry["path"], entry.get("image_root", d.image_root), work_dir, size)
                raw = _annotation_dataset(entry["task"], path, root)
                tasks.append(TaskDataset(raw, entry["task"], name=entry.get("name"), seed=cfg.seed))
            weights = [e["weight"] for e in d.mixture] if all("weight" in e for e in d.mixture) else None
            names = [t.name for t in tasks]
            held = sorted(set(names) & set(d.held_out))
            if held:
                raise RunConfigError(f"data.mixture: {held} are listed in data.held_out")
            self.dataset = MixtureDataset(tasks, weights=weights, seed=cfg.seed, allow_held_out=True)
            self.sampler = self.dataset.sampler(rank, world)
        elif _is_shards(d.train):
            self.dataset = ShardDataset(d.train, seed=cfg.seed, rank=rank, world=world)
        elif _is_table(d.train):
            if objective.instruction_data or d.task != "caption":
                raise RunConfigError(f"data.train {d.train}: tables give image-caption pairs (data.task: caption, "
                                     "stages 0-2)")
            self.dataset = TableDataset(d.train, image_column=d.image_column, text_column=d.text_column)
            self.sampler = ResumableSampler(len(self.dataset), seed=cfg.seed, rank=rank, world=world)
        else:
            if d.train is None:
                raise RunConfigError("data.train: give an annotation file, shards, or a data.mixture")
            path, root = resolve_annotations(d.train, d.image_root, work_dir, size)
            raw = _annotation_dataset(objective.data_task(d), path, root)
            self.dataset = TaskDataset(raw, d.task, seed=cfg.seed) if objective.instruction_data else raw
            if len(self.dataset) < self.batch_size * world:
                raise RunConfigError(f"data.train has {len(self.dataset)} samples, fewer than one global batch "
                                     f"({self.batch_size} x {world} processes)")
            self.sampler = ResumableSampler(len(self.dataset), seed=cfg.seed, rank=rank, world=world)
        self.num_workers = d.num_workers
        self._iter = None

    def _loader(self):
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(self.epoch)
        if isinstance(self.sampler, ResumableSampler):
            self.sampler.set_epoch(self.epoch)
        return iter(DataLoader(self.dataset, batch_size=self.batch_size, sampler=self.sampler,
                               collate_fn=self.collator, num_workers=self.num_workers, drop_last=True,
                               # its own generator: creating an iterator must not draw from the global RNG
                               # (a resumed run creates one at a different point than an uninterrupted run)
                               generator=torch.Generator().manual_seed(self.seed * 7919 + self.epoch)))

    def next_batch(self) -> dict:
        skipped = 0
        while True:
            if self._iter is None:
                self._iter = self._loader()
            try:
                batch = next(self._iter)
            except StopIteration:  # end of an epoch
                self._iter = None
                self.epoch += 1
                continue
            if self.sampler is not None:
                self.sampler.advance(self.batch_size)
            skipped += int(batch.pop("skipped", 0))
            if "pixel_values" not in batch:  # every sample of the batch was bad
                continue
            batch["skipped"] = torch.tensor(skipped)
            return batch

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "sampler": self.sampler.state_dict() if self.sampler is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = state["epoch"]
        if self.sampler is not None and state.get("sampler") is not None:
            self.sampler.load_state_dict(state["sampler"])
        self._iter = None


def build_train_data(cfg: RunConfig, model, rank: int, world: int) -> TrainData:
    return TrainData(cfg, model, rank, world)
