"""The frozen-feature cache: it holds exactly the encoder's outputs, training on it gives the losses of training
on pixels (augmentation off), a cache made for another encoder is refused, a second run is a no-op."""

from __future__ import annotations

import copy
import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from blip2.processing import ImageError, ImageProcessor
from blip2.train.build import build_model
from blip2.train.config import RunConfigError, load_run_config, shipped_configs
from blip2.train.cache_features import cache_features
from blip2.train.feature_cache import FeatureCacheError, FeatureStore, open_feature_store
from blip2.train.runtime import place_for_training

CONFIGS = shipped_configs() / "tiny"
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1",
       "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent.parent / "src"), os.environ.get("PYTHONPATH", "")])}
FAST = ["plots=false", "tensorboard=false"]


def _cli(*args, check=True):
    r = subprocess.run([sys.executable, "-m", "blip2.cli", *map(str, args)], capture_output=True, text=True,
                       env=ENV, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def _losses(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def test_cache_holds_the_encoder_outputs(tmp_path):
    cfg = load_run_config(CONFIGS / "stage1.yaml", [f"output_dir={tmp_path}", "data.batch_size=5"])
    # tiny shards (3 images each) so that rows are looked up across several files
    out = cache_features(cfg, progress=False, shard_bytes=3 * 17 * 32 * 4)
    store = FeatureStore(out)
    images = sorted((tmp_path / "work" / "synthetic" / "images").glob("*.png"))
    assert len(store) == len(images) == 64  # 128 captions, 64 distinct images: each encoded once
    assert len(store.shards) == 22
    assert store.meta["image_size"] == 32 and store.meta["num_tokens"] == 17 and store.meta["width"] == 32

    # the reference: the same model built independently, pixels from the inference image processor
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tmp_path / "work-ref").eval()
    picks = [images[0], images[9], images[33], images[63]]
    pixels = ImageProcessor(image_size=32)(picks)  # (4, 3, 32, 32)
    with torch.no_grad():
        want = model.vision(pixels)  # (4, 17, 32): before ln_vision
    got = torch.stack([store.get(os.path.abspath(p)) for p in picks])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(got[0], got[1])  # distinct images, distinct rows


@pytest.mark.parametrize("name", ["stage2-opt", "stage1"])
def test_training_on_the_cache_gives_the_same_losses(tmp_path, name):
    config = CONFIGS / f"{name}.yaml"
    common = ["max_steps=4", "data.augment=false", *FAST]
    cached, plain = tmp_path / "cached", tmp_path / "plain"
    _cli("cache-features", config, f"output_dir={cached}")
    # the cached run must not read images: break half of them (read, they would be skipped and counted)
    for png in sorted((cached / "work" / "synthetic" / "images").glob("*.png"))[::2]:
        png.write_bytes(b"not a png")
    _cli("train", config, f"output_dir={cached}", f"data.feature_cache={cached / 'feature_cache'}", *common)
    _cli("train", config, f"output_dir={plain}", *common)
    a, b = _losses(cached), _losses(plain)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2, 3, 4]
    keys = [k for k in b[0] if k.endswith("loss")]
    assert len(keys) == (4 if name == "stage1" else 2)
    for ra, rb in zip(a, b):
        for k in keys:
            assert ra[k] == pytest.approx(rb[k], abs=1e-5), (ra["step"], k)
    assert json.loads((cached / "summary.json").read_text())["skipped_samples"] == 0


def _train_data(config, tmp_path, *overrides):
    from blip2.train.pipeline import TrainData

    cfg = load_run_config(config, [f"output_dir={tmp_path}", *overrides])
    torch.manual_seed(cfg.seed)  # as the loop does before building
    return TrainData(cfg, build_model(cfg, tmp_path / "work"), 0, 1)


