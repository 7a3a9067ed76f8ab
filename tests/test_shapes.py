"""The generated shapes world: answers checked against hand-written facts of hand-built scenes, balance, the
held-out split, rendering, and the written files read back through the real data path."""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from blip2.data.shapes import COLOURS, FAMILIES, SHAPES, Obj, Scene, captions, questions, render, sample_scene, scene_key
from blip2.data.world import write_world

# A large red circle on the left of the middle row, a small blue square on the right of it.
PAIR = Scene((Obj("circle", "red", "large", col=0, row=1), Obj("square", "blue", "small", col=2, row=1)))

# Every question the generator may ask about PAIR, answered by hand (exist questions: see _exists_in_pair).
PAIR_ANSWERS = {
    "How many objects are there?": "2", "How many shapes are in the image?": "2",
    "How many circles are there?": "1", "How many squares are there?": "1", "How many triangles are there?": "0",
    "How many diamonds are there?": "0", "How many red objects are there?": "1",
    "How many blue objects are there?": "1", "How many green objects are there?": "0",
    "How many yellow objects are there?": "0", "How many purple objects are there?": "0",
    "How many orange objects are there?": "0",
    "What color is the circle?": "red", "What is the color of the circle?": "red",
    "What color is the square?": "blue", "What is the color of the square?": "blue",
    "What shape is the red object?": "circle", "What is the shape of the red object?": "circle",
    "What shape is the blue object?": "square", "What is the shape of the blue object?": "square",
    "What size is the red circle?": "large", "Is the red circle small or large?": "large",
    "Is the red circle large or small?": "large", "What size is the blue square?": "small",
    "Is the blue square small or large?": "small", "Is the blue square large or small?": "small",
    "Is the red circle to the left of the blue square?": "yes",
    "Is the red circle to the right of the blue square?": "no",
    "Is the red circle above the blue square?": "no", "Is the red circle below the blue square?": "no",
    "Is the blue square to the left of the red circle?": "no",
    "Is the blue square to the right of the red circle?": "yes",
    "Is the blue square above the red circle?": "no", "Is the blue square below the red circle?": "no",
    "What is to the left of the blue square?": "red circle", "What is to the right of the red circle?": "blue square",
    "Is the red circle bigger than the blue square?": "yes", "Is the red circle smaller than the blue square?": "no",
    "Is the blue square bigger than the red circle?": "no", "Is the blue square smaller than the red circle?": "yes",
    "Are the red circle and the blue square the same size?": "no",
    "Are the blue square and the red circle the same size?": "no",
}


def _exists_in_pair(question: str) -> str:
    m = re.fullmatch(r"Is there an? (.+)\?|Are there any (.+)s\?", question)
    assert m, f"unexpected exist question {question!r}"
    thing = m.group(1) or m.group(2)
    return "yes" if thing in {"red circle", "blue square", "circle", "square", "red object", "blue object"} else "no"


def _all_questions(scene, seeds=range(200)):
    return [q for s in seeds for q in questions(scene, np.random.default_rng(s))]


def test_pair_answers_match_hand_written_facts():
    asked = _all_questions(PAIR)
    for q in asked:
        expected = _exists_in_pair(q["question"]) if q["family"] == "exist" else PAIR_ANSWERS.get(q["question"])
        assert expected is not None, f"no hand-written answer for {q}"
        assert q["answer"] == expected, q
    texts = {q["question"] for q in asked}
    for must in ("What is to the left of the blue square?", "What is to the right of the red circle?",
                 "Is the red circle bigger than the blue square?", "How many triangles are there?"):
        assert must in texts
    assert {q["family"] for q in asked} == set(FAMILIES)


