"""Benchmark evaluation (BLIP-2 paper §4; docs/architecture.md §2): task runners on the items of
blip2.annotations, multiple-choice ranking, result files.

    report = evaluate("vqa", model, ["questions.json", "annotations.json"], "images/", output="runs/eval/vqa")

Tasks: caption, vqa, retrieval, choice; the annotation formats each reads are listed in blip2.annotations.
Under torch.distributed (torchrun) each process takes every W-th item and the results are gathered and put
back in annotation order; retrieval splits its work itself. Process 0 computes the metrics and writes the files.
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from PIL import Image
from tqdm.auto import tqdm

from . import dist, metrics
from .annotations import READERS, as_list, caption_rows, split_rows, vqa_row
from .processing import pad_ids
from .prompts import VQA_TEMPLATE, pre_caption, pre_question
from .retrieval import score_matrix
from .sources import ImageReader, open_source, table_files, table_rows

TASKS = ("caption", "vqa", "retrieval", "choice")


def generation_defaults(task: str, is_encoder_decoder: bool) -> dict:
    """As LAVIS's BLIP-2 eval configs (lavis/projects/blip2/eval/*.yaml): captions 5 beams, 30 max / 8 min new
    tokens; VQA 5 beams, 10 max / 1 min, length penalty -1 for encoder-decoder LLMs (Flan-T5) and 0 for
    decoder-only ones (OPT); no repetition penalty (blip2_opt.py / blip2_t5.py `generate`). Spelled out in full,
    so that a generic evaluation does not change with the model's own defaults (an InstructBLIP model's carry
    InstructBLIP's 1.5 repetition penalty; `blip2 eval --benchmark` applies each protocol's settings)."""
    if task == "caption":
        return {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8, "length_penalty": 1.0,
                "repetition_penalty": 1.0}
    if task == "vqa":
        return {"num_beams": 5, "max_new_tokens": 10, "min_new_tokens": 1,
                "length_penalty": -1.0 if is_encoder_decoder else 0.0, "repetition_penalty": 1.0}
    return {}


# -------------------------------------------------------------------------------------------- processes
def _gather_items(local: list) -> list:
    """Concatenate every process's list (each process gets all of them); identity in one process."""
    if not dist.is_distributed():
        return list(local)
    parts: list = [None] * dist.world_size()
    torch.distributed.all_gather_object(parts, local)
    return [x for part in parts for x in part]


@contextlib.contextmanager
def distributed_session(device: str | None = None):
    """Under torchrun (WORLD_SIZE > 1) start the process group (NCCL on GPUs, else Gloo) and yield this process's
    device (cuda:LOCAL_RANK unless `device` is given); in one process just yield `device`. Ends what it started."""
    started = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_distributed()
    if started:
        cuda = torch.cuda.is_available() and (device is None or str(device).startswith("cuda"))
        if cuda:
            device = device or f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
            torch.cuda.set_device(torch.device(device))
        dist.init_process_group(cuda)
    try:
        yield device
    finally:
        if started:
            torch.distributed.destroy_process_group()


# --------------------------------------------------------------------------------------------- images
def _processor(model):
    return model.need_processor()


def _pixels(model, images) -> torch.Tensor:
    """A pixel tensor [N, 3, H, W] on the model's device from a tensor or a list of images / paths."""
    return model.pixel_values(images if isinstance(images, torch.Tensor) else list(images))


def _opens(path: str) -> bool:
    """True when `path` is a file that PIL recognises as an image (reads the header only)."""
    try:
        with Image.open(path):
            return True
    except Exception:  # a missing file, or one of the many errors PIL raises for a non-image
        return False


_TABLE_READER = threading.local()


