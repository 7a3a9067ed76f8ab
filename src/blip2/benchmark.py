"""One benchmark run under its paper protocol (blip2.protocols), resumable and cached.

    report = run_benchmark("vqav2", model, ["questions.json", "annotations.json"], "coco/", output="runs/eval/vqav2")

The official files are read by blip2.benchmark_files; prompts come from protocols.build_prompt; generation from the
protocol's settings for the model's architecture (overridable); the runners batch through
blip2.evaluation.run_batched. Each finished batch is appended (one JSON line, fsynced) to
OUTPUT/cache/<key>.jsonl, key = hash(model fingerprint, protocol, generation settings, prompt): a killed run
resumes where it stopped, and a rerun with the same settings returns at once. Writes predictions.json (the
benchmark's official result format), metrics.json and metrics.md.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from pathlib import Path
from typing import Sequence

import torch

from . import dist, metrics, protocols
from .annotations import as_list
from .benchmark_files import read
from .evaluation import RUNNERS, choice_scores, markdown_report, run_batched
from .files import write_text_atomic


def model_fingerprint(model) -> str:
    """sha256 over the config and, per tensor, its name, shape and float64 sum and sum of squares."""
    h = hashlib.sha256(json.dumps(model.cfg.to_dict(), sort_keys=True, default=str).encode())
    with torch.no_grad():
        for name, t in model.state_dict().items():
            x = t.detach().double()
            h.update(f"{name}{tuple(t.shape)}{x.sum().item():.17g}{(x * x).sum().item():.17g}".encode())
    return h.hexdigest()[:20]


def _arch(model) -> tuple[str, str]:
    cfg = model.cfg
    return cfg.architecture, protocols.architecture_key(cfg.architecture, cfg.is_encoder_decoder)


# ---------------------------------------------------------------------------------------------- the cache
def _complete_lines(path: Path) -> tuple[str, list[str]]:
    """(the file's text, its lines that parse as JSON): a line torn by a kill does not."""
    text, good = (path.read_text() if path.exists() else ""), []
    for line in text.splitlines():
        try:
            json.loads(line)
        except json.JSONDecodeError:
            continue
        good.append(line)
    return text, good


class BatchLog:
    """Finished batches as JSON lines, one per batch; a torn line's batch is redone."""

    def __init__(self, path: Path, others: Sequence[Path] = ()):
        """others: the logs of the other processes (read, never written), so every process skips the same items."""
        self.path = path
        self.done: dict = {}
        for other in others:
            for line in _complete_lines(other)[1]:
                self.done.update({str(r["id"]): r for r in json.loads(line)})
        text, good = _complete_lines(path)
        for line in good:
            self.done.update({str(r["id"]): r for r in json.loads(line)})
        if text != "".join(f"{line}\n" for line in good):  # drop the torn line before appending after it
            write_text_atomic(path, "".join(f"{line}\n" for line in good))

    def append(self, records: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(records) + "\n")
            f.flush()
            os.fsync(f.fileno())


def _postprocess(answers: list[str], lemmatize: bool, notes: dict) -> list[str]:
    answers = [a.strip() for a in answers]
    if not lemmatize:
        return answers
    try:  # deferred: spaCy is optional; the original lemmatises OK-VQA answers with en_core_web_sm
        import spacy
        nlp = spacy.load("en_core_web_sm")
    except (ImportError, OSError):
        notes["lemmatize"] = ("answers not lemmatised: spaCy with en_core_web_sm is not installed (the protocol "
                              "lemmatises nouns and verbs; scores can be lower than the paper's)")
        return answers
    return [" ".join(t.lemma_ if t.pos_ in ("NOUN", "VERB") else t.text for t in nlp(a)) for a in answers]


# ------------------------------------------------------------------------------------------------- video
def sample_frames(path, n: int = 4) -> list:
    """`n` frames of a video as PIL images at indices arange(0, L, L / n) (LAVIS lavis/datasets/data_utils.py
    load_video, sampling "uniform"), decoded with PyAV."""
    try:  # deferred: PyAV is optional (the `eval` extra)
        import av
    except ImportError as e:
        raise ImportError(f"video benchmarks need PyAV (pip install 'blip2[eval]'): {e}") from None
    try:
        with av.open(str(path)) as c:
            length = c.streams.video[0].frames or sum(1 for _ in c.decode(video=0))
        n = min(n, length)
        want = {int(i * (length / n)) for i in range(n)}  # as numpy.arange(0, length, length / n)
        with av.open(str(path)) as c:
            frames = [f.to_image() for i, f in enumerate(c.decode(video=0)) if i in want]
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"{path}: not a readable video ({e})") from None
    if not frames:
        raise ValueError(f"{path}: no video frames")
    return frames


