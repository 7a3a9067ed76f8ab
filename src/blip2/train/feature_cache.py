"""The frozen-feature cache (`blip2 cache-features`): the image encoder is frozen, so its outputs for the
training images never change. They are computed once and stored; training with `data.feature_cache` set and
`data.augment: false` reads them instead of decoding images and running the encoder (only the trainable
`ln_vision` runs on them, see `Blip2Model.encode_image`).

Layout of a cache directory:
    index.json                   {"format", "meta", "shards": [file names], "index": {image: [shard, row]},
                                  "bad": {image: reason}}
    features-00000.safetensors   one tensor "features" [rows, N, Dv] (encoder outputs, before ln_vision)
    ...
An image is named by its path (made absolute) for annotation lists and by its sample key for webdataset shards
(`image_key`). Images that cannot be read are listed under "bad": training skips (and counts) them exactly as
it does without the cache.

`meta` identifies what produced the features: the vision config, the image size, and a fingerprint of the
encoder weights per dtype (`vision_fingerprint`; the training loop may have cast the encoder to bf16/fp16
before the data is built, so the fingerprint of that cast is stored too). Training refuses a cache whose meta
differs from its own model (`FeatureStore.check`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset, IterableDataset
from tqdm.auto import tqdm

from ..files import atomic_dir
from ..precision import vision_plan
from ..processing import ImageError
from .config import RunConfigError
from .transforms import open_image

log = logging.getLogger(__name__)

FORMAT = "blip2-feature-cache/1"
INDEX = "index.json"
SHARD_BYTES = 1 << 30  # ~1 GiB of features per safetensors shard
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class FeatureCacheError(RunConfigError):
    """A feature cache that is missing, unreadable, made for another encoder, or lacks an image."""


# ------------------------------------------------------------------------------------------- identity


def image_key(sample: dict) -> str:
    """The cache's name for a raw sample's image: its absolute path, or (webdataset: image bytes) its key."""
    image = sample["image"]
    if isinstance(image, (str, Path)):
        return os.path.abspath(image)  # lexical only: no file-system call per sample
    if "key" not in sample:
        raise FeatureCacheError(f"a sample whose image is {type(image).__name__} has no key to look it up by")
    return str(sample["key"])


def vision_fingerprint(vision: torch.nn.Module, dtype: torch.dtype | None = None) -> str:
    """blake2b of the encoder's weights (names, shapes and bytes) as training places them in `dtype`
    (blip2.precision.vision_plan: LayerNorms fp32, the other parameters in `dtype`; default: as is)."""
    plan = vision_plan(vision, dtype) if dtype is not None else {}
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(vision.state_dict().items()):
        t = t.detach().to("cpu", plan.get(name, t.dtype)).contiguous()
        h.update(f"{name}:{t.dtype}:{list(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())  # raw bytes, no copy
    return h.hexdigest()


def _vision_dtype(vision: torch.nn.Module) -> str:
    dtype = next(vision.parameters()).dtype
    return str(dtype).removeprefix("torch.")


def expected_meta(model, image_size: int) -> dict:
    """What a cache for `model`'s encoder at `image_size` must carry (the fingerprint in the encoder's dtype)."""
    vision = json.loads(json.dumps(dataclasses.asdict(model.cfg.vision)))  # as index.json holds it (lists)
    return {"vision": vision, "image_size": int(image_size),
            "fingerprint": {_vision_dtype(model.vision): vision_fingerprint(model.vision)}}


def _differences(found: dict, want: dict) -> list[str]:
    diffs = []
    for k, v in sorted(want["vision"].items()):
        if found.get("vision", {}).get(k) != v:
            diffs.append(f"vision.{k} {found.get('vision', {}).get(k)!r} != {v!r}")
    if found.get("image_size") != want["image_size"]:
        diffs.append(f"image_size {found.get('image_size')} != {want['image_size']}")
    for dtype, fp in want["fingerprint"].items():
        have = found.get("fingerprint", {}).get(dtype)
        if have != fp:
            diffs.append(f"encoder weights ({dtype}) fingerprint {have} != {fp}"
                         if have else f"no fingerprint for an encoder in {dtype}")
    return diffs


# ---------------------------------------------------------------------------------------------- reading


class FeatureStore:
    """Read side: `get(key)` / `lookup(sample)` -> the encoder output [N, Dv] of one image.

    Shards are opened lazily with safetensors' `safe_open` (memory-mapped: a row is read from disk on demand);
    each DataLoader worker opens its own (open handles are not pickled)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        index = self.path / INDEX
        if not index.is_file():
            raise FeatureCacheError(f"data.feature_cache: {self.path} is not a feature cache (no {INDEX}); "
                                    f"write it with `blip2 cache-features CONFIG`")
        try:
            doc = json.loads(index.read_text())
        except (OSError, ValueError) as e:
            raise FeatureCacheError(f"data.feature_cache: cannot read {index}: {e}") from None
        if doc.get("format") != FORMAT:
            raise FeatureCacheError(f"data.feature_cache: {index} has format {doc.get('format')!r}, "
                                    f"expected {FORMAT!r}")
        self.meta: dict = doc["meta"]
        self.shards: list[str] = doc["shards"]
        self.index: dict[str, list[int]] = doc["index"]
        self.bad: dict[str, str] = doc.get("bad", {})
        self._open: dict[int, object] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index or key in self.bad

    def check(self, want: dict) -> None:
        """Refuse a cache made for another encoder / image size (want: `expected_meta(model, size)`)."""
        diffs = _differences(self.meta, want)
        if diffs:
            raise FeatureCacheError(f"data.feature_cache: {self.path} was made for another image encoder "
                                    f"({'; '.join(diffs[:4])}); rerun `blip2 cache-features` into a new "
                                    f"directory or unset data.feature_cache")

    def _shard(self, i: int):
        if i not in self._open:
            self._open[i] = safe_open(str(self.path / self.shards[i]), framework="pt")
        return self._open[i]

    def get(self, key: str) -> torch.Tensor:
        """[N, Dv] features of one image. ImageError for an image that was unreadable when the cache was made
        (the collator skips it), FeatureCacheError for one the cache has never seen."""
        where = self.index.get(key)
        if where is None:
            if key in self.bad:
                raise ImageError(self.bad[key])
            raise FeatureCacheError(f"image {key} is not in the feature cache {self.path} ({len(self.index)} "
                                    f"images); the data changed since: rerun `blip2 cache-features`")
        shard, row = where
        return self._shard(shard).get_slice("features")[row]  # (N, Dv)

    def lookup(self, sample: dict) -> torch.Tensor:
        return self.get(image_key(sample))

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_open": {}}

    def __repr__(self) -> str:
        return f"FeatureStore({str(self.path)!r}, images={len(self.index)}, shards={len(self.shards)})"


