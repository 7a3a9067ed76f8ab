"""The official annotation files of each benchmark, read as distributed (blip2.protocols names the reader of
each; `blip2 eval --benchmark`). Every reader takes (paths, image root) and returns (items, skipped) as
blip2.annotations.split_rows makes them: an entry the protocol cannot use is skipped with its reason, never fatal.

Item fields per kind: caption {"id", "image", "references", "domain"?}; vqa {"id", "image", "question", "answers",
"question_type", "answer_type", "ocr_tokens"?, "difficult"?}; choice {"id", "image", "question", "choices",
"answer" (index), "context"?}; binary {"id", "image", "text", "label"}; retrieval {"id", "image", "captions"};
video-qa {"id", "video", "question", "answers"}.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

from .annotations import as_list, read_json, split_rows


def _paths(paths, n_min: int, n_max: int, what: str) -> list[Path]:
    paths = [Path(p) for p in as_list(paths)]
    if not n_min <= len(paths) <= n_max:
        raise ValueError(f"{what} takes {n_min}{f' to {n_max}' if n_max > n_min else ''} file(s), got {len(paths)}")
    return paths


def _need(data, key: str, path, kind=list):
    if not isinstance(data, dict) or not isinstance(data.get(key), kind):
        raise ValueError(f"{path}: expected a JSON object with a {kind.__name__} {key!r} (is this the right file?)")
    return data[key]


# ------------------------------------------------------------------------------------------------ captions
def read_karpathy(path, root, split: str = "test", field: str = "references") -> tuple[list[dict], list[dict]]:
    """Karpathy's dataset_coco.json / dataset_flickr30k.json: {"images": [{"filepath"?, "filename", "split",
    "sentences": [{"raw"}], "cocoid"?}]}; the entries of `split` ("restval" counts as train). Image id: cocoid
    (COCO) or the file name's stem (Flickr30K ids are the file names)."""
    rows = []
    for e in _need(read_json(path), "images", path):
        if not isinstance(e, dict) or e.get("split") != split:
            continue
        name = e.get("filename")
        image = f"{e['filepath']}/{name}" if e.get("filepath") and isinstance(name, str) else name
        ident = e.get("cocoid", Path(name).stem if isinstance(name, str) else None)
        if isinstance(ident, str) and ident.isdigit():
            ident = int(ident)
        caps = [s.get("raw") for s in e.get("sentences", []) if isinstance(s, dict) and isinstance(s.get("raw"), str)]
        row = {"id": ident, "image": image, field: caps}
        if not caps:
            row["problem"] = "no sentences"
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no images in split {split!r}")
    return split_rows(rows, Path(root))


def read_karpathy_caption(paths, root):
    return read_karpathy(_paths(paths, 1, 1, "a Karpathy caption split")[0], root)


def read_karpathy_retrieval(paths, root):
    return read_karpathy(_paths(paths, 1, 1, "a Karpathy retrieval split")[0], root, field="captions")


def read_nocaps(paths, root):
    """nocaps_val_4500_captions.json: COCO-style {"images": [{"id", "file_name", "domain"}], "annotations":
    [{"image_id", "caption"}]}."""
    path = _paths(paths, 1, 1, "NoCaps")[0]
    data = read_json(path)
    refs: dict = {}
    for a in _need(data, "annotations", path):
        refs.setdefault(a.get("image_id"), []).append(a.get("caption"))
    rows = []
    for im in _need(data, "images", path):
        caps = [c for c in refs.get(im.get("id"), []) if isinstance(c, str)]
        row = {"id": im.get("id"), "image": im.get("file_name"), "references": caps, "domain": im.get("domain")}
        if not caps:
            row["problem"] = "no reference captions"
        elif row["domain"] not in ("in-domain", "near-domain", "out-domain"):
            row["problem"] = f"domain {row['domain']!r} is not in-domain / near-domain / out-domain"
        rows.append(row)
    return split_rows(rows, Path(root))