def _video_batches(model, items: list[dict], batch_size: int, n_frames: int = 4):
    """(items, pixels [b, F, 3, S, S], skipped) per batch; unreadable videos are skipped. Videos with fewer than
    F frames repeat their last one (the Q-Former sees F frames per video)."""
    ip = model.need_processor().image_processor
    for s in range(0, len(items), batch_size):
        ok, px, bad = [], [], []
        for it in items[s:s + batch_size]:
            try:
                frames = sample_frames(it["video"], n_frames)
            except (ValueError, OSError) as e:
                bad.append({"index": it["index"], "id": it["id"], "image": it["video"], "reason": str(e)})
                continue
            frames += frames[-1:] * (n_frames - len(frames))
            ok.append(it)
            px.append(torch.stack([ip.preprocess_one(f) for f in frames]))  # (F, 3, S, S)
        yield ok, (torch.stack(px).to(model.device) if px else None), bad


def _run_video(model, items, opts, step):
    results, skipped = [], []
    for batch, px, bad in _video_batches(model, items, opts["batch_size"]):
        skipped += bad
        if batch:
            results += [{"index": it["index"], **r} for it, r in zip(batch, step(px, batch))]
    return results, skipped, None


def _generate(model, px, prompts, gen):
    if all(p == "" for p in prompts):
        return model.caption(px, **gen)
    return model.instruct(px, list(prompts), **gen)


def _step(protocol, model, arch: str, gen: dict, opts: dict, notes: dict):
    kind = protocol.kind

    def step(px, batch):
        prompts = [protocols.build_prompt(protocol, arch, it) for it in batch]
        out = [{"id": it["id"], "prompt": p} for it, p in zip(batch, prompts)]
        if kind in ("caption", "vqa", "aokvqa", "video-qa"):
            texts = _generate(model, px, prompts, gen)
            texts = [t.strip() for t in texts] if kind == "caption" else _postprocess(texts, protocol.lemmatize, notes)
            for o, t in zip(out, texts):
                o["caption" if kind == "caption" else "answer"] = t
        if kind in ("choice", "aokvqa", "binary"):
            choice_prompts = prompts
            if kind == "aokvqa":  # the MC prompt lists the options; the DA prompt above does not
                choice_prompts = [protocols.build_choice_prompt(protocol, arch, it) for it in batch]
                for o, p in zip(out, choice_prompts):
                    o["choice_prompt"] = p
            cands = [["no", "yes"]] * len(batch) if kind == "binary" else [it["choices"] for it in batch]
            scores = choice_scores(model, px, choice_prompts, cands, opts["batch_size"], qformer_texts=choice_prompts)
            for o, s in zip(out, scores):
                o["scores_sum"] = s["sum"]
                if kind == "binary":  # p(yes) from the two summed log-likelihoods
                    o["proba"] = 1.0 / (1.0 + math.exp(min(max(s["sum"][0] - s["sum"][1], -700.0), 700.0)))
                else:
                    o["prediction"] = max(range(len(s["sum"])), key=s["sum"].__getitem__)
        return out

    return step


# -------------------------------------------------------------------------------------------- the metrics
def _vqa_metrics(protocol, records, items) -> dict | None:
    by = {it["id"]: it for it in items}
    if any(by[r["id"]]["answers"] is None for r in records):
        return None  # VQAv2 test-dev: the submission file is the result
    if protocol.kind == "aokvqa":
        da = [min(1.0, sum(r["answer"] == a for a in by[r["id"]]["answers"]) / 3.0) for r in records
              if not by[r["id"]]["difficult"]]
        mc = [float(r["prediction"] == by[r["id"]]["answer"]) for r in records]
        return {"accuracy": 100.0 * sum(da) / max(len(da), 1), "da_accuracy": 100.0 * sum(da) / max(len(da), 1),
                "mc_accuracy": 100.0 * sum(mc) / len(mc), "da_count": len(da), "count": len(mc)}
    m = metrics.vqa_scores({r["id"]: r["answer"] for r in records}, {r["id"]: by[r["id"]]["answers"] for r in records},
                           {r["id"]: by[r["id"]]["question_type"] for r in records},
                           {r["id"]: by[r["id"]]["answer_type"] for r in records})
    del m["per_item"]
    if protocol.name == "gqa":  # the two GQA type fields ride in question_type / answer_type
        m = {("per_structural_type" if k == "per_question_type" else "per_semantic_type"
              if k == "per_answer_type" else k): v for k, v in m.items()}
    return m


