"""Annotation datasets, transforms, caption cleaning, the resumable sampler, and bad-sample tolerance through
real DataLoader workers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from blip2 import tiny
from blip2.processing import ImageProcessor, Processor
from blip2.prompts import pre_caption, pre_question
from blip2.train.collate import Collator
from blip2.train.data import CaptionDataset, InstructionDataset, ResumableSampler, VQADataset, seeded_rng
from blip2.train.transforms import TrainTransform

IP = ImageProcessor(image_size=16)


def _jpg(path, seed=0, size=(20, 16)):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


# ------------------------------------------------------------------------------------------ annotations


def test_caption_dataset_json_list_captions(tmp_path):
    (tmp_path / "img").mkdir()
    ann = [{"image": "img/a.jpg", "caption": ["A cat.", "A cat  on a couch!"], "image_id": "coco_1"},
           {"image": "img/b.jpg", "caption": "Two DOGS; playing (outside)"},
           {"image": str(tmp_path / "abs.jpg"), "caption": "x", "image_id": "coco_1"}]
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    ds = CaptionDataset(tmp_path / "ann.json", image_root=tmp_path)
    assert len(ds) == 4
    assert [s["text"] for s in ds.samples] == ["a cat", "a cat on a couch", "two dogs playing outside", "x"]
    assert [s["image_id"] for s in ds.samples] == [0, 0, 1, 0]  # shared by captions of one image id
    assert ds[0]["image"] == str(tmp_path / "img/a.jpg")
    assert ds[3]["image"] == str(tmp_path / "abs.jpg")  # absolute paths are kept
    ds.set_epoch(4)
    assert ds[2]["epoch"] == 4 and ds[2]["key"] == "caption/2" and ds[2]["index"] == 2


def test_vqa_and_instruction_jsonl(tmp_path):
    rows = [{"image": "a.jpg", "question": "What is on the couch?", "answer": ["cat", "cat", "kitten"]},
            {"image": "b.jpg", "question": "Is it raining", "answer": "yes"}]
    (tmp_path / "vqa.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    ds = VQADataset(tmp_path / "vqa.jsonl", image_root=tmp_path)
    assert ds[0]["question"] == "what is on the couch?" and ds[0]["answers"] == ["cat", "cat", "kitten"]
    assert ds[1]["answers"] == ["yes"]
    (tmp_path / "ins.json").write_text(json.dumps([{"image": "a.jpg", "instruction": "Describe it.",
                                                    "answer": "A cat."}]))
    ins = InstructionDataset(tmp_path / "ins.json", image_root=tmp_path)
    assert ins[0]["instruction"] == "Describe it." and ins[0]["text"] == "A cat."


def test_bad_annotation_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        CaptionDataset(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text(json.dumps([{"caption": "no image"}]))
    with pytest.raises(ValueError, match="'image' field"):
        CaptionDataset(tmp_path / "bad.json")


def test_pre_caption_and_question():
    assert pre_caption("  A Cat: sitting; on the (red) couch!!  \n") == "a cat sitting on the red couch"
    assert pre_caption("it's a dog, isn't it?") == "it's a dog, isn't it?"  # , ' ? are kept
    assert pre_caption("one two three four", max_words=2) == "one two"
    assert pre_caption(" ... ") == ""
    assert pre_question("What's on the (red) couch?") == "what's on the red couch?"


# ----------------------------------------------------------------------------------------------- images


def test_train_transform_without_augmentation_equals_eval():
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8))
    t = TrainTransform(IP, scale=(1, 1), ratio=(40 / 30, 40 / 30), hflip=0.0)
    assert torch.equal(t(img, np.random.default_rng(0)), IP.preprocess_one(img))


def test_crop_scale_distribution():
    """Area fraction of the crops of a square image: in [0.5, 1], aspect in [3/4, 4/3], and mean equal to the
    integral of the scheme (area ~ U(0.5, 1), log aspect ~ U(±log 4/3), kept when the crop fits: for area
    fraction a that happens with probability min(1, -log(a) / log(4/3)))."""
    t = TrainTransform(IP)
    rng = np.random.default_rng(0)
    crops = np.array([t.sample_crop(1000, 1000, rng) for _ in range(4000)], dtype=np.float64)
    frac = crops[:, 2] * crops[:, 3] / 1e6
    aspect = crops[:, 2] / crops[:, 3]
    assert frac.min() >= 0.5 - 2e-3 and frac.max() <= 1.0
    assert aspect.min() >= 3 / 4 - 2e-3 and aspect.max() <= 4 / 3 + 2e-3
    assert (crops[:, 0] >= 0).all() and (crops[:, 0] + crops[:, 2] <= 1000).all()
    a = np.linspace(0.5, 1.0, 200001)
    accept = np.minimum(1.0, -np.log(a) / math.log(4 / 3))
    p_accept = np.trapezoid(accept, a) / 0.5
    mean_kept = np.trapezoid(a * accept, a) / np.trapezoid(accept, a)
    q = (1 - p_accept) ** 10  # all ten tries fail: the whole (square) image
    mean = (1 - q) * mean_kept + q * 1.0
    sd = np.sqrt(np.trapezoid(a * a * accept, a) / np.trapezoid(accept, a) - mean_kept ** 2)
    assert abs(frac.mean() - mean) < 4 * sd / np.sqrt(len(frac)), (frac.mean(), mean)
    # below 3/4 every aspect fits, so P(a < 3/4) = P(a < 3/4 and kept) / P(kept) = 0.25 / (0.5 * p_accept)
    p_low = 0.25 / (0.5 * p_accept)
    assert abs((frac < 0.75).mean() - p_low) < 4 * math.sqrt(p_low * (1 - p_low) / len(frac))
    assert frac.min() < 0.51 and frac.max() > 0.95  # the whole range is used


def test_horizontal_flip():
    left_red = np.zeros((16, 16, 3), dtype=np.uint8)
    left_red[:, :8, 0] = 255
    left_red[:, 8:, 2] = 255
    img = Image.fromarray(left_red)
    t = TrainTransform(IP, scale=(1, 1), ratio=(1, 1), hflip=0.5)
    plain = IP.preprocess_one(img)
    rng = np.random.default_rng(0)
    flipped = 0
    for _ in range(400):
        x = t(img, rng)
        if torch.equal(x, plain):
            continue
        assert torch.equal(x, plain.flip(-1))  # the only other outcome is the mirror image
        flipped += 1
    assert abs(flipped / 400 - 0.5) < 4 * 0.5 / math.sqrt(400)


# ---------------------------------------------------------------------------------------------- sampler


def _run(sampler, epochs, batch, stop_after=None, workers=0):
    """Indices consumed batch by batch through a real DataLoader; optionally stop mid-epoch."""
    seen = []
    ds = list(range(sampler.dataset_len))
    for e in epochs:
        sampler.set_epoch(e)
        loader = DataLoader(ds, batch_size=batch, sampler=sampler, num_workers=workers)
        for n, b in enumerate(loader):
            if stop_after is not None and (e, n) == stop_after:
                return seen
            seen += b.tolist()
            sampler.advance(len(b))
    return seen


def test_resumable_sampler_resume_equals_uninterrupted():
    full = _run(ResumableSampler(50, seed=5, rank=1, world=2), [0, 1, 2], batch=4)
    s = ResumableSampler(50, seed=5, rank=1, world=2)
    first = _run(s, [0, 1, 2], batch=4, stop_after=(1, 3), workers=2)  # workers prefetch ahead
    state = json.loads(json.dumps(s.state_dict()))  # survives a checkpoint file
    assert state["epoch"] == 1 and state["position"] == 12
    resumed = ResumableSampler(50, seed=5, rank=1, world=2)
    resumed.load_state_dict(state)
    rest = _run(resumed, [1, 2], batch=4)
    assert first + rest == full


def test_resumable_sampler_epochs_and_ranks():
    ranks = [ResumableSampler(10, seed=0, rank=r, world=3) for r in range(3)]
    for s in ranks:
        s.set_epoch(2)
    orders = [s.indices() for s in ranks]
    assert all(len(o) == 4 for o in orders)  # 10 -> padded to 12 by wrapping around
    assert set().union(*map(set, orders)) == set(range(10))  # together the ranks cover every sample
    ranks[0].set_epoch(3)
    assert ranks[0].indices() != orders[0]  # a new permutation each epoch
    plain = ResumableSampler(10, shuffle=False, rank=0, world=1)
    assert plain.indices() == list(range(10))
    with pytest.raises(ValueError, match="dataset_len"):
        ResumableSampler(11, seed=0, rank=0, world=3).load_state_dict(ranks[0].state_dict())


# ------------------------------------------------------------------------------------- map-style, workers


def test_same_index_same_tensors(tmp_path):
    _jpg(tmp_path / "a.jpg")
    (tmp_path / "ann.json").write_text(json.dumps([{"image": "a.jpg", "caption": ["a cat", "a dog"]}]))
    ds = CaptionDataset(tmp_path / "ann.json", image_root=tmp_path)
    proc = Processor(IP, _tok(tmp_path))
    col = Collator("stage2", proc, image_transform=TrainTransform(IP), seed=0)
    assert torch.equal(col([ds[0]])["pixel_values"], col([ds[0]])["pixel_values"])
    ds.set_epoch(1)
    assert not torch.equal(col([ds[0]])["pixel_values"], col([ds[1]])["pixel_values"])


def _tok(tmp_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny.make_gpt2_tokenizer(tmp_path / "tok")))


def test_corrupt_images_and_empty_captions_through_workers(tmp_path):
    """A truncated JPEG, a missing file and an empty caption in the annotation list: skipped and counted
    (summed over the batches of two worker processes), never fatal; every good sample is trained on."""
    good = [_jpg(tmp_path / f"g{i}.jpg", seed=i) for i in range(6)]
    data = good[0].read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 2])  # a valid header, half the pixels
    ann = [{"image": p.name, "caption": f"a cat number {i}"} for i, p in enumerate(good)]
    ann += [{"image": "trunc.jpg", "caption": "a truncated file"},
            {"image": "missing.jpg", "caption": "a missing file"},
            {"image": good[1].name, "caption": " ;; "}]  # empty once cleaned
    (tmp_path / "ann.json").write_text(json.dumps(ann))
    ds = CaptionDataset(tmp_path / "ann.json", image_root=tmp_path)
    proc = Processor(IP, _tok(tmp_path))
    loader = DataLoader(ds, batch_size=3, num_workers=2, sampler=ResumableSampler(len(ds), rank=0, world=1),
                        collate_fn=Collator("stage2", proc, image_transform=TrainTransform(IP)))
    skipped, trained = 0, 0
    for batch in loader:
        skipped += int(batch.pop("skipped"))
        trained += batch["pixel_values"].shape[0] if "pixel_values" in batch else 0
    assert (skipped, trained) == (3, 6)


def test_seeded_rng_is_stable():
    a = seeded_rng(3, 1, "caption/7").integers(1 << 30, size=4)
    assert (a == seeded_rng(3, 1, "caption/7").integers(1 << 30, size=4)).all()
    assert not (a == seeded_rng(3, 2, "caption/7").integers(1 << 30, size=4)).all()
