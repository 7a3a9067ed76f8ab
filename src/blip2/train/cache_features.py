"""`blip2 cache-features`: build a run's model and training data exactly as `blip2 train` does, then run the
frozen image encoder once over every distinct training image into a feature cache (`feature_cache.py` owns the
format, the reading side and the writer)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from .build import build_model
from .config import RunConfig
from .feature_cache import (DTYPES, SHARD_BYTES, expected_meta, is_complete, training_images, vision_fingerprint,
                            write_cache)
from .pipeline import TrainData
from .runtime import amp_settings, place_for_training, seed_everything


def cache_features(cfg: RunConfig, progress: bool = True, shard_bytes: int = SHARD_BYTES) -> Path:
    """Run the frozen encoder once over every distinct training image of `cfg` (eval transform, no
    augmentation) and write its outputs to `cfg.data.feature_cache` (default OUTPUT/feature_cache).

    The model is built as `blip2 train` builds it (same seed, so random presets get the same weights). Runs on
    cfg.device (default: CUDA when available), with the encoder in the precision training would use there
    (fp32 on CPU). Written to a temporary directory, then renamed into place. A complete cache for the same
    encoder is left alone (returns at once); one made for another encoder is refused."""
    out = Path(cfg.data.feature_cache or Path(cfg.output_dir) / "feature_cache")
    plain = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, augment=False, feature_cache=None))
    seed_everything(cfg.seed)  # as train() does before building: random presets draw the same weights
    model = build_model(plain, Path(cfg.output_dir) / "work").eval()
    size = cfg.data.image_size or model.cfg.vision.image_size
    data = TrainData(plain, model, rank=0, world=1)
    want = expected_meta(model, size)
    want["fingerprint"] = {name: vision_fingerprint(model.vision, dt) for name, dt in DTYPES.items()}
    keys, images = training_images(data.dataset, data.collator.image_transform)
    if is_complete(out, want, keys):
        print(f"feature cache {out} is complete ({len(keys)} images): nothing to do")
        return out

    device = torch.device(cfg.device) if cfg.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    place_for_training(model, amp_settings(cfg, device)[0])  # the ViT's dtypes exactly as training gives them
    vision = model.vision.to(device=device)
    return write_cache(vision, images, keys, out, want, cfg.data.batch_size, cfg.data.num_workers, shard_bytes,
                       progress)