def test_three_objects_counts_and_references():
    # two circles (one large, one small) and a square; the square is below the large circle
    scene = Scene((Obj("circle", "red", "large", 0, 0), Obj("circle", "green", "small", 2, 0),
                   Obj("square", "red", "small", 0, 2)))
    asked = {q["question"]: q["answer"] for q in _all_questions(scene)}
    assert asked["How many objects are there?"] == "3"
    assert asked["How many circles are there?"] == "2"
    assert asked["How many red objects are there?"] == "2"
    assert asked["How many squares are there?"] == "1"
    # "the circle" is ambiguous: the circles are named by size instead
    assert "What color is the circle?" not in asked
    assert asked["What color is the large circle?"] == "red"
    assert asked["What color is the small circle?"] == "green"
    assert asked["What shape is the green object?"] == "circle"
    assert asked["What shape is the small red object?"] == "square"
    assert asked["What is below the red circle?"] == "red square"
    assert asked["Is the red square below the red circle?"] == "yes"
    assert asked["Is the green circle to the left of the red square?"] == "no"
    assert asked.get("Are the green circle and the red square the same size?", "yes") == "yes"


def test_compare_equal_sizes():
    scene = Scene((Obj("diamond", "purple", "large", 1, 0), Obj("triangle", "orange", "large", 1, 2)))
    asked = {q["question"]: q["answer"] for q in _all_questions(scene) if q["family"] in ("compare", "relation")}
    assert asked["Are the purple diamond and the orange triangle the same size?"] == "yes"
    for a, b in (("purple diamond", "orange triangle"), ("orange triangle", "purple diamond")):
        assert asked.get(f"Is the {a} bigger than the {b}?", "no") == "no"
        assert asked.get(f"Is the {a} smaller than the {b}?", "no") == "no"
        assert asked.get(f"Is the {a} to the left of the {b}?", "no") == "no"  # one column
    assert asked["What is above the orange triangle?"] == "purple diamond"
    assert asked["What is below the purple diamond?"] == "orange triangle"


def test_single_object_has_no_relation_or_compare():
    scene = Scene((Obj("triangle", "yellow", "small", 1, 1),))
    fams = {q["family"] for q in _all_questions(scene, range(20))}
    assert fams == {"exist", "count", "colour", "shape", "size"}
    caps = captions(scene, np.random.default_rng(0))
    assert "a small yellow triangle in the center" in caps and "a yellow triangle" in caps


def test_captions_of_pair():
    caps = captions(PAIR, np.random.default_rng(0))
    assert caps[:3] == ["a red circle and a blue square", "a large red circle and a small blue square",
                        "two shapes: a red circle and a blue square"]
    assert "a red circle to the left of a blue square" in caps
    assert len(caps) == len(set(caps)) >= 4


def test_captions_name_every_object_and_no_other_colour():
    rng = np.random.default_rng(1)
    for _ in range(200):
        scene = sample_scene(rng)
        present = {o.colour for o in scene.objects}
        for cap in captions(scene, rng):
            for o in scene.objects:
                assert f"{o.colour} {o.shape}" in cap, (cap, scene)
            assert not {c for c in COLOURS if re.search(rf"\b{c}\b", cap)} - present, cap


def test_answer_balance_over_400_scenes():
    rng = np.random.default_rng(7)
    qs = [q for _ in range(400) for q in questions(sample_scene(rng), rng)]
    by = {f: [q["answer"] for q in qs if q["family"] == f] for f in FAMILIES}
    for family in ("exist", "relation", "compare"):
        yn = [a for a in by[family] if a in ("yes", "no")]
        assert len(yn) >= 400
        assert 0.45 <= yn.count("yes") / len(yn) <= 0.55, family
    counts = Counter(by["count"])
    assert set(counts) == {"0", "1", "2", "3"}
    assert max(counts.values()) / len(by["count"]) < 0.5  # spread, not dominated by one answer
    assert min(counts.values()) / len(by["count"]) > 0.05
    colours = Counter(by["colour"])
    assert set(colours) == set(COLOURS) and max(colours.values()) / len(by["colour"]) < 0.3
    assert set(Counter(by["shape"])) == set(SHAPES)
    assert 0.4 < by["size"].count("large") / len(by["size"]) < 0.6