def _score(protocol, records, items, extra) -> dict | None:
    kind = protocol.kind
    if kind in ("vqa", "aokvqa", "video-qa"):
        return _vqa_metrics(protocol, records, items)
    by = {it["id"]: it for it in items}
    if kind == "caption":
        out = metrics.caption_scores({r["id"]: r["caption"] for r in records},
                                     {r["id"]: by[r["id"]]["references"] for r in records})
        if protocol.name == "nocaps":
            for dom in ("in-domain", "near-domain", "out-domain"):
                part = [r for r in records if by[r["id"]]["domain"] == dom]
                if part:
                    s = metrics.caption_scores({r["id"]: r["caption"] for r in part},  # NoCaps: CIDEr per domain
                                               {r["id"]: by[r["id"]]["references"] for r in part}, meteor=False)
                    out[dom] = {k: v for k, v in s.items() if v is not None}
        return out
    if kind == "choice":
        acc = [float(r["prediction"] == by[r["id"]]["answer"]) for r in records]
        return {"accuracy": 100.0 * sum(acc) / len(acc), "count": len(acc), "ranked_by": "sum"}
    if kind == "binary":
        try:  # deferred: scikit-learn is optional (the `eval` extra)
            from sklearn.metrics import roc_auc_score
        except ImportError as e:
            raise ImportError(f"the hatefulmemes AUC needs scikit-learn (pip install 'blip2[eval]'): {e}") from None
        labels, probs = [by[r["id"]]["label"] for r in records], [r["proba"] for r in records]
        auc = float(roc_auc_score(labels, probs)) * 100.0 if len(set(labels)) == 2 else None
        acc = 100.0 * sum((p > 0.5) == bool(y) for p, y in zip(probs, labels)) / len(labels)
        return {"auc": auc, "accuracy": acc, "count": len(labels)}
    raise ValueError(f"no metric for kind {kind!r}")


def official_results(protocol, records) -> list | dict:
    """predictions.json in the benchmark's own result format (protocol.result_format)."""
    name, kind = protocol.name, protocol.kind
    if kind == "caption":
        return [{"image_id": r["id"], "caption": r["caption"]} for r in records]
    if name == "gqa":
        return [{"questionId": r["id"], "prediction": r["answer"]} for r in records]
    if name == "vizwiz":
        return [{"image": r["id"], "answer": r["answer"]} for r in records]
    if kind == "aokvqa":
        return {r["id"]: {"direct_answer": r["answer"], "multiple_choice": r["choice"]} for r in records}
    if kind == "choice":
        return [{"pid": r["id"], "prediction": r["prediction"]} for r in records]
    if kind == "binary":
        return [{"id": r["id"], "proba": r["proba"], "label": int(r["proba"] > 0.5)} for r in records]
    return [{"question_id": r["id"], "answer": r["answer"]} for r in records]


# ------------------------------------------------------------------------------------------------ retrieval
def _retrieval(model, items: list[dict], n_rows: int, opts: dict, fold_size: int, notes: dict):
    """(records, skipped, recalls) over the whole test split and, with fold_size, the recalls averaged over folds:
    the rows in file order cut into folds of fold_size (COCO 1k: 5 folds of 1000 images), each fold its own
    gallery (ITC, then ITM re-ranking of the fold's own top k), so a fold's numbers are those of a run on it alone.
    n_rows: the split's rows before skipping (fold f holds the rows with index in [f*size, (f+1)*size))."""
    if fold_size < 0:
        raise ValueError(f"fold_size must be >= 0 (0: no folds), got {fold_size}")
    run, score = RUNNERS["retrieval"]
    opts = {**opts, "k": 128}  # k_test of LAVIS projects/blip2/eval/ret_*_eval.yaml
    records, bad, extra = run(model, items, opts)
    recalls = score(records, extra, opts)
    n_folds = n_rows // fold_size if fold_size else 0
    if fold_size and not n_folds:
        notes["folds"] = f"{n_rows} images: fewer than one fold of {fold_size}; no fold-averaged recall"
    elif fold_size and n_rows % fold_size:
        notes["folds"] = f"the last {n_rows % fold_size} of {n_rows} images are in no fold of {fold_size}"
    per_fold = []
    for f in range(n_folds):
        fold = [it for it in items if f * fold_size <= it["index"] < (f + 1) * fold_size]
        fold_records, _, fold_extra = run(model, fold, opts)  # its unreadable images are in `bad` already
        per_fold.append(score(fold_records, fold_extra, opts))
    if per_fold:
        recalls[f"folds_of_{fold_size}"] = {**{key: sum(r[key] for r in per_fold) / n_folds for key in per_fold[0]},
                                           "folds": n_folds}
    return records, bad, recalls


