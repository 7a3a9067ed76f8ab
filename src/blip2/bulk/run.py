"""`blip2 caption / ask / instruct --input ...`: label a whole dataset, batched, resumable, on one or many processes.

The run, top to bottom (`label_dataset`):
1. list the input's items (blip2.bulk.sources) and check the settings against an unfinished run's (the ledger);
2. this process takes chunks c with c % world_size == rank that have no part file yet, cuts them into batches
   (for `ask` / `instruct` sorted by question length within a chunk, so a batch pads little);
3. DataLoader workers read, decode and pre-process each batch's images (an unreadable image becomes a failure
   record, never an exception); the main process runs the model on the pixels with `model.caption`,
   `model.answer` or `model.instruct`, so a bulk text equals what those give for the same image;
4. each finished chunk is written as one atomic part file (sidecar mode also writes each image's .txt);
5. when all parts exist (after a barrier under torchrun) process 0 merges them in input order.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .. import dist
from ..files import write_text_atomic
from ..processing import load_image
from ..prompts import VQA_TEMPLATE
from .ledger import Ledger, failed_file, keys_digest, merge, parts_folder
from ..sources import ImageReader, Item, open_source

TASKS = ("caption", "ask", "instruct")


@dataclass
class BulkJob:
    """What to label and how; see `blip2 caption --help` for each field's flag."""

    task: str  # caption | ask | instruct
    input: str | Path
    output: Path | None = None  # OUT.jsonl or OUT.parquet
    sidecar: bool = False  # write IMAGE.txt next to each image instead
    overwrite: bool = False  # replace an existing OUT / existing sidecar .txt files
    batch_size: int = 16
    workers: int = 2  # DataLoader workers decoding images (0: in the main process)
    chunk_size: int = 256  # items per part file: a killed run redoes at most one chunk per process
    prompt: str | None = None  # caption: the text the caption continues
    question: str | None = None  # ask / instruct: one question or instruction for every image
    question_column: str | None = None  # ask / instruct: the column / field holding each image's own
    template: str | None = None  # ask: the prompt template (default VQA_TEMPLATE)
    image_column: str | None = None
    key_column: str | None = None
    generation: dict = field(default_factory=dict)
    model_name: str = ""
    progress: bool = True

    def __post_init__(self):
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.output is not None:
            self.output = Path(self.output)
        if (self.output is None) == (not self.sidecar):
            raise ValueError("give either --output OUT.jsonl|OUT.parquet or --sidecar (one of them)")
        if self.output is not None and self.output.suffix not in (".jsonl", ".parquet"):
            raise ValueError(f"--output {self.output}: must end in .jsonl or .parquet")
        if self.task == "caption" and (self.question or self.question_column):
            raise ValueError("caption takes --prompt, not a question")
        if self.task != "caption" and (self.question is None) == (self.question_column is None):
            raise ValueError(f"{self.task}: give one question for all images or --question-column (one of them)")
        for name in ("batch_size", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.workers < 0:
            raise ValueError(f"--workers must be >= 0, got {self.workers}")

    def settings(self) -> dict:
        """What decides the texts: a restart must have the same (batch size and workers may change)."""
        return {"task": self.task, "model": self.model_name, "input": str(self.input), "prompt": self.prompt,
                "question": self.question, "question_column": self.question_column, "template": self.template,
                "image_column": self.image_column, "key_column": self.key_column, "generation": self.generation,
                "sidecar": self.sidecar, "overwrite": self.overwrite, "chunk_size": self.chunk_size}


def process_index(rank: int | None = None, world: int | None = None) -> tuple[int, int]:
    """(rank, world size): the process group's, else RANK / WORLD_SIZE from the environment, else (0, 1)."""
    if rank is not None and world is not None:
        return rank, world
    if dist.is_distributed():
        return dist.rank(), dist.world_size()
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


# ----------------------------------------------------------------------------------------- data loading


def sidecar_path(item: Item) -> Path:
    return item.path.with_suffix(".txt")


class BatchImages(Dataset):
    """Batch b -> {"rows": item indices read, "pixels": [n, 3, S, S], "failed": [(index, reason)],
    "skipped": [index]}; read in DataLoader workers."""

    def __init__(self, batches: list[list[int]], items: list[Item], image_processor, skip_sidecars: bool):
        self.batches, self.items, self.processor, self.skip_sidecars = batches, items, image_processor, skip_sidecars
        self.reader = ImageReader()

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, b: int) -> dict:
        rows, pixels, failed, skipped = [], [], [], []
        for i in self.batches[b]:
            item = self.items[i]
            if self.skip_sidecars and sidecar_path(item).exists():
                skipped.append(i)
                continue
            try:
                # the steps of model.caption(path): EXIF orientation, RGB, resize, normalise
                pixels.append(self.processor.preprocess_one(load_image(self.reader.read(item))))
                rows.append(i)
            except Exception as e:  # a corrupt / missing / odd image is reported, never fatal
                failed.append((i, " ".join(f"{type(e).__name__}: {e}".split())))
        return {"rows": rows, "pixels": torch.stack(pixels) if pixels else None, "failed": failed,
                "skipped": skipped}


def _as_is(batch):
    return batch


def plan_batches(ledger: Ledger, chunks: list[int], items: list[Item], batch_size: int) -> list[list[int]]:
    """Item indices per batch, chunk by chunk; questions sorted by length within a chunk (less padding)."""
    batches = []
    for c in chunks:
        rows = list(ledger.chunk_range(c))
        if items[rows[0]].text is not None:
            rows.sort(key=lambda i: (len(items[i].text), i))
        batches += [rows[k:k + batch_size] for k in range(0, len(rows), batch_size)]
    return batches