def test_scene_key_is_the_graph_not_the_positions():
    moved = Scene((Obj("square", "blue", "small", 1, 0, dx=0.05), Obj("circle", "red", "large", 0, 0)))
    assert scene_key(moved) == scene_key(PAIR)  # other cells and order, same objects and relations
    above = Scene((Obj("circle", "red", "large", 0, 0), Obj("square", "blue", "small", 0, 2)))
    resized = Scene((Obj("circle", "red", "small", 0, 1), Obj("square", "blue", "small", 2, 1)))
    assert len({scene_key(PAIR), scene_key(above), scene_key(resized)}) == 3
    with pytest.raises(ValueError, match="share a grid cell"):
        Scene((Obj("circle", "red", "large", 0, 0), Obj("square", "blue", "small", 0, 0)))
    with pytest.raises(ValueError, match="occurs twice"):
        Scene((Obj("circle", "red", "large", 0, 0), Obj("circle", "red", "small", 1, 0)))


def test_render_draws_the_shapes():
    scene = Scene((Obj("circle", "red", "large", 0, 0), Obj("square", "blue", "large", 2, 0),
                   Obj("triangle", "green", "large", 0, 2)))
    img = np.asarray(render(scene, 96)).astype(int)
    assert img.shape == (96, 96, 3)
    cell = 32  # 96 px / 3 cells; a large object spans 0.8 cell = 25.6 px around the cell centre
    assert np.abs(img[16, 16] - COLOURS["red"]).max() <= 3
    assert np.abs(img[16, 80] - COLOURS["blue"]).max() <= 3
    assert np.abs(img[2 * cell + 20, 16] - COLOURS["green"]).max() <= 3  # lower half of the triangle
    assert np.abs(img[48, 48] - (235, 235, 235)).max() <= 3  # empty centre cell: background
    # box corners: the square fills them, the circle and the triangle's upper corners do not
    assert np.abs(img[6, 2 * cell + 6] - COLOURS["blue"]).max() <= 10
    assert np.abs(img[6, 6] - COLOURS["red"]).max() > 100
    assert np.abs(img[2 * cell + 6, 6] - COLOURS["green"]).max() > 100
    assert render(scene, 64).size == (64, 64)


# ------------------------------------------------------------------------------------------ written files

SMALL = dict(n_train=24, n_val=6, n_test=8, image_size=64, per_shard=10)


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    a = write_world(tmp_path_factory.mktemp("a"), seed=5, **SMALL)
    b = write_world(tmp_path_factory.mktemp("b"), seed=5, **SMALL)
    c = write_world(tmp_path_factory.mktemp("c"), seed=6, **SMALL)
    return a, b, c


def _digests(root: str) -> dict[str, str]:
    """File digests; tar files by their members (tar headers carry the write time)."""
    out = {}
    for p in sorted(Path(root).rglob("*")):
        if not p.is_file():
            continue
        if p.suffix == ".tar":
            with tarfile.open(p) as tar:
                data = b"".join(m.name.encode() + tar.extractfile(m).read() for m in tar.getmembers())
        else:
            data = p.read_bytes()
        out[str(p.relative_to(root))] = hashlib.sha256(data).hexdigest()
    return out


def test_same_seed_same_files(worlds):
    a, b, c = worlds
    da, db, dc = _digests(a["root"]), _digests(b["root"]), _digests(c["root"])
    assert len(da) > 40 and da == db
    assert da["captions/train.json"] != dc["captions/train.json"]


def _graph(scene: dict) -> tuple:
    """An independent canonical form: the object labels and, per ordered pair, the column and row order."""
    objs = [(o["size"], o["colour"], o["shape"], o["col"], o["row"]) for o in scene["objects"]]
    rels = {(a[:3], b[:3], np.sign(a[3] - b[3]), np.sign(a[4] - b[4])) for a in objs for b in objs if a != b}
    return frozenset(o[:3] for o in objs), frozenset(rels)


def test_held_out_graphs_never_in_training(worlds):
    a = worlds[0]
    graphs = {s: [_graph(x) for x in json.loads(Path(a[f"scenes_{s}"]).read_text())] for s in ("train", "val", "test")}
    assert len(graphs["train"]) == 24 and len(graphs["test"]) == 8
    assert not set(graphs["test"]) & set(graphs["train"])
    assert not set(graphs["val"]) & set(graphs["train"])
    assert not set(graphs["val"]) & set(graphs["test"])