# ------------------------------------------------------------------------------------------------ the run
def run_benchmark(name: str, model, data: str | Sequence[str], images: str | None = None, output: str | None = None,
                  batch_size: int = 16, generation: dict | None = None, limit: int | None = None,
                  progress: bool = True, model_name: str | None = None, fold_size: int | None = None) -> dict | None:
    """Evaluate `model` on benchmark `name` (blip2.protocols.PROTOCOLS); process 0 returns the report
    metrics.json holds. generation: overrides of the protocol's settings. limit: the first N entries.
    fold_size: retrieval, images per fold of the fold-averaged breakdown (default: the protocol's; 0: none)."""
    protocol = protocols.get(name)
    t0 = time.perf_counter()
    paths = [str(p) for p in as_list(data)]
    root = Path(images) if images is not None else Path(paths[0]).parent
    items, skipped = read(protocol.reader, paths, root)
    if limit is not None:
        items, skipped = [it for it in items if it["index"] < limit], [s for s in skipped if s["index"] < limit]
    n_rows = len(items) + len(skipped)
    if not items:
        raise ValueError(f"{', '.join(paths)}: no usable entries for {name} ({len(skipped)} skipped)")
    architecture, arch = (model.cfg.architecture, None) if protocol.kind == "retrieval" else _arch(model)
    gen = {**protocol.settings(arch), **(generation or {})} if arch else {}
    notes: dict = {}
    size = model.need_processor().image_processor.image_size
    if size != protocol.image_size:
        notes["image_size"] = f"the protocol uses {protocol.image_size} px images; this model's processor {size} px"
    opts = {"batch_size": batch_size, "progress": progress}
    was_training = model.training
    model.eval()
    try:
        if protocol.kind == "retrieval":
            size = protocol.fold_size if fold_size is None else fold_size
            records, bad, scores = _retrieval(model, items, n_rows, opts, size, notes)
            results = records
        else:
            key = hashlib.sha256(json.dumps([model_fingerprint(model), name, gen, protocol.prompts, paths],
                                            sort_keys=True, default=str).encode()).hexdigest()[:16]
            out_dir = Path(output) if output is not None else Path("runs/eval") / name
            world = dist.world_size()
            names = [out_dir / "cache" / f"{key}{'' if world == 1 else f'.rank{r}'}.jsonl" for r in range(world)]
            log = BatchLog(names[dist.rank()], [n for r, n in enumerate(names) if r != dist.rank()])
            todo = [it for it in items if str(it["id"]) not in log.done]
            step = _step(protocol, model, architecture, gen, opts, notes)

            def logged(px, batch):
                res = step(px, batch)
                log.append(res)
                return res

            run = _run_video if protocol.kind == "video-qa" else run_batched
            if protocol.kind == "video-qa" and dist.world_size() > 1:
                raise ValueError(f"{name}: video benchmarks run in one process")
            new, bad, _ = run(model, todo, opts, logged) if todo else ([], [], None)
            cached = [{**log.done[str(it["id"])], "index": it["index"]} for it in items if str(it["id"]) in log.done]
            records = sorted(cached + new, key=lambda r: r["index"])
            if protocol.kind == "aokvqa":
                by = {it["id"]: it for it in items}
                for r in records:
                    r["choice"] = by[r["id"]]["choices"][r["prediction"]]
            scores = _score(protocol, records, items, None) if records else None
            results = official_results(protocol, records)
    finally:
        model.train(was_training)
    if dist.rank() != 0:
        return None
    skipped = sorted(skipped + bad, key=lambda s: s["index"])
    report = {"task": name, "benchmark": name, "model": model_name or architecture, "architecture_key": arch,
              "data": paths, "processes": dist.world_size(), "items": n_rows - len(bad),
              "evaluated": len(records) if protocol.kind != "retrieval" else len(records["images"]),
              "skipped": len(skipped), "skipped_items": skipped, "metrics": scores, "generation": gen or None,
              "prompt": protocol.prompts.get(architecture), "notes": notes,
              "published": [vars(p) for p in protocol.published], "seconds": round(time.perf_counter() - t0, 2)}
    if output is not None:
        out = Path(output)
        out.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out / "predictions.json", json.dumps(results, indent=1))
        write_text_atomic(out / "metrics.json", json.dumps(report, indent=2))
        write_text_atomic(out / "metrics.md", markdown_report(report))
    return report