# --------------------------------------------------------------------------------------------------- VQA
def _vqa_row(ident, image, question, answers, qtype=None, atype=None, **extra) -> dict:
    row = {"id": ident, "image": image, "question": question, "answers": answers, "question_type": qtype,
           "answer_type": atype, **extra}
    if not isinstance(question, str) or not question.strip():
        row["problem"] = "no question"
    return row


def read_vqa_questions(paths, root):
    """VQAv2 / OK-VQA: the questions file {"data_subtype", "questions": [{"question_id", "image_id", "question"}]}
    and, for val, the annotations file {"annotations": [{"question_id", "answers": [{"answer"}], "question_type",
    "answer_type"}]}; without annotations (test-dev) the items have no answers (a submission file, no metrics).
    Images: <subtype>/COCO_<subtype>_<image_id:012d>.jpg (test-dev2015 questions use the test2015 images)."""
    paths = _paths(paths, 1, 2, "VQAv2 / OK-VQA (questions [annotations])")
    q = read_json(paths[0])
    questions = _need(q, "questions", paths[0])
    anns = {}
    if len(paths) == 2:
        anns = {a.get("question_id"): a for a in _need(read_json(paths[1]), "annotations", paths[1])}
    subtype = str(q.get("data_subtype") or "val2014").replace("test-dev", "test")
    root, rows = Path(root), []
    for x in questions:
        name = f"COCO_{subtype}_{x.get('image_id', 0):012d}.jpg" if isinstance(x.get("image_id"), int) else None
        image = f"{subtype}/{name}" if name and (root / subtype / name).exists() else name
        ann = anns.get(x.get("question_id"), {})
        answers = [a.get("answer") for a in ann.get("answers", [])] if anns else None
        row = _vqa_row(x.get("question_id"), image, x.get("question"), answers, ann.get("question_type"),
                       ann.get("answer_type"))
        if anns and not answers:
            row.setdefault("problem", "no annotation for this question")
        rows.append(row)
    return split_rows(rows, root)


def read_aokvqa(paths, root):
    """aokvqa_v1p0_val.json: [{"question_id", "image_id", "question", "choices", "correct_choice_idx",
    "direct_answers", "difficult_direct_answer"}]; images <split>2017/<image_id:012d>.jpg (COCO 2017)."""
    path = _paths(paths, 1, 1, "A-OKVQA")[0]
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected the A-OKVQA JSON list of questions")
    split = "test" if "test" in path.name else "train" if "train" in path.name else "val"
    rows = []
    for e in data:
        image = f"{split}2017/{e['image_id']:012d}.jpg" if isinstance(e.get("image_id"), int) else None
        row = _vqa_row(e.get("question_id"), image, e.get("question"), e.get("direct_answers"),
                       choices=e.get("choices"), answer=e.get("correct_choice_idx"),
                       difficult=bool(e.get("difficult_direct_answer")))
        if not isinstance(row["choices"], list) or not row["choices"]:
            row.setdefault("problem", "no choices")
        rows.append(row)
    return split_rows(rows, Path(root))


