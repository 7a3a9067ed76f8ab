"""Write a shapes world (blip2.data.shapes) to disk in the training formats (blip2.train.data): PNG images,
JSON annotation lists, webdataset shards of the training captions, and a `world.json` manifest."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np
from PIL import Image

from ..train.data import write_shards
from ..train.templates import CAPTION_TEMPLATES, VQA_TEMPLATES
from .shapes import (COLOURS, FAMILIES, GRID, HELD_IN, HELD_OUT, RELATIONS, SHAPES, SIZES, SPLIT_RULE, SPLITS, TASKS,
                     Obj, Scene, answer_type, captions, pick, questions, render, sample_scene, scene_key, scene_split)


def _scene_in_split(rng: np.random.Generator, split: str, max_tries: int = 10_000) -> Scene:
    """Draw scenes until one whose graph belongs to `split` (about 1 in 10 for val / test, 8 in 10 for train)."""
    for _ in range(max_tries):
        scene = sample_scene(rng)
        if scene_split(scene_key(scene)) == split:
            return scene
    raise RuntimeError(f"no {split} scene in {max_tries} draws: the split rule cannot be met")


def _dump(path: Path, data: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=0))


def _check_tasks(held_in: Sequence[str], held_out: Sequence[str]) -> None:
    for what, names in (("held_in", held_in), ("held_out", held_out)):
        unknown = sorted(set(names) - set(TASKS))
        if unknown:
            raise ValueError(f"{what} has unknown tasks {unknown}; tasks are {TASKS}")
    both = sorted(set(held_in) & set(held_out))
    if both:
        raise ValueError(f"tasks {both} are both held-in and held-out: a zero-shot test needs them apart")


def _absolute(root: Path, files: dict) -> dict[str, Any]:
    out: dict[str, Any] = {"root": str(root), "image_root": str(root), "manifest": str(root / "world.json")}
    for name, rel in files.items():
        out[name] = [str(root / r) for r in rel] if isinstance(rel, list) else str(root / rel)
    return out


def write_world(out_dir: str | Path, n_train: int = 1000, n_val: int = 100, n_test: int = 200, seed: int = 0,
                image_size: int = 64, held_in: Sequence[str] = HELD_IN, held_out: Sequence[str] = HELD_OUT,
                per_shard: int = 256) -> dict[str, Any]:
    """Write a shapes world under out_dir and return the absolute paths of what it wrote.

    Layout (image paths in every file are relative to out_dir, the image root):
        images/{split}/NNNNNN.png
        scenes/{split}.json        [{"image", "image_id", "key", "objects": [...]}]   (scene graphs, for tests)
        captions/{split}.json      [{"image", "image_id", "caption": [...], "scene_key"}] -> CaptionDataset
        vqa/{split}_{family}.json  [{"image", "image_id", "question_id", "question", "answer": [a],
                                     "question_type": family, "answer_type"}]       -> VQADataset, evaluate("vqa")
        vqa/{split}_held_in.json   the held-in families' questions of the split in one file, families
                                   interleaved (renumbered)
        instruct/{split}.json      [{"image", "image_id", "instruction", "answer", "task"}] -> InstructionDataset
        shards/train-NNNNNN.tar    training captions, img2dataset layout (JPEG)  -> ShardDataset
        world.json                 the manifest: settings, counts, yes-fractions, split rule, files
    Train VQA / instruction files cover the held-in tasks only; val and test cover every task. Captions are
    written for every split (BLIP-2 pre-training uses them whatever the instruction split is).
    Returned keys: root, image_root, manifest, scenes_{split}, captions_{split}, vqa_{split}_{family},
    vqa_{split}_held_in, instruct_{split}, shards (a list).

    Scene i of a split depends only on (seed, split, i); the same arguments give byte-identical images and JSON
    files (tar headers carry the write time, their members are identical). A finished world is marked by
    `.complete`: calling again with the same arguments returns at once, with other arguments raises.
    """
    counts = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
    if min(counts.values()) < 0 or int(seed) < 0 or int(per_shard) <= 0:
        raise ValueError(f"counts and seed must be >= 0 and per_shard > 0, got {counts}, seed={seed}, "
                         f"per_shard={per_shard}")
    _check_tasks(held_in, held_out)
    params = {"n_train": counts["train"], "n_val": counts["val"], "n_test": counts["test"], "seed": int(seed),
              "image_size": int(image_size), "held_in": list(held_in), "held_out": list(held_out),
              "per_shard": int(per_shard)}
    root = Path(out_dir)
    marker = root / ".complete"
    if marker.is_file():
        written = json.loads(marker.read_text())
        if written != params:
            raise ValueError(f"{root} holds a shapes world written with {written}, not {params}: use another "
                             f"out_dir or delete it")
        return _absolute(root, json.loads((root / "world.json").read_text())["files"])
    render(Scene((Obj("circle", "red", "small", 0, 0),)), image_size)  # fails early on a bad image size

    files: dict[str, Any] = {}
    stats: dict[str, Any] = {}
    image_id = 0  # unique over the whole world
    for split_index, split in enumerate(SPLITS):
        tasks = [t for t in TASKS if split != "train" or t in held_in]
        rows = _split_rows(root, split, split_index, counts[split], int(seed), image_size, tasks, image_id)
        image_id += counts[split]
        files.update(_write_split(root, split, rows, held_in))
        scenes, caps, instruct, vqa = rows
        stats[split] = {"images": counts[split], "instruct": len(instruct),
                        "vqa": {f: len(v) for f, v in vqa.items()},
                        "yes_fraction": {f: round(yes.count(["yes"]) / len(yes), 4) for f, v in vqa.items()
                                         if (yes := [r["answer"] for r in v if r["answer_type"] == "yes/no"])}}
    shards = write_shards(_shard_samples(root, files["captions_train"], int(seed)), root / "shards",
                          per_shard=int(per_shard), prefix="train")
    files["shards"] = [str(Path(p).relative_to(root)) for p in shards]
    manifest = {"format": "blip2-shapes/1", "params": params, "families": list(FAMILIES), "tasks": list(TASKS),
                "held_in": list(held_in), "held_out": list(held_out), "split_rule": SPLIT_RULE,
                "world": {"shapes": list(SHAPES), "colours": {k: list(v) for k, v in COLOURS.items()},
                          "sizes": list(SIZES), "grid": GRID, "relations": list(RELATIONS),
                          "objects_per_scene": [1, 3]},
                "counts": stats, "files": files}
    _dump(root / "world.json", manifest)
    marker.write_text(json.dumps(params))  # last: a world without it is incomplete and is written again
    return _absolute(root, files)


def _split_rows(root: Path, split: str, split_index: int, count: int, seed: int, image_size: int,
                tasks: list[str], first_image_id: int) -> tuple[list, list, list, dict[str, list]]:
    """Render the split's images and return its rows: (scenes, captions, instructions, {family: VQA rows})."""
    families = [f for f in FAMILIES if f in tasks]
    scenes, caps, instruct = [], [], []
    vqa: dict[str, list] = {f: [] for f in families}
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        image_id = first_image_id + i
        # separate streams: the scene must not change when the language generation does
        scene = _scene_in_split(np.random.default_rng([seed, split_index, i, 0]), split)
        rng = np.random.default_rng([seed, split_index, i, 1])
        image = f"images/{split}/{i:06d}.png"
        render(scene, image_size).save(root / image)
        key = scene_key(scene)
        scenes.append({"image": image, "image_id": image_id, "key": key, **scene.to_dict()})
        texts = captions(scene, rng)
        caps.append({"image": image, "image_id": image_id, "caption": texts, "scene_key": key})
        if "caption" in tasks:
            instruct.append({"image": image, "image_id": image_id, "instruction": pick(rng, CAPTION_TEMPLATES),
                             "answer": pick(rng, texts), "task": "caption"})
        for q in questions(scene, rng, families):
            fam, answer = q["family"], q["answer"]
            vqa[fam].append({"image": image, "image_id": image_id, "question_id": len(vqa[fam]),
                             "question": q["question"], "answer": [answer], "question_type": fam,
                             "answer_type": answer_type(fam, answer)})
            instruct.append({"image": image, "image_id": image_id, "task": fam, "answer": answer,
                             "instruction": pick(rng, VQA_TEMPLATES).format(Question=q["question"])})
    return scenes, caps, instruct, vqa


