"""Benchmark annotation files read into items (docs/architecture.md §2). `blip2.evaluation` runs the tasks on them.

The formats per task (every reader returns (items, skipped); bad entries are reported, never fatal):
- caption: COCO-style `{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}` or a list
  `[{"image", "caption": [...] or "..."}]`; metrics from blip2.metrics.caption_scores.
- vqa: VQAv2 questions + annotations files (images `COCO_<data_subtype>_<image_id:012d>.jpg`), or a list
  `[{"image", "question", "answer": [...] or "...", "question_id"?, "question_type"?, "answer_type"?}]`;
  several answers -> VQAv2 accuracy, one answer -> exact match (GQA).
- retrieval: Karpathy-style `[{"image", "caption": [...]}]`; blip2.retrieval.score_matrix + recall_at_k.
- choice: `[{"image", "question" or "prompt", "choices": [...], "answer": index or string}]`; the choice the LLM
  finds most likely (rank_choices) is the prediction.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Sequence


def read_json(path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from None


def as_list(x) -> list:
    """A path (str or os.PathLike) or a list of paths as a list; None as []."""
    if x is None:
        return []
    return [x] if isinstance(x, (str, os.PathLike)) else list(x)


def split_rows(rows: list[dict], root: Path | None) -> tuple[list[dict], list[dict]]:
    """Rows -> (items, skipped). A row's "problem" (set by the reader) or a duplicate id makes it skipped; every
    item gets its position in the file ("index") and its image path under `root` (None: the name as given)."""
    items, skipped, seen = [], [], set()
    for i, row in enumerate(rows):
        problem = row.pop("problem", None)
        if problem is None and not isinstance(row.get("image"), str):
            problem = "no image file name"
        if problem is None and row["id"] in seen:
            problem = f"duplicate id {row['id']!r}"
        row["index"] = i
        if problem is None:
            seen.add(row["id"])
            if root is not None:
                row["image"] = str(root / row["image"])
            items.append(row)
        else:
            skipped.append({"index": i, "id": row.get("id"), "image": row.get("image"), "reason": problem})
    return items, skipped


def _entries(data, path, what: str) -> list[dict]:
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of {what} entries, got {type(data).__name__}")
    return [e if isinstance(e, dict) else {"problem": f"entry is not an object: {e!r:.60}"} for e in data]


def caption_rows(entries: list[dict], field: str) -> list[dict]:
    """{"id", "image", field: the entry's non-empty captions}, with a problem when there are none."""
    rows = []
    for i, e in enumerate(entries):
        caps = [c for c in as_list(e.get("caption", e.get("captions"))) if isinstance(c, str) and c.strip()]
        row = {"id": e.get("image_id", e.get("id", i)), "image": e.get("image"), field: caps}
        if "problem" in e or not caps:
            row["problem"] = e.get("problem", "no reference captions" if field == "references" else "no captions")
        rows.append(row)
    return rows


def read_caption_data(path, root) -> tuple[list[dict], list[dict]]:
    """Items {"id", "image", "references"}."""
    data = read_json(path)
    if isinstance(data, dict) and "annotations" in data:  # COCO: references grouped by image id
        refs: dict = {}
        for a in data["annotations"]:
            refs.setdefault(a.get("image_id"), []).append(a.get("caption"))
        entries = [{"id": im.get("id"), "image": im.get("file_name"), "caption": refs.get(im.get("id"), [])}
                   for im in data.get("images", []) if isinstance(im, dict)]
    elif isinstance(data, list):
        entries = _entries(data, path, "caption")
    else:
        raise ValueError(f"{path}: not a caption file: expected COCO-style {{'images', 'annotations'}} or a list "
                         f"of {{'image', 'caption'}}")
    return split_rows(caption_rows(entries, "references"), Path(root))


def vqa_row(qid, image, question, answers, qtype=None, atype=None, problem=None) -> dict:
    row = {"id": qid, "image": image, "question": question, "answers": answers, "question_type": qtype,
           "answer_type": atype}
    if problem is not None:
        row["problem"] = problem
    elif not isinstance(question, str) or not question.strip():
        row["problem"] = "no question"
    elif not answers or not all(isinstance(a, str) for a in answers):
        row["problem"] = "empty answer list" if not answers else "answers must be strings"
    return row


def read_vqa_data(paths: Sequence, root) -> tuple[list[dict], list[dict]]:
    """Items {"id", "image", "question", "answers", "question_type", "answer_type"}. `paths`: the VQAv2
    questions and annotations files (either order), or one JSON list."""
    paths, root = [Path(p) for p in as_list(paths)], Path(root)
    if len(paths) == 2:
        q, a = (read_json(p) for p in paths)
        if "questions" not in q and "questions" in a:
            q, a = a, q
        if "questions" not in q or "annotations" not in a:
            raise ValueError(f"{paths[0]}, {paths[1]}: expected a VQAv2 questions file ({{'questions': [...]}}) and "
                             f"an annotations file ({{'annotations': [...]}})")
        subtype = q.get("data_subtype") or a.get("data_subtype")
        anns = {x.get("question_id"): x for x in a["annotations"]}
        rows = []
        for x in q["questions"]:
            ann = anns.get(x.get("question_id"), {})
            image = x.get("image")
            if image is None and subtype and isinstance(x.get("image_id"), int):
                name = f"COCO_{subtype}_{x['image_id']:012d}.jpg"
                image = f"{subtype}/{name}" if (root / subtype / name).exists() else name
            answers = [d.get("answer") for d in ann.get("answers", [])]
            rows.append(vqa_row(x.get("question_id"), image, x.get("question"), answers,
                                 ann.get("question_type"), ann.get("answer_type")))
    elif len(paths) == 1:
        rows = [vqa_row(e.get("question_id", i), e.get("image"), e.get("question"),
                         as_list(e.get("answer", e.get("answers"))), e.get("question_type"), e.get("answer_type"),
                         e.get("problem"))
                for i, e in enumerate(_entries(read_json(paths[0]), paths[0], "question"))]
    else:
        raise ValueError(f"VQA data is one JSON list or a questions file and an annotations file, got {len(paths)}")
    return split_rows(rows, root)


def read_choice_data(path, root) -> tuple[list[dict], list[dict]]:
    """Items {"id", "image", "question" or "prompt", "choices", "answer" (an index)}."""
    rows = []
    for i, e in enumerate(_entries(read_json(path), path, "multiple-choice")):
        choices, answer = e.get("choices"), e.get("answer")
        row = {"id": e.get("id", e.get("question_id", i)), "image": e.get("image"), "question": e.get("question"),
               "prompt": e.get("prompt"), "choices": choices, "answer": answer}
        if isinstance(answer, str) and isinstance(choices, list) and answer in choices:
            row["answer"] = choices.index(answer)
        if "problem" in e:
            row["problem"] = e["problem"]
        elif not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c.strip()
                                                                      for c in choices):
            row["problem"] = "choices must be a non-empty list of non-empty strings"
        elif not isinstance(row["prompt"], str) and not isinstance(row["question"], str):
            row["problem"] = "no question or prompt"
        elif not (isinstance(row["answer"], int) and not isinstance(row["answer"], bool)
                  and 0 <= row["answer"] < len(choices)):
            row["problem"] = f"answer {answer!r} is not one of the {len(choices)} choices"
        rows.append(row)
    return split_rows(rows, Path(root))


def read_retrieval_data(path, root) -> tuple[list[dict], list[dict]]:
    """Items {"id", "image", "captions"}: one per image, Karpathy-style."""
    return split_rows(caption_rows(_entries(read_json(path), path, "retrieval"), "captions"), Path(root))


READERS = {"caption": read_caption_data, "vqa": read_vqa_data, "retrieval": read_retrieval_data,
           "choice": read_choice_data}