def test_task_split_and_manifest(worlds):
    a = worlds[0]
    manifest = json.loads(Path(a["manifest"]).read_text())
    held_in, held_out = set(manifest["held_in"]), set(manifest["held_out"])
    assert {"relation", "exist"} <= held_out and {"caption", "colour"} <= held_in
    for f in held_out:
        assert f"vqa_train_{f}" not in a and f"vqa_test_{f}" in a
    assert {r["task"] for r in json.loads(Path(a["instruct_train"]).read_text())} == held_in
    assert {r["task"] for r in json.loads(Path(a["instruct_test"]).read_text())} == set(manifest["tasks"])
    assert manifest["counts"]["test"]["yes_fraction"]["exist"] == 0.5
    # one file of the held-in families' questions per split: exactly the per-family files, renumbered
    for split in ("val", "test"):
        combined = json.loads(Path(a[f"vqa_{split}_held_in"]).read_text())
        parts = [r for f in manifest["families"] if f in held_in
                 for r in json.loads(Path(a[f"vqa_{split}_{f}"]).read_text())]
        assert [r["question_id"] for r in combined] == list(range(len(parts)))
        key = lambda r: json.dumps({**r, "question_id": 0}, sort_keys=True)  # noqa: E731
        assert sorted(map(key, combined)) == sorted(map(key, parts))
        fams = [r["question_type"] for r in combined]
        assert set(fams) == held_in - {"caption"}
        assert set(fams[:len(set(fams))]) == set(fams)  # interleaved: the first few cover every family
    with pytest.raises(ValueError, match="both held-in and held-out"):
        write_world(Path(a["root"]).parent / "bad", held_in=("caption", "exist"), held_out=("exist",))


def test_instructions_use_the_templates(worlds):
    from blip2.train.templates import CAPTION_TEMPLATES, VQA_TEMPLATES

    rows = json.loads(Path(worlds[0]["instruct_val"]).read_text())
    vqa = {(r["image"], r["question"]): r["answer"][0]
           for f in FAMILIES for r in json.loads(Path(worlds[0][f"vqa_val_{f}"]).read_text())}
    for r in rows:
        if r["task"] == "caption":
            assert r["instruction"] in CAPTION_TEMPLATES
        else:
            hits = [q for (img, q), ans in vqa.items() if img == r["image"] and ans == r["answer"]
                    and any(r["instruction"] == t.format(Question=q) for t in VQA_TEMPLATES)]
            assert hits, r


def test_idempotent(worlds):
    a = worlds[0]
    before = Path(a["captions_train"]).stat().st_mtime_ns
    again = write_world(a["root"], seed=5, **SMALL)
    assert again == a and Path(a["captions_train"]).stat().st_mtime_ns == before
    with pytest.raises(ValueError, match="written with"):
        write_world(a["root"], seed=6, **SMALL)


def test_read_by_training_datasets(worlds):
    from blip2.annotations import read_vqa_data
    from blip2.train.data import CaptionDataset, InstructionDataset, ShardDataset, VQADataset

    a = worlds[0]
    caps = json.loads(Path(a["captions_train"]).read_text())
    ds = CaptionDataset(a["captions_train"], a["image_root"])
    assert len(ds) == sum(len(c["caption"]) for c in caps)
    assert len({s["image_id"] for s in ds.samples}) == 24
    with Image.open(ds[0]["image"]) as img:
        assert img.size == (64, 64)
    vqa = VQADataset([a["vqa_val_relation"], a["vqa_val_count"]], a["image_root"])
    assert len(vqa) > 6 and all(len(s["answers"]) == 1 and Path(s["image"]).is_file() for s in vqa.samples)
    assert len(InstructionDataset(a["instruct_train"], a["image_root"])) > 24
    items, skipped = read_vqa_data([a["vqa_test_exist"]], a["image_root"])
    assert skipped == [] and {it["answers"][0] for it in items} == {"yes", "no"}

    assert len(a["shards"]) == 3  # 24 images, 10 per shard
    samples = list(ShardDataset(a["shards"], rank=0, world=1, shuffle=False))
    assert len(samples) == 24
    by_id = {c["image_id"]: c for c in caps}
    for s in samples:
        meta = by_id[s["json"]["image_id"]]
        assert s["json"]["caption"] in meta["caption"]
        with Image.open(io.BytesIO(s["image"])) as img:
            assert img.size == (64, 64)
