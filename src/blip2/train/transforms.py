"""Image augmentation for training (PIL + numpy + torch; no torchvision).

Every random transform takes an explicit `np.random.Generator`: the data code seeds it from
(seed, epoch, sample key), so a sample is augmented the same way whichever worker or process loads it and
however often training is resumed (see `blip2.train.data.seeded_rng`).

- `TrainTransform`: random resized crop (area scale 0.5-1, aspect ratio 3/4-4/3, bicubic) + horizontal flip,
  then the CLIP normalisation of `blip2.processing.ImageProcessor` (BLIP-2 paper §3.4).
- `EvalTransform`: the ImageProcessor itself (square bicubic resize + normalisation; LAVIS BlipImageEvalProcessor).
"""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from ..processing import ImageError, ImageProcessor, load_image

ImageSource = str | Path | bytes | Image.Image

# ---------------------------------------------------------------------------------------------- images


def open_image(src: ImageSource) -> Image.Image:
    """An RGB PIL image from a path, encoded bytes (a webdataset `jpg` field) or a PIL image.

    Raises ImageError (naming the source) for a missing, truncated or undecodable image.
    """
    if isinstance(src, (bytes, bytearray, memoryview)):
        try:
            with Image.open(io.BytesIO(src)) as img:
                return ImageOps.exif_transpose(img).convert("RGB")  # decodes now: truncation fails here
        except Exception as e:  # PIL raises OSError, UnidentifiedImageError, SyntaxError, ...
            reason = " ".join(f"{type(e).__name__}: {e}".split())
            raise ImageError(f"cannot decode image bytes ({len(src)} bytes): {reason}") from None
    return load_image(src)


class EvalTransform:
    """Deterministic eval pixels: `ImageProcessor.preprocess_one` (the rng argument is ignored)."""

    def __init__(self, image_processor: ImageProcessor | None = None):
        self.proc = image_processor or ImageProcessor()

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        return self.proc.preprocess_one(img)  # (3, S, S)

    def __repr__(self) -> str:
        return f"EvalTransform({self.proc!r})"


class TrainTransform:
    """Random resized crop + horizontal flip + CLIP normalisation -> float32 [3, S, S].

    The crop follows the usual recipe: up to 10 tries of (area fraction ~ U(scale), log aspect ~ U(log ratio))
    that must fit in the image, else a central crop with the aspect clamped into `ratio`. The crop and the
    resize are one PIL call (`resize(box=...)`), bicubic by default like BLIP-2.
    """

    def __init__(self, image_processor: ImageProcessor | None = None, scale: tuple[float, float] = (0.5, 1.0),
                 ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5):
        if not 0 < scale[0] <= scale[1] <= 1:
            raise ValueError(f"scale must satisfy 0 < min <= max <= 1, got {scale}")
        if not 0 < ratio[0] <= ratio[1]:
            raise ValueError(f"ratio must satisfy 0 < min <= max, got {ratio}")
        if not 0 <= hflip <= 1:
            raise ValueError(f"hflip is a probability, got {hflip}")
        self.proc = image_processor or ImageProcessor()
        self.scale, self.ratio, self.hflip = tuple(scale), tuple(ratio), float(hflip)

    def __repr__(self) -> str:
        return (f"TrainTransform(image_size={self.proc.image_size}, scale={self.scale}, ratio={self.ratio}, "
                f"hflip={self.hflip})")

    def sample_crop(self, width: int, height: int, rng: np.random.Generator) -> tuple[int, int, int, int]:
        """(left, top, w, h) of a random crop of a width x height image."""
        area = width * height
        log_lo, log_hi = math.log(self.ratio[0]), math.log(self.ratio[1])
        for _ in range(10):
            target = area * rng.uniform(*self.scale)
            aspect = math.exp(rng.uniform(log_lo, log_hi))
            w = round(math.sqrt(target * aspect))
            h = round(math.sqrt(target / aspect))
            if 0 < w <= width and 0 < h <= height:
                left = int(rng.integers(0, width - w + 1))
                top = int(rng.integers(0, height - h + 1))
                return left, top, w, h
        # no try fitted (very elongated image): the largest central crop with an allowed aspect ratio
        aspect = width / height
        if aspect < self.ratio[0]:
            w, h = width, round(width / self.ratio[0])
        elif aspect > self.ratio[1]:
            w, h = round(height * self.ratio[1]), height
        else:
            w, h = width, height
        return (width - w) // 2, (height - h) // 2, w, h

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> torch.Tensor:
        s = self.proc.image_size
        left, top, w, h = self.sample_crop(img.width, img.height, rng)
        out = img.resize((s, s), resample=self.proc.resample, box=(left, top, left + w, top + h))
        if rng.random() < self.hflip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return self.proc.normalize(out)  # the eval arithmetic: an un-augmented crop equals the eval pixels
