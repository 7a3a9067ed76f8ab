"""Training data sources: annotation lists (JSON / JSONL), webdataset tar shards, parquet / `datasets` tables,
and a resumable sampler.

Every source yields *raw samples*: plain dicts that the `Collator` (blip2.train.collate) turns into model
inputs. Decoding images in the collator keeps the datasets cheap (a mixture can draw millions of them) and
puts every failure (missing file, truncated JPEG, empty text) in one place, where it is skipped and counted.

Raw sample keys:
    image     str | Path | bytes | PIL.Image  (a path relative to image_root is made absolute here)
    text      str    the caption, or the target answer for instruction tuning
    image_id  int    samples sharing an image share it (stage-1 ITC soft targets); equal on every rank
    key       str    stable identity of the sample: with `epoch`, seeds its augmentation and T5 split
    epoch     int    set by `set_epoch` (map-style datasets and shard streams alike)
    + task fields: question / answers (VQA), instruction (instruction data)

Reproducibility: a sample's randomness comes only from `seeded_rng(seed, epoch, key)`, never from global RNG
state, so the same index gives the same tensors in any worker, process or resumed run. DataLoader workers
hold a copy of the dataset made when the iterator starts: call `dataset.set_epoch(e)` before iterating, and do
not use persistent_workers=True (the workers would keep the old epoch).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
from PIL import Image
from torch.utils.data import Dataset, IterableDataset, Sampler, get_worker_info

from .. import dist
from ..prompts import pre_caption, pre_question
from ..sources import ImageReader, open_source

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- seeding


def stable_hash(text: str) -> int:
    """A 63-bit hash of a string that is the same in every process (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def seeded_rng(seed: int, *parts: int | str) -> np.random.Generator:
    """A generator determined by (seed, *parts) alone; strings are hashed with stable_hash."""
    words = [int(seed)] + [stable_hash(p) if isinstance(p, str) else int(p) for p in parts]
    if any(w < 0 for w in words):
        raise ValueError(f"seed parts must be non-negative, got {words}")
    return np.random.default_rng(np.random.SeedSequence(words))


# ------------------------------------------------------------------------------------ annotation lists


def load_annotations(paths: str | Path | Sequence[str | Path]) -> list[dict]:
    """Records from one or more files: a JSON list (`.json`) or one JSON object per line (`.jsonl`)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    records: list[dict] = []
    for p in map(Path, paths):
        if not p.is_file():
            raise FileNotFoundError(f"annotation file not found: {p}")
        text = p.read_text()
        if p.suffix == ".jsonl":
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text)
            if not isinstance(rows, list):
                raise ValueError(f"{p}: expected a JSON list of records, got {type(rows).__name__}")
        for i, r in enumerate(rows):
            if not isinstance(r, dict) or "image" not in r:
                raise ValueError(f"{p}: record {i} is not an object with an 'image' field: {r!r:.100}")
        records += rows
    return records


class _AnnotationDataset(Dataset):
    """Shared machinery: image paths, image ids, epoch. Subclasses fill `self.samples` (list of dicts)."""

    name = "annotations"

    def __init__(self, image_root: str | Path | None):
        self.image_root = Path(image_root) if image_root is not None else None
        self.epoch = 0
        self.samples: list[dict] = []
        self._image_ids: dict[str, int] = {}

    def _image(self, record: dict) -> str:
        path = Path(record["image"])
        return str(self.image_root / path if self.image_root is not None and not path.is_absolute() else path)

    def _image_id(self, record: dict, image: str) -> int:
        """Dense ids in order of first appearance, keyed by the record's `image_id` (else the image path):
        every rank reads the same files in the same order, so the ids agree across ranks."""
        ident = str(record.get("image_id", image))
        return self._image_ids.setdefault(ident, len(self._image_ids))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict:
        return {**self.samples[index], "key": f"{self.name}/{index}", "epoch": self.epoch, "index": index}


class CaptionDataset(_AnnotationDataset):
    """Image-caption pairs from `{"image": path, "caption": str | [str], "image_id"?: ...}` records (the LAVIS /
    COCO-Karpathy layout). A list of captions gives one sample per caption; they share an image_id. Captions are
    cleaned with `pre_caption` (clean=False keeps them as written); empty ones stay in and are skipped (and
    counted) by the collator."""

    name = "caption"

    def __init__(self, ann_paths, image_root: str | Path | None = None, clean: bool = True, max_words: int = 50):
        super().__init__(image_root)
        for r in load_annotations(ann_paths):
            if "caption" not in r:
                raise ValueError(f"caption record without a 'caption' field: {r!r:.100}")
            image = self._image(r)
            image_id = self._image_id(r, image)
            caps = r["caption"] if isinstance(r["caption"], list) else [r["caption"]]
            for c in caps:
                text = pre_caption(str(c), max_words) if clean else str(c).strip()
                self.samples.append({"image": image, "text": text, "image_id": image_id})


class TableDataset(Dataset):
    """Image-caption pairs from parquet files or a saved Hugging Face `datasets` folder (blip2.sources, the readers
    of `blip2 caption --input`): `image_column` holds bytes, paths or the datasets Image struct, `text_column` the
    caption. Image bytes are read here and decoded by the collator, which skips and counts bad ones. Each row
    is its own image (image_id = row)."""

    name = "table"

    def __init__(self, spec, image_column: str | None = None, text_column: str = "caption", clean: bool = True,
                 max_words: int = 50):
        self.items = open_source(spec, image_column, text_column)
        self.reader = ImageReader()
        self.clean, self.max_words, self.epoch = clean, max_words, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        try:
            image = self.reader.raw(item)
        except (OSError, ValueError):  # a row without an image: b"" fails to decode, the collator counts it
            image = b""
        text = pre_caption(item.text, self.max_words) if self.clean else item.text.strip()
        return {"image": image, "text": text, "image_id": index, "key": f"{self.name}/{item.key}",
                "epoch": self.epoch, "index": index}


class VQADataset(_AnnotationDataset):
    """`{"image", "question", "answer": str | [str]}` records -> samples with `question` and `answers` (the list
    keeps repeats: annotator agreement is the answer's weight). Questions are cleaned with `pre_question`."""

    name = "vqa"

    def __init__(self, ann_paths, image_root: str | Path | None = None, clean: bool = True, max_words: int = 50):
        super().__init__(image_root)
        for r in load_annotations(ann_paths):
            if "question" not in r or "answer" not in r:
                raise ValueError(f"VQA record needs 'question' and 'answer' fields: {r!r:.100}")
            image = self._image(r)
            answers = r["answer"] if isinstance(r["answer"], list) else [r["answer"]]
            question = pre_question(r["question"], max_words) if clean else r["question"].strip()
            self.samples.append({"image": image, "question": question, "answers": [str(a) for a in answers],
                                 "image_id": self._image_id(r, image)})


class InstructionDataset(_AnnotationDataset):
    """Free-form instruction data: `{"image", "instruction", "answer"}` records (used as written)."""

    name = "instruction"

    def __init__(self, ann_paths, image_root: str | Path | None = None):
        super().__init__(image_root)
        for r in load_annotations(ann_paths):
            if "instruction" not in r or "answer" not in r:
                raise ValueError(f"instruction record needs 'instruction' and 'answer' fields: {r!r:.100}")
            image = self._image(r)
            self.samples.append({"image": image, "instruction": str(r["instruction"]),
                                 "text": str(r["answer"]).strip(), "image_id": self._image_id(r, image)})


# ------------------------------------------------------------------------------------------- sampler


class ResumableSampler(Sampler[int]):
    """Seeded epoch permutation split across ranks, resumable mid-epoch.

    Epoch e's order is a permutation drawn from (seed, e) (or 0..N-1 with shuffle=False), padded by wrapping
    around to a multiple of `world` (drop_last=True cuts instead), and rank r takes every world-th index from r.

    Progress is counted by the training loop, not by iteration: a DataLoader pulls indices ahead of use (worker
    prefetch), so after each step call `advance(batch_size)`; `state_dict()` is then {"epoch", "position"}
    and a sampler given it by `load_state_dict` yields exactly the indices the interrupted run had not used.
    `set_epoch(e)` starts epoch e at position 0, unless e is the epoch just loaded (resume).
    """

    def __init__(self, dataset_len: int, seed: int = 0, rank: int | None = None, world: int | None = None,
                 shuffle: bool = True, drop_last: bool = False):
        self.rank = dist.rank() if rank is None else int(rank)
        self.world = dist.world_size() if world is None else int(world)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, world={self.world}), got {self.rank}")
        if dataset_len <= 0 or (drop_last and dataset_len < self.world):
            raise ValueError(f"dataset of {dataset_len} samples is too small for {self.world} ranks")
        self.dataset_len, self.seed, self.shuffle, self.drop_last = int(dataset_len), int(seed), shuffle, drop_last
        self.epoch, self.position = 0, 0
        per_rank = dataset_len / self.world
        self.per_rank = math.floor(per_rank) if drop_last else math.ceil(per_rank)

    def set_epoch(self, epoch: int) -> None:
        if int(epoch) != self.epoch:
            self.epoch, self.position = int(epoch), 0

    def advance(self, n: int) -> None:
        """Record that the loop consumed n more samples on this rank."""
        self.position = min(self.position + int(n), self.per_rank)

    def indices(self) -> list[int]:
        """This rank's whole order for the current epoch."""
        if self.shuffle:
            order = seeded_rng(self.seed, self.epoch).permutation(self.dataset_len)
        else:
            order = np.arange(self.dataset_len)
        total = self.per_rank * self.world
        order = np.resize(order, total)  # wraps around to pad (or cuts with drop_last)
        return order[self.rank::self.world].tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices()[self.position:])

    def __len__(self) -> int:
        return self.per_rank - self.position

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed,
                "dataset_len": self.dataset_len, "world": self.world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k in ("seed", "dataset_len", "world"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"sampler state was saved with {k}={state[k]} but this sampler has "
                                 f"{k}={getattr(self, k)}: the resumed order would differ")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ------------------------------------------------------------------------------------------ webdataset

_IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")


def write_shards(samples: Iterable[dict], out_dir: str | Path, per_shard: int, prefix: str = "shard") -> list[str]:
    """Write img2dataset-layout tar shards `{prefix}-000000.tar`, ...: per sample KEY.jpg, KEY.txt, KEY.json.

    samples: dicts with "image" (PIL image, saved as JPEG quality 95, or encoded JPEG bytes), "text" (str),
    optional "key" (default: 9-digit running number, as img2dataset) and "json" (dict; default {"key", "caption"}).
    Returns the shard paths in order.
    """
    import webdataset as wds  # deferred: webdataset is the optional `train` extra

    if per_shard <= 0:
        raise ValueError(f"per_shard must be positive, got {per_shard}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: list[str] = []
    writer = None
    for n, s in enumerate(samples):
        if n % per_shard == 0:
            if writer is not None:
                writer.close()
            paths.append(str(out / f"{prefix}-{len(paths):06d}.tar"))
            writer = wds.TarWriter(paths[-1], encoder=False)
        key = str(s.get("key", f"{n:09d}"))
        image = s["image"]
        if isinstance(image, Image.Image):
            buf = io.BytesIO()
            image.convert("RGB").save(buf, format="JPEG", quality=95)
            image = buf.getvalue()
        meta = s.get("json", {"key": key, "caption": s["text"]})
        writer.write({"__key__": key, "jpg": bytes(image), "txt": s["text"].encode(),
                      "json": json.dumps(meta).encode()})
    if writer is not None:
        writer.close()
    return paths


class ShardDataset(IterableDataset):
    """Streams img2dataset-layout webdataset shards (KEY.jpg/png/webp + KEY.txt [+ KEY.json]) as raw samples.

    Shards are split between ranks, then between this rank's DataLoader workers: each (rank, worker) reads a
    disjoint set of whole shards, so no sample is read twice in an epoch and none is lost. For equal work per
    rank (DDP steps in lockstep) write a number of shards divisible by world x workers, of equal size.
    shuffle=True permutes the shard list from (seed, epoch) before the split, and shuffle_buffer > 0 shuffles
    samples within a worker through a buffer of that size, also seeded from (seed, epoch, rank, worker).
    A tar that cannot be read is logged and skipped. Captions are cleaned with pre_caption (clean=True).
    """

    def __init__(self, urls: str | Sequence[str], seed: int = 0, rank: int | None = None, world: int | None = None,
                 shuffle: bool = True, shuffle_buffer: int = 0, clean: bool = True, max_words: int = 50):
        import braceexpand  # deferred: comes with webdataset, the optional `train` extra

        if isinstance(urls, str):
            urls = list(braceexpand.braceexpand(urls))  # "data/shard-{000000..000009}.tar"
        self.urls = [str(u) for u in urls]
        if not self.urls:
            raise ValueError("no shards given")
        self.rank = dist.rank() if rank is None else int(rank)
        self.world = dist.world_size() if world is None else int(world)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, world={self.world}), got {self.rank}")
        if len(self.urls) < self.world:
            raise ValueError(f"{len(self.urls)} shards cannot be split between {self.world} ranks")
        self.seed, self.shuffle, self.shuffle_buffer = int(seed), shuffle, int(shuffle_buffer)
        self.clean, self.max_words = clean, max_words
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def shards(self, worker: int = 0, num_workers: int = 1) -> list[str]:
        """The shards that (this rank, worker) reads this epoch."""
        order = list(self.urls)
        if self.shuffle:
            order = [order[i] for i in seeded_rng(self.seed, self.epoch).permutation(len(order))]
        mine = order[self.rank::self.world][worker::num_workers]
        if not mine:
            log.warning("rank %d worker %d has no shard to read (%d shards for %d ranks x %d workers)",
                        self.rank, worker, len(self.urls), self.world, num_workers)
        return mine

    def _to_sample(self, raw: dict) -> dict:
        key = raw["__key__"]
        image = next((raw[e] for e in _IMAGE_EXTS if e in raw), None)
        text = raw.get("txt", b"").decode("utf-8", errors="replace")
        meta = json.loads(raw["json"]) if "json" in raw else {}
        return {
            "image": image if image is not None else b"",  # no image field: fails (and is counted) in collate
            "text": pre_caption(text, self.max_words) if self.clean else text.strip(),
            "image_id": stable_hash(key),  # webdataset keys are unique per image
            "key": key, "epoch": self.epoch, "json": meta,
        }

    def __iter__(self) -> Iterator[dict]:
        import webdataset as wds  # deferred: the optional `train` extra

        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        urls = [{"url": u} for u in self.shards(worker, num_workers)]
        # tarfile_to_samples groups tar members by key; warn_and_continue skips unreadable tars
        stream = map(self._to_sample, wds.tarfile_to_samples(handler=wds.warn_and_continue)(iter(urls)))
        if self.shuffle_buffer > 0:
            stream = _buffer_shuffle(stream, self.shuffle_buffer,
                                     seeded_rng(self.seed, self.epoch, self.rank, worker, 1))
        return stream


def _buffer_shuffle(stream: Iterator[Any], size: int, rng: np.random.Generator) -> Iterator[Any]:
    """Yield items in random order through a buffer of `size` items (streaming shuffle)."""
    buf: list[Any] = []
    for item in stream:
        buf.append(item)
        if len(buf) >= size:
            i = int(rng.integers(len(buf)))
            buf[i], buf[-1] = buf[-1], buf[i]
            yield buf.pop()
    while buf:
        i = int(rng.integers(len(buf)))
        buf[i], buf[-1] = buf[-1], buf[i]
        yield buf.pop()

