"""InstructBLIP instruction-tuning mixture: task datasets with templates, mixed ∝ sqrt(size)
(InstructBLIP paper, "Balancing Training Datasets").

- `TaskDataset` wraps a raw dataset (blip2.train.data) with a task type and its templates and turns each
  sample into {"instruction", "text" (the target), ...}, drawing one template per sample.
- `MixtureSampler` draws (dataset, sample) pairs: dataset d with probability p_d ∝ sqrt(size_d) (or the
  given weights), then a sample of d uniformly. Draw number g uses only `seeded_rng(seed, g)`, and rank r
  takes draws g = r, r + world, r + 2*world, ...: its state is the number of draws the loop consumed.
- `MixtureDataset` is the map-style dataset those draws index: `mixture[(d, i, g)]` is a formatted sample.

Typical use:
    mix = MixtureDataset([TaskDataset(coco, "caption", name="coco-caption"),
                          TaskDataset(vqa, "vqa", name="vqav2")], seed=0)
    loader = DataLoader(mix, batch_size=B, sampler=mix.sampler(), collate_fn=Collator("instruct", ...))
    ... after each step: loader.sampler.advance(B); checkpoint loader.sampler.state_dict()
"""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np
from torch.utils.data import Dataset, Sampler

from .. import dist
from .data import seeded_rng
from .templates import TEMPLATES, check_held_in

TASKS = tuple(TEMPLATES)  # caption, vqa, qgen, instruction


class TaskDataset(Dataset):
    """A raw dataset seen as one instruction task.

    task: "caption" (needs sample "text"), "vqa" / "qgen" (need "question" and "answers"), or "instruction"
    (needs "instruction" and "text"). templates: defaults to templates.TEMPLATES[task].
    For VQA the target is one of the answers drawn uniformly from the list, so an answer given by more
    annotators is drawn more often; question generation swaps the roles (instruction from the answer,
    target = the question).
    """

    def __init__(self, dataset, task: str, templates: Sequence[str] | None = None, name: str | None = None,
                 seed: int = 0):
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
        self.dataset, self.task, self.seed = dataset, task, int(seed)
        self.templates = tuple(templates) if templates is not None else TEMPLATES[task]
        if not self.templates:
            raise ValueError(f"task {task!r} has no templates")
        self.name = name or getattr(dataset, "name", task)

    def __len__(self) -> int:
        return len(self.dataset)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)

    def format(self, index: int, rng: np.random.Generator) -> dict:
        """Source sample `index` with "instruction" and "text" filled, template drawn with `rng`."""
        s = dict(self.dataset[index])
        template = self.templates[int(rng.integers(len(self.templates)))]
        answers = s.get("answers") or [""]  # no answer: empty target, skipped and counted by the collator
        try:
            if self.task == "caption":
                s["instruction"] = template
            elif self.task == "vqa":
                s["instruction"] = template.format(Question=s["question"])
                s["text"] = answers[int(rng.integers(len(answers)))]
            elif self.task == "qgen":
                s["instruction"] = template.format(Answer=answers[int(rng.integers(len(answers)))])
                s["text"] = s["question"]
            else:
                s["instruction"] = template.format(Instruction=s["instruction"])
        except KeyError as e:
            raise KeyError(f"{self.name}: a {self.task!r} sample needs the field {e} (sample keys: {sorted(s)})") \
                from None
        s["task"] = self.task
        return s

    def __getitem__(self, index: int) -> dict:
        s = self.dataset[index]
        return self.format(index, seeded_rng(self.seed, s.get("epoch", 0), s.get("key", str(index)), 2))