def _load_one(processor, item: dict):
    try:
        image = item["image"]
        if "table_item" in item:  # a table row: its image bytes (or path) through the sources reader
            if not hasattr(_TABLE_READER, "reader"):  # one per loader thread: it keeps the row group it read
                _TABLE_READER.reader = ImageReader()
            image = _TABLE_READER.reader.read(item["table_item"])
        return processor.image_processor.preprocess_one(image), None
    except (ValueError, OSError) as e:  # ImageError (missing / undecodable file) is a ValueError
        return None, str(e).splitlines()[0] if str(e) else type(e).__name__


# -------------------------------------------------------------------------------------- table data
# Column names a table's rows are read from (the first one present), for `--data` given as parquet files or a
# saved `datasets` folder; the image column is found as blip2.sources does (bytes, a path or a datasets Image).
TABLE_COLUMNS = {
    "caption": {"references": ("captions", "caption", "text", "sentences"), "id": ("image_id", "id")},
    "vqa": {"question": ("question",), "answers": ("answers", "answer"), "id": ("question_id", "id"),
            "question_type": ("question_type",), "answer_type": ("answer_type",)},
}


def _answers(value) -> list:
    """A cell of answers: a string, a list of strings, or VQAv2-style [{"answer": ...}, ...]."""
    return [a.get("answer") if isinstance(a, dict) else a for a in as_list(value)]


def read_table_data(task: str, path, image_column: str | None = None) -> tuple[list[dict], list[dict]] | None:
    """Caption / VQA items from a table (parquet files or a saved `datasets` folder), as the annotation readers
    give them from JSON; None when `path` is not a table. Each item's "image" is its row key (`file:row`), its
    "table_item" the image reference the loader reads."""
    table = table_files(path)
    if table is None:
        return None
    if task not in TABLE_COLUMNS:
        raise ValueError(f"{path}: a table serves the {' / '.join(TABLE_COLUMNS)} tasks, not {task}")
    images = open_source(path, image_column=image_column)
    wanted = TABLE_COLUMNS[task]
    cells = table_rows(*table, [c for names in wanted.values() for c in names])
    have = set().union(*(r.keys() for r in cells)) if cells else set()
    col = {field: next((c for c in names if c in have), None) for field, names in wanted.items()}
    missing = [f for f in wanted if col[f] is None and f not in ("id", "question_type", "answer_type")]
    if missing:
        raise ValueError(f"{path}: no column for {missing} (looked for {[wanted[f] for f in missing]}; "
                         f"columns: {sorted(have)})")

    def get(row, field):
        return row.get(col[field]) if col[field] else None

    ids = [get(row, "id") if col["id"] else item.key for item, row in zip(images, cells)]
    if task == "caption":
        rows = caption_rows([{"id": i, "image": item.key, "caption": _answers(get(row, "references"))}
                             for i, item, row in zip(ids, images, cells)], "references")
    else:
        rows = [vqa_row(i, item.key, get(row, "question"), _answers(get(row, "answers")), get(row, "question_type"),
                        get(row, "answer_type")) for i, item, row in zip(ids, images, cells)]
    for row, item in zip(rows, images):
        row["table_item"] = item
    return split_rows(rows, None)


def _image_batches(processor, items: list[dict], batch_size: int, progress: bool, desc: str):
    """(items, pixels [b, 3, S, S], skipped) per batch of `items`; unreadable images are skipped. The next batch is
    decoded in background threads (PIL releases the GIL) while the model works on this one."""
    chunks = [items[s:s + batch_size] for s in range(0, len(items), batch_size)]
    with ThreadPoolExecutor(4) as pool, ThreadPoolExecutor(1) as ahead:
        def load(chunk):
            return list(pool.map(lambda it: _load_one(processor, it), chunk))

        future = ahead.submit(load, chunks[0]) if chunks else None
        for n, chunk in enumerate(tqdm(chunks, desc=desc, disable=not progress or dist.rank() != 0)):
            loaded = future.result()
            if n + 1 < len(chunks):
                future = ahead.submit(load, chunks[n + 1])
            ok = [(it, px) for it, (px, _) in zip(chunk, loaded) if px is not None]
            bad = [{"index": it["index"], "id": it["id"], "image": it["image"], "reason": why}
                   for it, (_, why) in zip(chunk, loaded) if why is not None]
            yield [it for it, _ in ok], (torch.stack([px for _, px in ok]) if ok else None), bad