def _write_split(root: Path, split: str, rows: tuple, held_in: Sequence[str]) -> dict[str, str]:
    """Write the split's JSON files; returns {name: path relative to root}."""
    scenes, caps, instruct, vqa = rows
    families = list(vqa)
    # one file of the held-in families' questions (for validation), the families interleaved so that
    # its first N entries cover every family
    order = sorted(((i, k, r) for k, f in enumerate(f for f in families if f in held_in)
                    for i, r in enumerate(vqa[f])), key=lambda t: (t[0], t[1]))
    held_in_vqa = [{**r, "question_id": n} for n, (_, _, r) in enumerate(order)]
    files = {}
    for name, rel, data in ((f"scenes_{split}", f"scenes/{split}.json", scenes),
                            (f"vqa_{split}_held_in", f"vqa/{split}_held_in.json", held_in_vqa),
                            (f"captions_{split}", f"captions/{split}.json", caps),
                            (f"instruct_{split}", f"instruct/{split}.json", instruct),
                            *((f"vqa_{split}_{f}", f"vqa/{split}_{f}.json", vqa[f]) for f in families)):
        _dump(root / rel, data)
        files[name] = rel
    return files


def _shard_samples(root: Path, captions_file: str, seed: int):
    """One shard sample per training image; its text is one of its captions (all are in the json)."""
    for c in json.loads((root / captions_file).read_text()):
        text = pick(np.random.default_rng([seed, 0, c["image_id"], 2]), c["caption"])
        with Image.open(root / c["image"]) as img:
            yield {"image": img.convert("RGB"), "text": text, "key": f"{c['image_id']:09d}",
                   "json": {"key": f"{c['image_id']:09d}", "caption": text, "captions": c["caption"],
                            "image_id": c["image_id"], "scene_key": c["scene_key"]}}
