"""A tiny generated dataset for the tiny configs (no files needed): noisy solid-colour pictures with captions
and colour questions, written as PNG files + JSON annotation lists so training goes through the real data path.

`data.train: synthetic:colors` (captions) or `synthetic:colors-vqa` (questions) in a run config.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

COLORS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 70, 220), "yellow": (235, 215, 40),
          "purple": (140, 50, 170), "orange": (245, 140, 20), "white": (245, 245, 245), "black": (15, 15, 15)}
KINDS = ("colors", "colors-vqa")


def write_colors(root: Path, n: int = 64, size: int = 32, seed: int = 0) -> dict[str, Path]:
    """Write `n` images and both annotation files under `root` (idempotent). Returns {kind: json path}."""
    root = Path(root)
    done = root / ".complete"
    paths = {"colors": root / "colors.json", "colors-vqa": root / "colors-vqa.json"}
    if done.is_file():
        return paths
    (root / "images").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLORS)
    caps, vqa = [], []
    for i in range(n):
        name = names[i % len(names)]
        pixels = np.array(COLORS[name], dtype=np.float32)[None, None] + rng.normal(0, 20, (size, size, 3))
        img = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        rel = f"images/{i:05d}.png"
        img.save(root / rel)
        caps.append({"image": rel, "caption": [f"a {name} square", f"a picture that is {name}"]})
        vqa.append({"image": rel, "question": "what color is the picture?", "answer": [name] * 3})
    paths["colors"].write_text(json.dumps(caps))
    paths["colors-vqa"].write_text(json.dumps(vqa))
    done.write_text("ok")
    return paths


def resolve_annotations(spec, image_root, work_dir: Path, image_size: int):
    """A run config's annotation path(s) and image root, as given, or (`synthetic:NAME`) generated on first
    use under `work_dir`. Training data and validation data go through it."""
    if isinstance(spec, str) and spec.startswith("synthetic:"):
        return resolve(spec, work_dir, image_size)
    return spec, image_root


def resolve(spec: str, work_dir: Path, image_size: int) -> tuple[str, str]:
    """"synthetic:KIND" -> (annotation path, image root), generating the data on first use."""
    kind = spec.split(":", 1)[1]
    if kind not in KINDS:
        raise ValueError(f"unknown synthetic dataset {spec!r}; available: {['synthetic:' + k for k in KINDS]}")
    root = Path(work_dir) / "synthetic"
    paths = write_colors(root, size=image_size)
    return str(paths[kind]), str(root)