def open_feature_store(path: str | Path, model, image_size: int) -> FeatureStore:
    """The store at `path`, checked against `model`'s encoder (FeatureCacheError if it was made for another)."""
    store = FeatureStore(path)
    store.check(expected_meta(model, image_size))
    return store


# ---------------------------------------------------------------------------------------------- writing


def unique_images(dataset) -> Iterator[tuple[str, object]]:
    """(key, image source) once per distinct image of a training dataset: an annotation list, a TaskDataset or
    MixtureDataset over them (their raw `samples`), or a webdataset ShardDataset (streamed)."""
    seen: set[str] = set()
    if hasattr(dataset, "tasks"):  # MixtureDataset
        parts = [t.dataset for t in dataset.tasks]
    elif hasattr(dataset, "samples"):  # an annotation dataset
        parts = [dataset]
    elif hasattr(dataset, "dataset") and hasattr(dataset.dataset, "samples"):  # TaskDataset
        parts = [dataset.dataset]
    else:  # ShardDataset: one pass over every shard
        parts = [dataset]
    for part in parts:
        for s in (part.samples if hasattr(part, "samples") else iter(part)):
            key = image_key(s)
            if key not in seen:
                seen.add(key)
                yield key, s["image"]


class _Images(Dataset):
    """(key, pixels [3, S, S] or the reason it could not be read), decoded in DataLoader workers."""

    def __init__(self, items: list[tuple[str, object]], transform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        key, src = self.items[i]
        try:
            return key, self.transform(open_image(src), None)
        except ImageError as e:
            return key, str(e)


class _ShardImages(IterableDataset):
    """The same for webdataset shards: each worker reads its own shards (ShardDataset splits them)."""

    def __init__(self, shards, transform):
        self.shards, self.transform = shards, transform

    def __iter__(self):
        seen: set[str] = set()
        for s in self.shards:
            key = image_key(s)
            if key in seen:
                continue
            seen.add(key)
            try:
                yield key, self.transform(open_image(s["image"]), None)
            except ImageError as e:
                yield key, str(e)


def _collate(items):
    return items  # a list of (key, pixels | reason); stacked after splitting off the bad ones


class _ShardWriter:
    """Accumulates encoder outputs and writes `features-NNNNN.safetensors` of `rows` rows each."""

    def __init__(self, directory: Path, rows: int):
        self.dir, self.rows = directory, rows
        self.pending: list[torch.Tensor] = []
        self.n_pending = 0
        self.shards: list[str] = []
        self.index: dict[str, list[int]] = {}
        self.info: dict = {}  # num_tokens, width, dtype (set from the first batch)

    def add(self, keys: list[str], feats: torch.Tensor) -> None:
        for i, key in enumerate(keys):
            if key in self.index:  # the same image in two shards of a webdataset: keep the first
                continue
            self.index[key] = [len(self.shards), self.n_pending]
            self.pending.append(feats[i])
            self.n_pending += 1
            if self.n_pending == self.rows:
                self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        name = f"features-{len(self.shards):05d}.safetensors"
        save_file({"features": torch.stack(self.pending).contiguous()}, str(self.dir / name))  # (rows, N, Dv)
        self.shards.append(name)
        self.pending, self.n_pending = [], 0


def is_complete(path: Path, want: dict, keys: list[str]) -> bool:
    """True when `path` holds a cache for this encoder with every key; FeatureCacheError for a mismatch."""
    if not (path / INDEX).is_file():
        if path.exists() and any(path.iterdir()):
            raise FeatureCacheError(f"data.feature_cache: {path} exists and is not a feature cache; "
                                    f"choose another directory")
        return False
    store = FeatureStore(path)
    store.check(want)
    missing = [k for k in keys if k not in store]
    if missing:
        log.warning("feature cache %s lacks %d of %d images (e.g. %s): rebuilding it", path, len(missing),
                    len(keys), missing[0])
    return not missing


def training_images(dataset, transform) -> tuple[list[str], Dataset | IterableDataset]:
    """(the keys of every distinct training image, a dataset of (key, pixels or the reason it is unreadable)
    that decodes them with `transform` in DataLoader workers)."""
    if isinstance(dataset, IterableDataset):  # webdataset shards: listing the keys is a pass over the tars
        return [k for k, _ in unique_images(dataset)], _ShardImages(dataset, transform)
    items = list(unique_images(dataset))
    return [k for k, _ in items], _Images(items, transform)


def write_cache(vision: torch.nn.Module, images, keys: list[str], out: Path, want: dict, batch_size: int,
                num_workers: int = 0, shard_bytes: int = SHARD_BYTES, progress: bool = True) -> Path:
    """Encode `images` (from `training_images`) with `vision` (on its device and dtype) into a cache at `out`
    whose meta is `want`. Written to a temporary directory, then renamed into place."""
    with atomic_dir(out) as tmp:  # an older (incomplete) cache at out is replaced
        writer, bad = _encode_all(vision, images, len(keys), tmp, batch_size, num_workers, shard_bytes, progress)
        meta = {**want, **writer.info, "num_images": len(writer.index)}
        doc = {"format": FORMAT, "meta": meta, "shards": writer.shards, "index": writer.index, "bad": bad}
        (tmp / INDEX).write_text(json.dumps(doc))  # last: a directory with an index is complete
    return out


@torch.inference_mode()
def _encode_all(vision, images, total: int, tmp: Path, batch_size: int, num_workers: int, shard_bytes: int,
                progress: bool) -> tuple[_ShardWriter, dict]:
    """Encode every image into shards under tmp: (the writer, {key: reason} of the unreadable images)."""
    param = next(vision.parameters())
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=_collate)
    writer, bad = None, {}
    off = {} if progress else {"disable": True}  # (passing disable=False would override TQDM_DISABLE=1)
    bar = tqdm(total=total, desc="cache-features", unit="img", dynamic_ncols=True, **off)
    for items in loader:
        good = [(k, x) for k, x in items if torch.is_tensor(x)]
        bad.update({k: x for k, x in items if not torch.is_tensor(x)})
        if good:
            pixels = torch.stack([x for _, x in good]).to(param.device, param.dtype)  # (B, 3, S, S)
            # (B, N, Dv): the encoder alone, ln_vision is trainable; in the encoder's dtype (under the precision
            # policy the encoder returns its output upcast to fp32: the same values)
            feats = vision(pixels).to(param.dtype).cpu()
            if writer is None:
                rows = max(1, shard_bytes // (feats[0].numel() * feats.element_size()))
                writer = _ShardWriter(tmp, rows)
                writer.info = {"num_tokens": feats.shape[1], "width": feats.shape[2],
                               "dtype": str(feats.dtype).removeprefix("torch.")}
            writer.add([k for k, _ in good], feats)
        bar.update(len(items))
    bar.close()
    if writer is None:
        raise FeatureCacheError(f"no readable image in the training data of this config ({len(bad)} unreadable)")
    writer.flush()
    if bad:
        log.warning("%d unreadable images are listed as bad in the cache (training skips them)", len(bad))
    return writer, bad