def test_mismatched_cache_is_refused(tmp_path):
    config = CONFIGS / "stage2-opt.yaml"
    cache = tmp_path / "feature_cache"
    cache_features(load_run_config(config, [f"output_dir={tmp_path}"]), progress=False)
    use = [f"data.feature_cache={cache}", "data.augment=false"]
    assert _train_data(config, tmp_path, *use).collator.image_features is not None  # the matching model is fine
    # on a GPU the loop places the frozen encoder in bf16/fp16 (LayerNorms fp32) before the data is built: still
    # the same encoder; cast wholesale (LayerNorms too) it is another one
    cfg = load_run_config(config, [f"output_dir={tmp_path}"])
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tmp_path / "work")
    for dtype in (torch.bfloat16, torch.float16):
        placed = copy.deepcopy(model)
        place_for_training(placed, dtype)
        open_feature_store(cache, placed, 32)
    with pytest.raises(FeatureCacheError, match="another image encoder.*fingerprint"):
        open_feature_store(cache, copy.deepcopy(model).to(torch.bfloat16), 32)
    # other encoder weights: another seed draws another random encoder
    with pytest.raises(FeatureCacheError, match="another image encoder.*fingerprint"):
        _train_data(config, tmp_path, "seed=1", *use)
    # another encoder shape, another image size
    with pytest.raises(FeatureCacheError, match="vision.num_layers 2 != 1"):
        _train_data(config, tmp_path, "model.vision.num_layers=1", *use)
    with pytest.raises(FeatureCacheError, match="image_size 32 != 64"):
        _train_data(config, tmp_path, "data.image_size=64", *use)
    # a cache-features run for another encoder leaves the existing cache alone
    with pytest.raises(FeatureCacheError, match="another image encoder"):
        cache_features(load_run_config(config, [f"output_dir={tmp_path}", "seed=1"]), progress=False)
    # augmentation cannot be served from a cache of un-augmented images: one clear line from the CLI
    r = _cli("train", config, f"output_dir={tmp_path / 'aug'}", f"data.feature_cache={cache}", "data.augment=true",
             "max_steps=1", check=False)
    assert r.returncode == 2 and "data.feature_cache" in r.stderr and "data.augment" in r.stderr
    assert "Traceback" not in r.stderr
    assert issubclass(FeatureCacheError, RunConfigError)  # the CLI reports cache errors as config errors


def test_rerun_is_a_noop_and_missing_images_are_reported(tmp_path):
    cfg = load_run_config(CONFIGS / "stage2-opt.yaml", [f"output_dir={tmp_path}"])
    out = cache_features(cfg, progress=False)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert cache_features(cfg, progress=False) == out
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing rewritten
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name]  # no leftovers
    store = FeatureStore(out)
    with pytest.raises(FeatureCacheError, match="not in the feature cache"):
        store.get("/no/such/image.png")
    with pytest.raises(FeatureCacheError, match="not a feature cache"):
        FeatureStore(tmp_path)


def _break_member(tar: Path, name: str) -> None:
    """Replace one member of a tar by bytes that are no image."""
    with tarfile.open(tar) as t:
        members = [(m, t.extractfile(m).read()) for m in t.getmembers()]
    with tarfile.open(tar, "w") as t:
        for m, data in members:
            if m.name == name:
                data = b"broken"
                m.size = len(data)
            t.addfile(m, io.BytesIO(data))


def test_webdataset_shards_and_unreadable_images(tmp_path):
    pytest.importorskip("webdataset")
    from blip2.train.data import write_shards

    rng = np.random.default_rng(0)
    samples = [{"image": Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)), "text": f"a dog {i}"}
               for i in range(8)]
    tars = write_shards(samples, tmp_path / "shards", per_shard=4)
    _break_member(Path(tars[1]), "000000006.jpg")  # listed as bad, skipped in training as without a cache
    cfg = load_run_config(CONFIGS / "stage1.yaml", [f"output_dir={tmp_path / 'run'}",
                                                    f"data.train={tmp_path / 'shards'}/shard-{{000000..000001}}.tar"])
    store = FeatureStore(cache_features(cfg, progress=False))
    assert len(store) == 7 and list(store.bad) == ["000000006"]  # webdataset images are named by their key
    with pytest.raises(ImageError):
        store.get("000000006")

    with tarfile.open(tars[1]) as t:
        jpeg = t.extractfile("000000005.jpg").read()
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, tmp_path / "ref").eval()
    pixels = ImageProcessor(image_size=32)([Image.open(io.BytesIO(jpeg))])  # the stored JPEG, decoded by PIL
    with torch.no_grad():
        want = model.vision(pixels)[0]  # (17, 32)
    torch.testing.assert_close(store.get("000000005"), want, rtol=1e-5, atol=1e-6)