def read_gqa(paths, root):
    """testdev_balanced_questions.json: {question_id: {"imageId", "question", "answer", "types": {"structural",
    "semantic", "detailed"}}}; images images/<imageId>.jpg. One answer: exact match."""
    path = _paths(paths, 1, 1, "GQA")[0]
    data = read_json(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected the GQA JSON object of question id -> question")
    root, rows = Path(root), []
    for qid, e in data.items():
        name = f"{e.get('imageId')}.jpg"
        image = f"images/{name}" if (root / "images" / name).exists() else name
        types = e.get("types") or {}
        rows.append(_vqa_row(qid, image, e.get("question"), [e["answer"]] if isinstance(e.get("answer"), str) else [],
                             types.get("structural"), types.get("semantic")))
        if not rows[-1]["answers"]:
            rows[-1].setdefault("problem", "no answer")
    return split_rows(rows, root)


def read_vizwiz(paths, root):
    """VizWiz val.json: [{"image", "question", "answers": [{"answer", "answer_confidence"}], "answer_type",
    "answerable"}]; the question id is the image name. Unanswerable questions are kept (their answers say so)."""
    path = _paths(paths, 1, 1, "VizWiz")[0]
    data = read_json(path)
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected the VizWiz JSON list")
    root, rows = Path(root), []
    for e in data:
        image = e.get("image")
        if isinstance(image, str) and not (root / image).exists() and (root / "val" / image).exists():
            image = f"val/{image}"
        rows.append(_vqa_row(e.get("image"), image, e.get("question"),
                             [a.get("answer") for a in e.get("answers", [])], None, e.get("answer_type"),
                             answerable=e.get("answerable")))
    return split_rows(rows, root)


def read_textvqa(paths, root):
    """TextVQA_0.5.1_val.json {"data": [{"question_id", "image_id", "question", "answers"}]} and optionally the
    Rosetta OCR file {"data": [{"image_id", "ocr_tokens"}]} (entries that carry "ocr_tokens" themselves keep them);
    images train_images/<image_id>.jpg (val images live there)."""
    paths = _paths(paths, 1, 2, "TextVQA (questions [OCR])")
    entries = _need(read_json(paths[0]), "data", paths[0])
    ocr = {}
    if len(paths) == 2:
        ocr = {o.get("image_id"): o.get("ocr_tokens", []) for o in _need(read_json(paths[1]), "data", paths[1])}
    root, rows = Path(root), []
    for e in entries:
        name = f"{e.get('image_id')}.jpg"
        image = f"train_images/{name}" if (root / "train_images" / name).exists() else name
        tokens = e.get("ocr_tokens", ocr.get(e.get("image_id"), []))
        rows.append(_vqa_row(e.get("question_id"), image, e.get("question"), e.get("answers"),
                             ocr_tokens=[t for t in tokens if isinstance(t, str)]))
    return split_rows(rows, root)


# ------------------------------------------------------------------------------------------ multiple choice
def _problems(paths, what: str, split: str):
    paths = _paths(paths, 2, 2, f"{what} (problems.json pid_splits.json)")
    problems, splits = read_json(paths[0]), read_json(paths[1])
    if not isinstance(problems, dict) or not isinstance(splits, dict):
        raise ValueError(f"{paths[0]}, {paths[1]}: expected two JSON objects (pid -> problem, split -> pids)")
    if split not in splits:
        raise ValueError(f"{paths[1]}: no split {split!r} (it has {sorted(splits)[:8]})")
    return problems, [str(p) for p in splits[split]], paths


def read_scienceqa(paths, root):
    """ScienceQA problems.json {pid: {"question", "choices", "answer", "hint", "image" (a file name or null),
    "split"}} and pid_splits.json {"test": [pid]}; images <split>/<pid>/<image>. Questions without an image
    are skipped (ScienceQA-IMG)."""
    problems, pids, paths = _problems(paths, "ScienceQA", "test")
    rows = []
    for pid in pids:
        e = problems.get(pid, {})
        row = {"id": pid, "image": f"{e.get('split', 'test')}/{pid}/{e['image']}" if e.get("image") else None,
               "question": e.get("question"), "choices": e.get("choices"), "answer": e.get("answer"),
               "context": e.get("hint") or ""}
        row.update(_choice_problem(row, "no image (ScienceQA-IMG keeps the questions with an image)"))
        rows.append(row)
    return split_rows(rows, Path(root))


def read_iconqa(paths, root):
    """IconQA problems.json {pid: {"question", "choices", "answer", "ques_type", "split"}} and pid_splits.json
    {"choose_txt_test": [pid]}; images <split>/choose_txt/<pid>/image.png."""
    problems, pids, paths = _problems(paths, "IconQA", "choose_txt_test")
    rows = []
    for pid in pids:
        e = problems.get(pid, {})
        row = {"id": pid, "image": f"{e.get('split', 'test')}/choose_txt/{pid}/image.png",
               "question": e.get("question"), "choices": e.get("choices"), "answer": e.get("answer")}
        row.update(_choice_problem(row, None))
        rows.append(row)
    return split_rows(rows, Path(root))


def _choice_problem(row: dict, no_image: str | None) -> dict:
    choices, answer = row["choices"], row["answer"]
    if no_image is not None and row["image"] is None:
        return {"problem": no_image}
    if not isinstance(choices, list) or not choices or not all(isinstance(c, str) and c for c in choices):
        return {"problem": "choices must be a non-empty list of strings"}
    if not isinstance(answer, int) or not 0 <= answer < len(choices):
        return {"problem": f"answer {answer!r} is not one of the {len(choices)} choices"}
    if not isinstance(row["question"], str):
        return {"problem": "no question"}
    return {}


def read_hatefulmemes(paths, root):
    """Hateful Memes dev_seen.jsonl: one {"id", "img", "label", "text"} per line."""
    path = _paths(paths, 1, 1, "Hateful Memes")[0]
    if not path.is_file():
        raise FileNotFoundError(f"annotation file not found: {path}")
    rows = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            e = json.loads(line)
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} line {n} is not JSON: {err}") from None
        row = {"id": e.get("id"), "image": e.get("img"), "text": e.get("text"), "label": e.get("label")}
        if row["label"] not in (0, 1):
            row["problem"] = f"label {row['label']!r} is not 0 or 1"
        elif not isinstance(row["text"], str):
            row["problem"] = "no meme text"
        rows.append(row)
    return split_rows(rows, Path(root))


