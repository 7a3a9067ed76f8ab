"""A generated world of coloured shapes: scenes, pictures, captions, questions and instruction samples.

A scene holds 1-3 objects on a 3x3 grid. Each object has a shape, a colour (a named palette), a size
(small / large) and a grid cell; the cells define the relations (left / right: column order, above / below:
row order). Each (colour, shape) pair appears at most once per scene, so "the red circle" always names one
object. Pictures are drawn at 4x and downsampled (antialiased), so a small triangle is still a triangle at 64 px.

Language (all answers are short):
- captions: several phrasings per scene (object list, with sizes, with a count, with a relation or position).
- questions, by family: exist (yes/no), count (digits), colour, shape, size, relation (yes/no and "what is
  left of the X?" -> "red circle"), compare (yes/no, sizes). Yes/no families give one "yes" and one "no"
  question per scene, so they are exactly balanced over any set of scenes; count targets are drawn uniformly
  over the counts the scene allows, so the answers spread over 0-3.

Held-out split: a scene's graph (`scene_key`: objects with their attributes + pairwise left/right/above/below,
no exact positions) is hashed to a bucket; bucket 0 -> val, 1 -> test, 2-9 -> train. A val or test scene's graph
therefore never occurs in training (not even moved to other cells), in any world written with any settings.
Task families are also split: `held_in` tasks are trained, `held_out` tasks are only evaluated (InstructBLIP's
zero-shot protocol of the InstructBLIP paper).

`blip2.data.world.write_world` writes a world in the training formats; `blip2.data.scoring` scores free captions
against a scene.
"""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass
from itertools import combinations, permutations, product
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw

SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = {"red": (215, 40, 40), "green": (40, 160, 70), "blue": (45, 85, 225), "yellow": (240, 205, 35),
           "purple": (145, 60, 185), "orange": (245, 135, 25)}
SIZES = ("small", "large")
GRID = 3  # the picture is a GRID x GRID board of cells; one object per cell
BACKGROUND = (235, 235, 235)  # light gray
_DIAMETER = {"small": 0.5, "large": 0.8}  # object diameter, in cells
_JITTER = 0.1  # max centre offset from the cell centre, in cells: objects stay in their cell, and objects of
# one row never differ by more than 0.2 cell vertically while rows differ by >= 0.8 cell (relations are clear)
_SUPERSAMPLE = 4

RELATIONS = ("left", "right", "above", "below")
_REL_TEXT = {"left": "to the left of", "right": "to the right of", "above": "above", "below": "below"}
_NUMBER = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
_WHERE = {(0, 0): "in the top left corner", (0, 1): "at the top", (0, 2): "in the top right corner",
          (1, 0): "on the left", (1, 1): "in the center", (1, 2): "on the right",
          (2, 0): "in the bottom left corner", (2, 1): "at the bottom", (2, 2): "in the bottom right corner"}

FAMILIES = ("exist", "count", "colour", "shape", "size", "relation", "compare")
TASKS = ("caption",) + FAMILIES
HELD_IN = ("caption", "colour", "shape", "count", "size")
HELD_OUT = ("exist", "relation", "compare")
SPLITS = ("train", "val", "test")
SPLIT_RULE = ("bucket = blake2b-64(scene_key) mod 10; bucket 0 -> val, 1 -> test, 2..9 -> train; scene_key lists "
              "the objects (size colour shape) and each pair's left/right/same and above/below/same relation")
_ANSWER_TYPE = {"exist": "yes/no", "compare": "yes/no", "count": "number"}  # others (relation mixes): by answer


# --------------------------------------------------------------------------------------------------- scenes


@dataclass(frozen=True)
class Obj:
    """One object. col / row: grid cell (0 = left / top); dx / dy: centre offset inside the cell, in cells."""

    shape: str
    colour: str
    size: str
    col: int
    row: int
    dx: float = 0.0
    dy: float = 0.0

    def __post_init__(self):
        for field, value, allowed in (("shape", self.shape, SHAPES), ("colour", self.colour, tuple(COLOURS)),
                                      ("size", self.size, SIZES), ("col", self.col, range(GRID)),
                                      ("row", self.row, range(GRID))):
            if value not in allowed:
                raise ValueError(f"object {field} must be one of {tuple(allowed)}, got {value!r}")
        if abs(self.dx) > _JITTER or abs(self.dy) > _JITTER:
            raise ValueError(f"object offset ({self.dx}, {self.dy}) exceeds {_JITTER} cell")

    @property
    def name(self) -> str:  # unique within a scene
        return f"{self.colour} {self.shape}"

    @property
    def label(self) -> str:
        return f"{self.size} {self.colour} {self.shape}"

    @property
    def centre(self) -> tuple[float, float]:
        """(x, y) in [0, 1], y downwards."""
        return (self.col + 0.5 + self.dx) / GRID, (self.row + 0.5 + self.dy) / GRID

    @property
    def radius(self) -> float:
        """Half the object's extent, as a fraction of the picture side."""
        return _DIAMETER[self.size] / 2 / GRID