def mixture_probabilities(sizes: Sequence[int], weights: Sequence[float] | None = None) -> np.ndarray:
    """p_d ∝ weights_d if given, else ∝ sqrt(size_d) (InstructBLIP's rule: big sets do not drown small ones)."""
    sizes = np.asarray(sizes, dtype=np.float64)
    if sizes.ndim != 1 or len(sizes) == 0 or (sizes <= 0).any():
        raise ValueError(f"every dataset of a mixture needs at least one sample, got sizes {sizes.tolist()}")
    w = np.sqrt(sizes) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != sizes.shape or (w < 0).any() or w.sum() <= 0:
        raise ValueError(f"need one non-negative weight per dataset ({len(sizes)}), not all zero; got {weights}")
    return w / w.sum()


class MixtureSampler(Sampler):
    """Endless stream of draws (dataset index, sample index, draw number g) for this rank.

    Draw g is a function of (seed, g) alone; rank r takes g = r + world * n for n = position, position + 1, ...
    Call `advance(batch_size)` after each step (the DataLoader pulls draws ahead of use); `state_dict()` then
    holds the position and `load_state_dict` resumes exactly.
    """

    def __init__(self, sizes: Sequence[int], weights: Sequence[float] | None = None, seed: int = 0,
                 rank: int | None = None, world: int | None = None):
        self.sizes = [int(s) for s in sizes]
        self.probs = mixture_probabilities(self.sizes, weights)
        self.seed = int(seed)
        self.rank = dist.rank() if rank is None else int(rank)
        self.world = dist.world_size() if world is None else int(world)
        if not 0 <= self.rank < self.world:
            raise ValueError(f"rank must be in [0, world={self.world}), got {self.rank}")
        self.position = 0

    def draw(self, g: int) -> tuple[int, int, int]:
        rng = seeded_rng(self.seed, g)
        d = int(rng.choice(len(self.sizes), p=self.probs))
        return d, int(rng.integers(self.sizes[d])), int(g)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        n = self.position
        while True:
            yield self.draw(n * self.world + self.rank)
            n += 1

    def advance(self, n: int) -> None:
        """Record that the loop consumed n more draws on this rank."""
        self.position += int(n)

    def state_dict(self) -> dict[str, int]:
        return {"position": self.position, "seed": self.seed, "world": self.world}

    def load_state_dict(self, state: dict[str, int]) -> None:
        for k in ("seed", "world"):
            if k in state and state[k] != getattr(self, k):
                raise ValueError(f"mixture sampler state was saved with {k}={state[k]} but this sampler has "
                                 f"{k}={getattr(self, k)}: the resumed draws would differ")
        self.position = int(state["position"])


class MixtureDataset(Dataset):
    """Map-style view of several TaskDatasets, indexed by MixtureSampler draws (d, i, g).

    The formatted sample gets key "mix/{g}" and epoch 0, so its template, augmentation and T5 split all
    follow from (seed, g). Dataset names found in templates.HELD_OUT are refused unless allow_held_out=True.
    """

    def __init__(self, tasks: Sequence[TaskDataset], weights: Sequence[float] | None = None, seed: int = 0,
                 allow_held_out: bool = False):
        self.tasks = list(tasks)
        if not allow_held_out:
            check_held_in([t.name for t in self.tasks])
        self.sizes = [len(t) for t in self.tasks]
        self.weights = weights
        self.probs = mixture_probabilities(self.sizes, weights)
        self.seed = int(seed)

    def __len__(self) -> int:
        return sum(self.sizes)

    def __getitem__(self, draw: tuple[int, int, int]) -> dict:
        if not isinstance(draw, tuple) or len(draw) != 3:
            raise TypeError(f"MixtureDataset is indexed by MixtureSampler draws (d, i, g), got {draw!r}")
        d, i, g = draw
        task = self.tasks[d]
        s = task.format(i, seeded_rng(self.seed, g, 2))
        s.update(key=f"mix/{g}", epoch=0, dataset=task.name)
        return s

    def sampler(self, rank: int | None = None, world: int | None = None) -> MixtureSampler:
        return MixtureSampler(self.sizes, self.weights, self.seed, rank, world)