# ----------------------------------------------------------------------------------------------- the run


def _generate(model, job: BulkJob, pixels: torch.Tensor, questions: list[str | None]) -> list[str]:
    if job.task == "caption":
        return model.caption(pixels, prompt=job.prompt, **job.generation)
    if job.task == "ask":
        return model.answer(pixels, questions, template=job.template or VQA_TEMPLATE, **job.generation)
    return model.instruct(pixels, questions, **job.generation)


def _state_paths(job: BulkJob) -> tuple[Path, Path]:
    """(parts folder, failed list): next to OUT, or in a hidden folder beside the input for sidecar runs."""
    if job.output is not None:
        return parts_folder(job.output), failed_file(job.output)
    src = Path(job.input)
    state = src / ".blip2-sidecar" if src.is_dir() else src.with_name(src.name + ".blip2-sidecar")
    return state / "parts", state / "failed.jsonl"


def label_dataset(model, job: BulkJob, rank: int | None = None, world: int | None = None) -> dict:
    """Run `job` with `model` (this process's share); returns a summary (merged counts once complete)."""
    rank, world = process_index(rank, world)
    t0 = time.perf_counter()
    items = open_source(job.input, job.image_column, job.question_column, job.key_column)
    if not items:
        raise ValueError(f"--input {job.input}: no images found")
    if job.question is not None:
        items = [dataclasses.replace(it, text=job.question) for it in items]
    if job.sidecar and any(it.path is None for it in items):
        raise ValueError(f"--sidecar writes IMAGE.txt next to image files; {job.input} holds images inside "
                         "shards / tables: use --output OUT.jsonl|OUT.parquet")
    parts, failed = _state_paths(job)
    if job.output is not None and job.output.exists() and not parts.exists() and not job.overwrite:
        raise ValueError(f"{job.output} exists: pass --overwrite to replace it")
    ledger = Ledger(parts, len(items), job.chunk_size)
    meta = {**job.settings(), "n_items": len(items), "keys": keys_digest(items)}
    ledger.start(meta)

    chunks = ledger.pending(rank, world)
    batches = plan_batches(ledger, chunks, items, job.batch_size)
    data = BatchImages(batches, items, model.need_processor().image_processor,
                       skip_sidecars=job.sidecar and not job.overwrite)
    loader = DataLoader(data, batch_size=None, shuffle=False, num_workers=job.workers, collate_fn=_as_is,
                        prefetch_factor=4 if job.workers else None)
    todo = sum(len(ledger.chunk_range(c)) for c in chunks)
    counts = {"done": 0, "failed": 0, "skipped": 0}
    open_chunks: dict[int, list[dict]] = {}
    bar = tqdm(total=todo, unit="img", desc=f"{job.task} [rank {rank}/{world}]" if world > 1 else job.task,
               disable=not job.progress, dynamic_ncols=True)
    with torch.inference_mode():
        for batch in loader:
            records = [{"i": i, "key": items[i].key, "source": items[i].source, "error": err}
                       for i, err in batch["failed"]]
            records += [{"i": i, "key": items[i].key, "source": items[i].source, "skipped": True}
                        for i in batch["skipped"]]
            if batch["rows"]:
                texts = _generate(model, job, batch["pixels"], [items[i].text for i in batch["rows"]])
                for i, text in zip(batch["rows"], texts):
                    rec = {"i": i, "key": items[i].key, "source": items[i].source, "text": text}
                    if items[i].text is not None:
                        rec["question"] = items[i].text
                    if job.sidecar:
                        write_text_atomic(sidecar_path(items[i]), text + "\n")
                    records.append(rec)
            for k, n in (("done", len(batch["rows"])), ("failed", len(batch["failed"])),
                         ("skipped", len(batch["skipped"]))):
                counts[k] += n
            for rec in records:
                c = rec["i"] // job.chunk_size
                open_chunks.setdefault(c, []).append(rec)
                if len(open_chunks[c]) == len(ledger.chunk_range(c)):
                    ledger.write(c, open_chunks.pop(c))
            bar.update(len(records))
            bar.set_postfix(failed=counts["failed"], refresh=False)
    bar.close()
    seconds = time.perf_counter() - t0
    summary = {"rank": rank, "world_size": world, **counts, "seconds": round(seconds, 3),
               "images_per_s": round(counts["done"] / seconds, 3) if seconds > 0 else None}
    if dist.is_distributed():
        torch.distributed.barrier()  # every process's parts are written
    if (rank == 0 or not dist.is_distributed()) and ledger.complete():
        summary["merged"] = merge(ledger, job.output, {**meta, "seconds": summary["seconds"]}, failed)
        ledger.remove()
    if dist.is_distributed():
        merged = [summary.get("merged")]
        torch.distributed.broadcast_object_list(merged, src=0)  # the others report the merged counts too
        summary["merged"] = merged[0]
    summary["complete"] = summary.get("merged") is not None
    summary["output"] = str(job.output) if job.output is not None else "sidecar .txt files"
    summary["failed_list"] = str(failed)
    return summary


def format_summary(s: dict) -> str:
    """One line for the terminal."""
    head = (f"{s['done']} labelled, {s['failed']} failed, {s['skipped']} skipped in {s['seconds']:.1f} s "
            f"({s['images_per_s'] or 0:.2f} images/s)")
    if s["complete"]:
        m = s["merged"]
        return (f"{head}; complete: {m['done']} texts in {s['output']}, {m['failed']} failures listed in "
                f"{s['failed_list']}" + (f", {m['skipped']} kept existing sidecars" if m["skipped"] else ""))
    return f"{head}; waiting for other processes' parts (rerun the same command to finish)"


def summary_json(s: dict) -> str:
    return json.dumps(s, indent=2)