@dataclass(frozen=True)
class Scene:
    objects: tuple[Obj, ...]

    def __post_init__(self):
        object.__setattr__(self, "objects", tuple(self.objects))
        if not self.objects:
            raise ValueError("a scene needs at least one object")
        cells = [(o.col, o.row) for o in self.objects]
        if len(set(cells)) != len(cells):
            raise ValueError(f"two objects share a grid cell: {cells}")
        names = [o.name for o in self.objects]
        if len(set(names)) != len(names):
            raise ValueError(f"a (colour, shape) pair occurs twice, so it could not be referred to: {names}")

    def to_dict(self) -> dict:
        return {"objects": [asdict(o) for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> "Scene":
        return cls(tuple(Obj(**o) for o in d["objects"]))


def holds(relation: str, a: Obj, b: Obj) -> bool:
    """Whether `a` is `relation` (left / right / above / below) of `b`, by grid cells."""
    if relation not in RELATIONS:
        raise ValueError(f"unknown relation {relation!r}; choose one of {RELATIONS}")
    return {"left": a.col < b.col, "right": a.col > b.col, "above": a.row < b.row, "below": a.row > b.row}[relation]


def sample_scene(rng: np.random.Generator, n_objects: int | None = None) -> Scene:
    """A random scene: 1-3 objects (uniform) unless n_objects is given, in distinct cells, distinct
    (colour, shape) pairs, sizes 50/50."""
    n = int(rng.integers(1, 4)) if n_objects is None else int(n_objects)
    if not 1 <= n <= GRID * GRID:
        raise ValueError(f"n_objects must be in [1, {GRID * GRID}], got {n}")
    colours = list(COLOURS)
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    kinds = rng.choice(len(SHAPES) * len(colours), size=n, replace=False)  # kind = colour index * 4 + shape index
    objs = []
    for cell, kind in zip(cells.tolist(), kinds.tolist()):
        dx, dy = rng.uniform(-_JITTER, _JITTER, size=2).tolist()
        objs.append(Obj(SHAPES[kind % len(SHAPES)], colours[kind // len(SHAPES)], SIZES[int(rng.integers(2))],
                        col=cell % GRID, row=cell // GRID, dx=dx, dy=dy))
    return Scene(tuple(objs))


def scene_key(scene: Scene) -> str:
    """The canonical scene graph: sorted object labels, then for each pair (i < j in that order) how object i
    lies relative to j horizontally and vertically. Exact cells and offsets are left out on purpose."""
    objs = sorted(scene.objects, key=lambda o: o.label)
    rels = []
    for i, j in combinations(range(len(objs)), 2):
        a, b = objs[i], objs[j]
        h = "left" if a.col < b.col else "right" if a.col > b.col else "same"
        v = "above" if a.row < b.row else "below" if a.row > b.row else "same"
        rels.append(f"{i}-{j}:{h},{v}")
    return ";".join(o.label for o in objs) + "|" + " ".join(rels)


def scene_split(key: str) -> str:
    """The split a scene graph belongs to (see SPLIT_RULE): the same in every world, whatever its seed."""
    bucket = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little") % 10
    return "val" if bucket == 0 else "test" if bucket == 1 else "train"


def render(scene: Scene, size: int = 64):
    """The scene as an RGB PIL image of size x size pixels (drawn at 4x, downsampled with Lanczos)."""
    if not 32 <= size <= 1024:
        raise ValueError(f"image size must be in [32, 1024] pixels (64-96 is the intended range), got {size}")
    side = size * _SUPERSAMPLE
    img = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        (x, y), r = (c * side for c in o.centre), o.radius * side
        fill = COLOURS[o.colour]
        if o.shape == "circle":
            draw.ellipse((x - r, y - r, x + r, y + r), fill=fill)
        elif o.shape == "square":  # side 1.77 r: about the circle's area, so "size" reads the same for both
            h = 0.886 * r
            draw.rectangle((x - h, y - h, x + h, y + h), fill=fill)
        elif o.shape == "triangle":  # apex up, filling the object's box
            draw.polygon([(x, y - r), (x + r, y + r), (x - r, y + r)], fill=fill)
        else:  # diamond
            draw.polygon([(x, y - r), (x + r, y), (x, y + r), (x - r, y)], fill=fill)
    return img.resize((size, size), Image.Resampling.LANCZOS)


# ------------------------------------------------------------------------------------------------- language


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _join(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def pick(rng: np.random.Generator, items: Sequence):
    return items[int(rng.integers(len(items)))]


def captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Several true descriptions of the scene (lower case, no final period), the object list left to right."""
    objs = sorted(scene.objects, key=lambda o: (o.col, o.row))
    n = len(objs)
    plain = _join([_a(o.name) for o in objs])
    caps = [plain, _join([_a(o.label) for o in objs]), f"{_NUMBER[n]} shape{'s' * (n > 1)}: {plain}"]
    if n == 1:
        caps.append(f"{_a(objs[0].label)} {_WHERE[objs[0].row, objs[0].col]}")
    else:
        a, b, rel = pick(rng, [(a, b, r) for a, b in permutations(objs, 2) for r in ("left", "above")
                                if holds(r, a, b)])
        text = f"{_a(a.name)} {_REL_TEXT[rel]} {_a(b.name)}"
        rest = [o for o in objs if o is not a and o is not b]
        caps.append(text + "".join(f", and {_a(o.name)} {_WHERE[o.row, o.col]}" for o in rest))
    shuffled = [objs[i] for i in rng.permutation(n)]
    caps.append(f"a picture of {_join([_a(o.name) for o in shuffled])} on a gray background")
    return list(dict.fromkeys(caps))  # drop repeats, keep order


def _unique_ref(scene: Scene, o: Obj, field_sets: Sequence[tuple[str, ...]]) -> str | None:
    """The first attribute phrase (e.g. "large circle") that picks out `o` alone in the scene, else None."""
    for fields in field_sets:
        same = [p for p in scene.objects if all(getattr(p, f) == getattr(o, f) for f in fields)]
        if len(same) == 1:
            return " ".join(getattr(o, f) for f in fields)
    return None


def _exist(scene: Scene, rng) -> list[tuple[str, str]]:
    kind = int(rng.integers(3))  # what the question names: colour + shape, shape, or colour
    if kind == 0:
        every, have = [f"{c} {s}" for c, s in product(COLOURS, SHAPES)], {o.name for o in scene.objects}
    elif kind == 1:
        every, have = list(SHAPES), {o.shape for o in scene.objects}
    else:
        every, have = [f"{c} object" for c in COLOURS], {f"{o.colour} object" for o in scene.objects}
    present = [p for p in every if p in have]
    absent = [p for p in every if p not in have]  # never empty: at most 3 objects, at least 4 possibilities

    def ask(phrase: str) -> str:
        return pick(rng, [f"Is there {_a(phrase)}?", f"Are there any {phrase}s?"])

    return [(ask(pick(rng, present)), "yes"), (ask(pick(rng, absent)), "no")]


def _count(scene: Scene, rng) -> list[tuple[str, str]]:
    out = [(pick(rng, ["How many objects are there?", "How many shapes are in the image?"]),
            str(len(scene.objects)))]
    if rng.integers(2) == 0:
        counts = {f"{s}s": sum(o.shape == s for o in scene.objects) for s in SHAPES}
    else:
        counts = {f"{c} objects": sum(o.colour == c for o in scene.objects) for c in COLOURS}
    # draw the answer first (uniform over the counts this scene allows), then a thing with that count: this
    # keeps 0 from dominating, as most shapes and colours are absent from any one scene
    target = pick(rng, sorted(set(counts.values())))
    thing = pick(rng, [t for t, c in counts.items() if c == target])
    out.append((f"How many {thing} are there?", str(target)))
    return out


def _attribute(scene: Scene, rng, family: str) -> list[tuple[str, str]]:
    """colour / shape / size of one object, named without the asked attribute."""
    if family == "colour":
        refs = [(_unique_ref(scene, o, [("shape",), ("size", "shape")]), o.colour) for o in scene.objects]
        templates = ["What color is the {}?", "What is the color of the {}?"]
    elif family == "shape":
        refs = [(_unique_ref(scene, o, [("colour",), ("size", "colour")]), o.shape) for o in scene.objects]
        templates = ["What shape is the {} object?", "What is the shape of the {} object?"]
    else:
        refs = [(o.name, o.size) for o in scene.objects]
        templates = ["What size is the {}?", "Is the {} small or large?", "Is the {} large or small?"]
    refs = [r for r in refs if r[0] is not None]
    if not refs:  # e.g. two small circles of different colours: "the small circle" is ambiguous
        return []
    ref, answer = pick(rng, refs)
    return [(pick(rng, templates).format(ref), answer)]


def _relation(scene: Scene, rng) -> list[tuple[str, str]]:
    if len(scene.objects) < 2:
        return []
    facts = [(r, a, b) for a, b in permutations(scene.objects, 2) for r in RELATIONS]
    true = [f for f in facts if holds(*f)]  # never empty: distinct cells differ in column or row
    false = [f for f in facts if not holds(*f)]  # never empty: the opposite of a true fact is false
    out = [(f"Is the {a.name} {_REL_TEXT[r]} the {b.name}?", answer)
           for (r, a, b), answer in ((pick(rng, true), "yes"), (pick(rng, false), "no"))]
    # open question, only where exactly one object is in that relation to the anchor
    open_q = [(r, b, hits[0]) for r, b in product(RELATIONS, scene.objects)
              if len(hits := [a for a in scene.objects if a is not b and holds(r, a, b)]) == 1]
    if open_q:
        r, b, a = pick(rng, open_q)
        out.append((f"What is {_REL_TEXT[r]} the {b.name}?", a.name))
    return out


def _compare(scene: Scene, rng) -> list[tuple[str, str]]:
    if len(scene.objects) < 2:
        return []
    facts = []  # (question, is it true)
    for a, b in permutations(scene.objects, 2):
        facts.append((f"Is the {a.name} bigger than the {b.name}?", a.size == "large" and b.size == "small"))
        facts.append((f"Is the {a.name} smaller than the {b.name}?", a.size == "small" and b.size == "large"))
    for a, b in combinations(scene.objects, 2):
        facts.append((f"Are the {a.name} and the {b.name} the same size?", a.size == b.size))
    return [(pick(rng, [q for q, t in facts if t]), "yes"), (pick(rng, [q for q, t in facts if not t]), "no")]


def questions(scene: Scene, rng: np.random.Generator, families: Sequence[str] = FAMILIES) -> list[dict]:
    """Questions about the scene: [{"family", "question", "answer"}], families in the order given. A family
    with nothing to ask (relation / compare with one object, an object that cannot be named) gives none."""
    out = []
    for family in families:
        if family == "exist":
            qa = _exist(scene, rng)
        elif family == "count":
            qa = _count(scene, rng)
        elif family in ("colour", "shape", "size"):
            qa = _attribute(scene, rng, family)
        elif family == "relation":
            qa = _relation(scene, rng)
        elif family == "compare":
            qa = _compare(scene, rng)
        else:
            raise ValueError(f"unknown question family {family!r}; choose from {FAMILIES}")
        out += [{"family": family, "question": q, "answer": a} for q, a in qa]
    return out


def answer_type(family: str, answer: str) -> str:
    """VQAv2-style answer type: yes/no, number or other."""
    return _ANSWER_TYPE.get(family, "yes/no" if answer in ("yes", "no") else "other")

def all_captions(scene: Scene) -> set[str]:
    """Every caption `captions` can write for the scene, over all rng draws (relation pick, shuffle order)."""
    objs = sorted(scene.objects, key=lambda o: (o.col, o.row))
    n = len(objs)
    plain = _join([_a(o.name) for o in objs])
    out = {plain, _join([_a(o.label) for o in objs]), f"{_NUMBER[n]} shape{'s' * (n > 1)}: {plain}"}
    if n == 1:
        out.add(f"{_a(objs[0].label)} {_WHERE[objs[0].row, objs[0].col]}")
    else:
        for a, b in permutations(objs, 2):
            rest = "".join(f", and {_a(o.name)} {_WHERE[o.row, o.col]}" for o in objs if o is not a and o is not b)
            out |= {f"{_a(a.name)} {_REL_TEXT[r]} {_a(b.name)}{rest}" for r in ("left", "above") if holds(r, a, b)}
    out |= {f"a picture of {_join([_a(o.name) for o in order])} on a gray background" for order in permutations(objs)}
    return out
