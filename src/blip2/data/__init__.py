"""Generated data for quick, offline runs: `shapes` is a small world of coloured shapes with captions, questions
and instruction samples; `world` writes it in the same JSON / webdataset formats as real training data;
`scoring` scores free captions against a scene."""

from .shapes import (COLOURS, FAMILIES, HELD_IN, HELD_OUT, SHAPES, SIZES, TASKS, Obj, Scene, captions, questions,
                     render, sample_scene, scene_key, scene_split)
from .world import write_world

__all__ = ["COLOURS", "FAMILIES", "HELD_IN", "HELD_OUT", "SHAPES", "SIZES", "TASKS", "Obj", "Scene", "captions",
           "questions", "render", "sample_scene", "scene_key", "scene_split", "write_world"]