# ------------------------------------------------------------------------------------------------- video
def read_video_qa(paths, root):
    """MSVD-QA / MSRVTT-QA test_qa.json: [{"id", "video_id" (or "video"), "question", "answer"}]; videos
    video<id>.mp4 (MSRVTT), or, with MSVD's youtube_mapping.txt ("<youtube name> vid<id>" per line), <name>.avi."""
    paths = _paths(paths, 1, 2, "video QA (test_qa.json [youtube_mapping.txt])")
    data = read_json(paths[0])
    if not isinstance(data, list):
        raise ValueError(f"{paths[0]}: expected the JSON list of video questions")
    names = {}
    if len(paths) == 2:
        for line in paths[1].read_text().splitlines():
            parts = line.split()
            if len(parts) == 2:
                names[parts[1]] = f"{parts[0]}.avi"
    rows = []
    for i, e in enumerate(data):
        vid = e.get("video", e.get("video_id"))
        video = names.get(f"vid{vid}") if names else (vid if isinstance(vid, str) else f"video{vid}.mp4")
        row = _vqa_row(e.get("id", i), video, e.get("question"), [e["answer"]] if isinstance(e.get("answer"), str)
                       else [])
        if not row["answers"]:
            row.setdefault("problem", "no answer")
        rows.append(row)
    items, skipped = split_rows(rows, Path(root))
    for it in items:
        it["video"] = it.pop("image")
    return items, skipped


READERS = {"karpathy-caption": read_karpathy_caption, "karpathy-retrieval": read_karpathy_retrieval,
           "nocaps": read_nocaps, "vqa-questions": read_vqa_questions, "aokvqa": read_aokvqa, "gqa": read_gqa,
           "vizwiz": read_vizwiz, "textvqa": read_textvqa, "scienceqa": read_scienceqa, "iconqa": read_iconqa,
           "hatefulmemes": read_hatefulmemes, "video-qa": read_video_qa}


def read(reader: str, paths: Sequence, root) -> tuple[list[dict], list[dict]]:
    if reader not in READERS:
        raise ValueError(f"unknown benchmark reader {reader!r}")
    return READERS[reader](paths, root)
