"""webdataset shards: the writer, the rank x worker split (real DataLoader workers), decoding through the
collator, bad samples."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

pytest.importorskip("webdataset")

from blip2.processing import ImageProcessor, Processor  # noqa: E402
from blip2.train.collate import Collator  # noqa: E402
from blip2.train.data import ShardDataset, write_shards  # noqa: E402

WORDS = ["cat", "dog", "bus", "kite", "boat", "horse", "pizza", "bird"]


def _samples(n):
    rng = np.random.default_rng(0)
    for i in range(n):
        img = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
        yield {"image": img, "text": f"A {WORDS[i % 8]} number {i}."}


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_shards(_samples(40), tmp_path_factory.mktemp("shards"), per_shard=5)


def test_writer_layout(shards):
    assert len(shards) == 8
    with tarfile.open(shards[1]) as tar:
        names = tar.getnames()
    assert set(names[:3]) == {"000000005.jpg", "000000005.txt", "000000005.json"}  # img2dataset layout
    assert len(names) == 15


def _keys(ds, workers):
    loader = DataLoader(ds, batch_size=None, num_workers=workers)
    return [s["key"] for s in loader]


@pytest.mark.parametrize("epoch", [0, 1])
def test_split_two_ranks_two_workers(shards, epoch):
    everything = []
    for rank in range(2):
        ds = ShardDataset(shards, seed=0, rank=rank, world=2, shuffle=True, shuffle_buffer=4)
        ds.set_epoch(epoch)
        keys = _keys(ds, workers=2)
        assert len(keys) == 20  # 4 shards of 5 per rank
        everything += keys
    assert len(everything) == len(set(everything)) == 40  # none twice, none lost
    assert set(everything) == {f"{i:09d}" for i in range(40)}


def test_epochs_reshuffle_shards(shards):
    ds = ShardDataset(shards, seed=0, rank=0, world=2)
    first = ds.shards()
    ds.set_epoch(1)
    assert first != ds.shards()  # another shard order (seeded from (seed, epoch)); 8 shards: 1/40320 equal
    assert ShardDataset(shards, seed=0, rank=0, world=2, shuffle=False).shards() == shards[0::2]


def test_brace_urls(shards):
    pattern = shards[0].replace("000000.tar", "{000000..000007}.tar")
    assert ShardDataset(pattern, rank=0, world=1).urls == shards


def test_collated_from_shards(shards):
    proc = Processor(ImageProcessor(image_size=16), _bert(shards), padding_side="right")
    ds = ShardDataset(shards, rank=0, world=1, shuffle=False)
    loader = DataLoader(ds, batch_size=8, num_workers=2, collate_fn=Collator("stage1", proc))
    batches = list(loader)
    assert sum(b["pixel_values"].shape[0] for b in batches) == 40
    assert all(int(b["skipped"]) == 0 for b in batches)
    first = next(iter(ShardDataset(shards, rank=0, world=1, shuffle=False)))
    assert first["text"] == "a cat number 0"  # cleaned caption
    img = Image.open(io.BytesIO(first["image"]))
    assert torch.equal(batches[0]["pixel_values"][0], proc.image_processor(img)[0])


def _bert(shards):
    from pathlib import Path

    from transformers import AutoTokenizer

    from blip2 import tiny

    return AutoTokenizer.from_pretrained(str(tiny.make_bert_tokenizer(Path(shards[0]).parent / "bert")))


def test_bad_shard_samples_are_skipped(tmp_path):
    good = next(_samples(1))
    rows = [dict(good, key="ok"), {"image": b"\xff\xd8 broken jpeg", "text": "a dog", "key": "broken"},
            dict(good, text="  ", key="empty")]
    urls = write_shards(rows, tmp_path, per_shard=10)
    (tmp_path / "junk.tar").write_bytes(b"this is not a tar file")  # unreadable shard: logged, skipped
    proc = Processor(ImageProcessor(image_size=16), _bert([str(tmp_path / "x")]), padding_side="right")
    ds = ShardDataset(urls + [str(tmp_path / "junk.tar")], rank=0, world=1)
    with pytest.warns(UserWarning, match="ReadError"):  # webdataset's warn_and_continue names the bad tar
        samples = list(ds)
    assert [s["key"] for s in samples] == ["ok", "broken", "empty"]
    batch = Collator("stage1", proc)(samples)
    assert int(batch["skipped"]) == 2 and batch["input_ids"].shape[0] == 1