# --------------------------------------------------------------------------------------- choice ranking
def _continuations(tok, prompt: str, prompt_ids: list[int], choices: list[str]) -> list[list[int]]:
    """Token ids of each choice as it follows `prompt` in a decoder-only LLM: the tail of the tokenised
    "prompt choice" after the prompt's own ids (so the boundary is tokenised as in running text). When the
    prompt's ids are not a prefix of the joint text's, the choice is tokenised alone."""
    sep = " " if prompt and not prompt[-1].isspace() else ""
    joint = tok([prompt + sep + c for c in choices])["input_ids"]
    n = len(prompt_ids)
    return [ids[n:] if ids[:n] == prompt_ids and len(ids) > n else tok(sep + c, add_special_tokens=False)["input_ids"]
            for c, ids in zip(choices, joint)]


def _token_log_probs(logits: torch.Tensor, targets: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Sum over positions of log p(target) where `where` is set: logits [R, T, V], targets/where [R, T] -> [R]."""
    lp = -F.cross_entropy(logits[where].float(), targets[where], reduction="none")  # (n_tokens,): only those rows
    return torch.zeros(where.shape[0], device=lp.device).index_add_(0, where.nonzero()[:, 0], lp)


def _decoder_only_rows(llm, vis, prompt_ids, rows, pad):
    """rows of (sample, choice ids): [visual; prompt; choice; right padding] through the LLM. Right padding keeps
    every real token at the position it has unpadded (pads come last and the attention is causal).
    Returns (summed log p [R], number of choice tokens [R])."""
    device, Q = vis.device, vis.shape[1]
    ids, mask = pad_ids([prompt_ids[b] + c for b, c in rows], pad, device)  # (R, T)
    is_choice = torch.zeros_like(mask, dtype=torch.bool)
    for i, (b, c) in enumerate(rows):
        is_choice[i, len(prompt_ids[b]):len(prompt_ids[b]) + len(c)] = True
    who = torch.tensor([b for b, _ in rows], device=device)
    x = torch.cat([vis[who], llm.get_input_embeddings()(ids).to(vis.dtype)], dim=1)  # (R, Q + T, D)
    mask = torch.cat([torch.ones(len(rows), Q, dtype=mask.dtype, device=device), mask], dim=1)
    logits = llm(inputs_embeds=x, attention_mask=mask).logits  # (R, Q + T, V)
    return _token_log_probs(logits[:, Q - 1:-1], ids, is_choice), is_choice.sum(1)  # Q + t - 1 predicts token t


def _seq2seq_rows(llm, enc, enc_mask, rows, pad):
    """rows of (sample, choice ids): the choice as the decoder target over the sample's encoder output
    enc [b, L, D]. Right padding needs no decoder mask: the decoder is causal, pads come last."""
    labels, lmask = pad_ids([c for _, c in rows], pad, enc.device)  # (R, T)
    who = torch.tensor([b for b, _ in rows], device=enc.device)
    start = torch.full((len(rows), 1), llm.config.decoder_start_token_id, device=enc.device)
    logits = llm(encoder_outputs=(enc[who],), attention_mask=enc_mask[who],
                 decoder_input_ids=torch.cat([start, labels[:, :-1]], dim=1)).logits  # teacher forcing
    return _token_log_probs(logits, labels, lmask.bool()), lmask.sum(1)


@torch.no_grad()
def choice_scores(model, images, prompts: Sequence[str], choices: Sequence[Sequence[str]] | Sequence[str],
                  batch_size: int = 16, qformer_texts: Sequence[str] | None = None) -> list[dict]:
    """Log-likelihood of every candidate continuation under the LLM, given the image and the prompt.

    images: N images (PIL, paths) or a pixel tensor [N, 3, H, W]; prompts: N strings ("" for none); choices: one
    list of candidates per sample, or one list shared by all (classification). InstructBLIP's Q-Former gets
    `qformer_texts` (default: the prompts). Decoder-only LLMs score the choice's tokens after [visual; prompt];
    encoder-decoder LLMs (Flan-T5) encode [visual; prompt] and score the choice as the decoder target (with the
    tokenizer's EOS, as in training). Images and prompts go through the encoders once per sample, in batches of
    `batch_size` samples; the (sample, choice) rows go through the LLM in batches of `batch_size` rows.
    Returns per sample {"sum": [log p per choice], "mean": [per-token mean], "num_tokens": [...]}.
    """
    proc = _processor(model)
    tok, llm, pad = proc.tokenizer, model.llm, proc.tokenizer.pad_token_id
    n = len(prompts)
    if choices and isinstance(choices[0], str):
        choices = [list(choices)] * n
    if len(choices) != n or (qformer_texts is not None and len(qformer_texts) != n):
        raise ValueError(f"choice_scores: {n} prompts but {len(choices)} choice lists"
                         + (f" and {len(qformer_texts)} Q-Former texts" if qformer_texts is not None else ""))
    enc_dec, device = model.cfg.is_encoder_decoder, model.device
    out = []
    for s in range(0, n, batch_size):
        px = _pixels(model, images[s:s + batch_size])  # (b, 3, H, W)
        texts = list(prompts[s:s + batch_size])
        q_ids = q_mask = None
        if model.cfg.architecture == "instructblip":
            qt = list(qformer_texts[s:s + batch_size]) if qformer_texts is not None else texts
            q_ids, q_mask = (t.to(device) for t in proc.tokenize_qformer(qt, max_length=model.cfg.qformer_max_text_len))
        _, vis = model.visual_prompts(px, q_ids, q_mask)  # (b, Q, D): the soft visual prompt of each sample
        prompt_ids = tok(texts)["input_ids"]
        rows, where = [], []  # (sample in this chunk, choice ids), (sample, choice index)
        for b, (text, ids) in enumerate(zip(texts, prompt_ids)):
            cands = list(choices[s + b])
            cand_ids = tok(cands)["input_ids"] if enc_dec else _continuations(tok, text, ids, cands)
            if any(len(c) == 0 for c in cand_ids):
                raise ValueError(f"choice_scores: sample {s + b} has a choice that tokenises to nothing: {cands}")
            rows += [(b, c) for c in cand_ids]
            where += [(b, j) for j in range(len(cands))]
        if enc_dec:  # the encoder runs once per sample; its output is shared by the sample's candidates
            p_ids, p_mask = pad_ids(prompt_ids, pad, device)
            x = torch.cat([vis, llm.get_input_embeddings()(p_ids).to(vis.dtype)], dim=1)  # (b, Q + P, D)
            enc_mask = torch.cat([torch.ones(vis.shape[:2], dtype=p_mask.dtype, device=device), p_mask], dim=1)
            enc = llm.get_encoder()(inputs_embeds=x, attention_mask=enc_mask).last_hidden_state  # (b, Q + P, D)
        totals, counts = [], []
        for r in range(0, len(rows), batch_size):
            part = rows[r:r + batch_size]
            total, count = (_seq2seq_rows(llm, enc, enc_mask, part, pad) if enc_dec
                            else _decoder_only_rows(llm, vis, prompt_ids, part, pad))
            totals += total.tolist()
            counts += count.tolist()
        per = [{"sum": [], "mean": [], "num_tokens": []} for _ in texts]
        for (b, _), t, c in zip(where, totals, counts):
            per[b]["sum"].append(t)
            per[b]["mean"].append(t / c)
            per[b]["num_tokens"].append(c)
        out += per
    return out


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)  # the first of equal maxima


def rank_choices(model, images, prompts: Sequence[str], choices, reduce: str = "sum", batch_size: int = 16,
                 qformer_texts: Sequence[str] | None = None) -> list[int]:
    """The index of the most likely choice per sample (see choice_scores); reduce="sum" (the original's) compares the
    total token log-probability, "mean" the mean (no bias towards short choices). Ties go to the first choice."""
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    return [_argmax(s[reduce]) for s in choice_scores(model, images, prompts, choices, batch_size, qformer_texts)]


# ---------------------------------------------------------------------------------------------- runners
# A runner turns items into (predictions, skipped, extra); a scorer turns process 0's merged predictions (and the
# runner's extra, e.g. the retrieval score matrices) into metrics.
def run_batched(model, items, opts, step: Callable[[torch.Tensor, list[dict]], list[dict]]):
    """This process's share of `items` through `step(pixels, batch) -> one result dict per item`; then every
    process's results and skips, merged in annotation order."""
    mine = items[dist.rank()::dist.world_size()]
    results, skipped = [], []
    for batch, px, bad in _image_batches(_processor(model), mine, opts["batch_size"], opts["progress"], "eval"):
        skipped += bad
        if batch:
            results += [{"index": it["index"], **r} for it, r in zip(batch, step(px, batch))]
    by_index = (lambda r: r["index"])
    return sorted(_gather_items(results), key=by_index), sorted(_gather_items(skipped), key=by_index), None


def _caption(model, items, opts):
    def step(px, batch):
        caps = model.caption(px, prompt=opts["prompt"], **opts["generation"])
        return [{"image_id": it["id"], "caption": c, "image": it["image"], "references": it["references"]}
                for it, c in zip(batch, caps)]
    return run_batched(model, items, opts, step)


def _score_caption(results, _, opts) -> dict:
    return metrics.caption_scores({r["image_id"]: r["caption"] for r in results},
                                  {r["image_id"]: r["references"] for r in results})


def _vqa(model, items, opts):
    def step(px, batch):
        questions = [pre_question(it["question"]) if opts["clean_questions"] else it["question"] for it in batch]
        answers = model.answer(px, questions, template=opts["template"], **opts["generation"])
        return [{"question_id": it["id"], "answer": a, "image": it["image"], "question": it["question"],
                 "gt_answers": it["answers"], "question_type": it["question_type"], "answer_type": it["answer_type"],
                 "score": metrics.vqa_item_score(a, it["answers"], opts["normalize_answers"])}
                for it, a in zip(batch, answers)]
    return run_batched(model, items, opts, step)


def _score_vqa(results, _, opts) -> dict:
    by = {r["question_id"]: r for r in results}
    m = metrics.vqa_scores({k: r["answer"] for k, r in by.items()}, {k: r["gt_answers"] for k, r in by.items()},
                           {k: r["question_type"] for k, r in by.items()}, {k: r["answer_type"] for k, r in by.items()},
                           normalize_answers=opts["normalize_answers"])
    del m["per_item"]  # already in the predictions
    return m


def _choice(model, items, opts):
    def step(px, batch):
        prompts = [it["prompt"] if isinstance(it["prompt"], str) else opts["template"].format(it["question"])
                   for it in batch]
        scores = choice_scores(model, px, prompts, [it["choices"] for it in batch], opts["batch_size"])
        return [{"id": it["id"], "image": it["image"], "prompt": p, "choices": it["choices"], "answer": it["answer"],
                 "prediction": _argmax(s[opts["reduce"]]), "scores_sum": s["sum"], "scores_mean": s["mean"]}
                for it, p, s in zip(batch, prompts, scores)]
    return run_batched(model, items, opts, step)


def _score_choice(results, _, opts) -> dict:
    acc = {red: 100.0 * sum(_argmax(r[f"scores_{red}"]) == r["answer"] for r in results) / len(results)
           for red in ("sum", "mean")}
    return {"accuracy": acc[opts["reduce"]], "accuracy_sum": acc["sum"], "accuracy_mean": acc["mean"],
            "ranked_by": opts["reduce"], "count": len(results)}


def _retrieval(model, items, opts):
    proc = _processor(model)
    readable = [_opens(it["image"]) for it in items]  # a missing or non-image file drops the image and its captions
    ok = [it for it, r in zip(items, readable) if r]
    skipped = [{"index": it["index"], "id": it["id"], "image": it["image"],
                "reason": "not a readable image file" if Path(it["image"]).exists() else "image file not found"}
               for it, r in zip(items, readable) if not r]
    if not ok:
        raise ValueError("retrieval: none of the images can be read")
    texts = [c for it in ok for c in it["captions"]]
    txt2img = [i for i, it in enumerate(ok) for _ in it["captions"]]
    img2txt = [[j for j, i2 in enumerate(txt2img) if i2 == i] for i in range(len(ok))]
    tok = proc.qformer_tokenizer if proc.qformer_tokenizer is not None else proc.tokenizer
    # LAVIS keeps the start of long captions and pads on the right: [CLS] first, positions from 0, whatever the
    # caller's tokenizer is set to (the processor truncates on the left, for prompts)
    sides = tok.truncation_side, tok.padding_side
    tok.truncation_side = tok.padding_side = "right"
    try:
        enc = tok([pre_caption(t) for t in texts], padding="longest", truncation=True, max_length=35,
                  return_tensors="pt")
    finally:
        tok.truncation_side, tok.padding_side = sides
    bs, size = opts["batch_size"], proc.image_processor.image_size
    rank, world = dist.rank(), dist.world_size()

    def batches():  # score_matrix gives image batch b to process b % W: other processes' batches are not decoded
        for b, s in enumerate(range(0, len(ok), bs)):
            chunk = ok[s:s + bs]
            yield (proc.images([it["image"] for it in chunk]) if b % world == rank
                   else torch.empty(len(chunk), 3, size, size))

    i2t, t2i = score_matrix(model, batches, enc["input_ids"], enc["attention_mask"], k=opts["k"], batch_size=bs,
                            progress=opts["progress"])
    top_t, top_i = min(10, len(texts)), min(10, len(ok))
    preds = {"images": [it["image"] for it in ok], "texts": texts, "img2txt": img2txt, "txt2img": txt2img,
             "i2t_top10": i2t.topk(top_t, dim=1).indices.tolist(), "t2i_top10": t2i.topk(top_i, dim=1).indices.tolist()}
    return preds, skipped, (i2t, t2i)


def _score_retrieval(preds, matrices, opts) -> dict:
    return metrics.recall_at_k(*matrices, preds["img2txt"], preds["txt2img"])


RUNNERS = {"caption": (_caption, _score_caption), "vqa": (_vqa, _score_vqa), "choice": (_choice, _score_choice),
           "retrieval": (_retrieval, _score_retrieval)}


# -------------------------------------------------------------------------------------------- the whole run
def _fmt(v) -> str:
    """Fractions (caption scores) with 4 decimals, percentages with 2."""
    return (f"{v:.4f}" if abs(v) < 10 else f"{v:.2f}") if isinstance(v, float) else "n/a" if v is None else str(v)


def markdown_report(report: dict) -> str:
    """metrics.md: the headline numbers in one table, each breakdown (per question type...) in its own."""
    m = report["metrics"] or {}
    lines = [f"# blip2 eval: {report['task']}", "", f"- model: `{report['model']}`",
             f"- data: {', '.join(f'`{d}`' for d in report['data'])}",
             f"- evaluated {report['evaluated']} of {report['items']} items; skipped {report['skipped']}", "",
             "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in m.items() if not isinstance(v, dict)]
    for k, v in m.items():
        if isinstance(v, dict):
            lines += ["", f"## {k}", "", "| | value |", "|---|---|"] + [f"| {a} | {_fmt(b)} |" for a, b in v.items()]
    lines += [f"\n{k}: {note}" for k, note in report["notes"].items()]
    return "\n".join(lines) + "\n"


def evaluate(task: str, model, data: str | Sequence[str], images: str | None = None, output: str | None = None,
             batch_size: int = 16, generation: dict | None = None, prompt: str | None = None,
             template: str | None = None, k: int = 128, reduce: str = "sum", normalize_answers: bool = False,
             clean_questions: bool = True, limit: int | None = None, progress: bool = True,
             model_name: str | None = None) -> dict | None:
    """Run one benchmark end to end. Process 0 returns the report that metrics.json holds: {"task", "model",
    "data", "processes", "items", "evaluated", "skipped" (a count), "skipped_items" ({"index", "id", "image",
    "reason"}), "metrics", "generation", "notes", "seconds"} and, with `output`, writes predictions.json (before
    the metrics: a metric failure loses no predictions), metrics.json and metrics.md there; others return None.

    images: the folder image names are relative to (default: the annotation file's). generation: overrides of
    generation_defaults. prompt: caption prompt (e.g. "a photo of"); template: VQA / choice question template.
    k: retrieval re-ranking depth. reduce: choice ranking by the "sum" (the original's, LAVIS `_predict_class`)
    or the "mean" token log-probability (both are reported). normalize_answers: normalise VQA human answers
    fully (raw answers), not only as the official tool does. clean_questions: VQA questions lower-cased with
    `. ! " ( ) * # : ; ~` removed (`pre_question`), as the original's eval text processor (`blip_question`) and
    our VQA training data; the predictions keep the question as written. limit: first N entries.
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose one of {TASKS}")
    if reduce not in ("sum", "mean"):
        raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
    t0 = time.perf_counter()
    paths = [str(p) for p in as_list(data)]
    if not paths or (task != "vqa" and len(paths) != 1):
        raise ValueError(f"the {task} task reads one annotation file (vqa: or two), got {len(paths)}")
    root = Path(images) if images is not None else Path(paths[0]).parent
    tabled = read_table_data(task, paths[0]) if len(paths) == 1 and task in TABLE_COLUMNS else None
    items, skipped = tabled if tabled is not None else READERS[task](paths if task == "vqa" else paths[0], root)
    if limit is not None:
        items, skipped = [it for it in items if it["index"] < limit], [s for s in skipped if s["index"] < limit]
    n_items = len(items) + len(skipped)
    if not items:
        raise ValueError(f"{', '.join(paths)}: no usable entries ({len(skipped)} skipped"
                         + (f", e.g. {skipped[0]['reason']})" if skipped else ")"))
    gen = {**generation_defaults(task, model.cfg.is_encoder_decoder), **(generation or {})}
    opts = {"batch_size": batch_size, "progress": progress, "generation": gen, "prompt": prompt,
            "template": template or VQA_TEMPLATE, "k": k, "reduce": reduce, "normalize_answers": normalize_answers,
            "clean_questions": clean_questions}
    run, score = RUNNERS[task]
    was_training = model.training
    model.eval()
    try:
        predictions, bad, extra = run(model, items, opts)
    finally:
        model.train(was_training)
    if dist.rank() != 0:
        return None
    skipped = sorted(skipped + bad, key=lambda s: s["index"])
    evaluated = len(predictions["images"]) if task == "retrieval" else len(predictions)
    out = Path(output) if output is not None else None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "predictions.json").write_text(json.dumps(predictions, indent=1))
    scores = score(predictions, extra, opts) if evaluated else None
    report = {"task": task, "model": model_name or model.cfg.architecture, "data": paths,
              "processes": dist.world_size(), "items": n_items, "evaluated": evaluated, "skipped": len(skipped),
              "skipped_items": skipped, "metrics": scores, "generation": gen or None,
              "notes": {"SPICE": metrics.SPICE_NOTE} if task == "caption" else {},
              "seconds": round(time.perf_counter() - t0, 2)}
    if out is not None:
        (out / "metrics.json").write_text(json.dumps(report, indent=2))
        (out / "metrics.md").write_text(markdown_report(report))
    return report
