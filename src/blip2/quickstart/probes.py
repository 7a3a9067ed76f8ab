"""Linear probes: how much scene information a representation carries, stage by stage.

The quickstart's captions and answers can be wrong because the image encoder never saw a detail, because the
Q-Former dropped it, or because the LLM could not read it off the queries. A linear probe tells these apart: a
linear classifier is trained on one representation of the training scenes and scored on held-out scenes, for
four kinds of scene information (`scene_labels`): which colours are present, which shapes, which (colour, shape)
pairs (binding: "a red circle and a blue square" vs "a blue circle and a red square"), and how many objects.
Comparing the pixels (8x8 average-pooled), the frozen encoder's tokens and each model's Q-Former queries shows
where information is lost: a label the encoder row decodes and a queries row does not is lost in the Q-Former.
Answer probes (`answer_probe_report`) ask the same of the LLM: a probe from the final model's queries, given
each VQA question in the Q-Former as InstructBLIP answers it, to the answer; where the model's own answers fall
below the probe, the LLM does not read what the Q-Former hands it.

A probe is an L2-regularised logistic (multi-label: one sigmoid per label) or softmax regression on features
standardised with the training set's statistics, fit full-batch by L-BFGS; the L2 weight is chosen on a held-out
fifth of the training scenes, never on the test scenes. Multi-label sets are scored by exact-set accuracy (a
scene counts only if its whole predicted set is right); `chance_accuracy` is the score of always predicting the
training set's most frequent set or class.
"""

from __future__ import annotations

import contextlib
import gc
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..api import load
from ..data.shapes import COLOURS, SHAPES, Scene
from ..prompts import CAPTION_INSTRUCTION, VQA_TEMPLATE, pre_question
from .tables import pct, table

LABELS = ("colours", "shapes", "pairs", "count")
MULTILABEL = {"colours": True, "shapes": True, "pairs": True, "count": False}
L2_GRID = (1e-4, 1e-3, 1e-2)


# -------------------------------------------------------------------------------------------------- labels
def scene_labels(scenes: list[Scene]) -> dict[str, np.ndarray]:
    """colours [N, 6], shapes [N, 4], pairs [N, 24] (index colour * 4 + shape) as 0/1 float32 multi-hot rows,
    in the order of shapes.COLOURS / SHAPES; count [N] int64 class index (1..3 objects -> 0..2)."""
    colours = list(COLOURS)
    n = len(scenes)
    out = {"colours": np.zeros((n, len(colours)), np.float32), "shapes": np.zeros((n, len(SHAPES)), np.float32),
           "pairs": np.zeros((n, len(colours) * len(SHAPES)), np.float32), "count": np.zeros(n, np.int64)}
    for i, scene in enumerate(scenes):
        for o in scene.objects:
            c, s = colours.index(o.colour), SHAPES.index(o.shape)
            out["colours"][i, c] = out["shapes"][i, s] = out["pairs"][i, c * len(SHAPES) + s] = 1
        out["count"][i] = len(scene.objects) - 1
    return out


# ---------------------------------------------------------------------------------------------- scoring
def exact_set_accuracy(probs, targets) -> float:
    """% of rows whose predicted set (probability > 0.5) equals the true set (targets 0/1) exactly."""
    pred, true = torch.as_tensor(probs) > 0.5, torch.as_tensor(targets) > 0.5
    return 100.0 * (pred == true).all(dim=1).float().mean().item()


def chance_accuracy(train_y, test_y, multilabel: bool) -> float:
    """% of test rows equal to the training set's most frequent label set (multi-label) or class."""
    train_y, test_y = np.asarray(train_y), np.asarray(test_y)
    values, counts = np.unique(train_y, axis=0 if multilabel else None, return_counts=True)
    top = values[counts.argmax()]
    hit = (test_y == top).all(axis=1) if multilabel else test_y == top
    return 100.0 * float(hit.mean())


# ----------------------------------------------------------------------------------------------- probes
def _standardise(train: torch.Tensor, *others: torch.Tensor) -> list[torch.Tensor]:
    """Every set scaled with the training set's per-feature mean and std (constant features become 0)."""
    mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
    return [(x - mean) / std for x in (train, *others)]


def _loss(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    """Mean over scenes; multi-label: the sum over labels, so each label is its own logistic regression."""
    if multilabel:
        return F.binary_cross_entropy_with_logits(logits, y, reduction="sum") / len(y)
    return F.cross_entropy(logits, y)


def _start(y: torch.Tensor, multilabel: bool, k: int, d: int) -> tuple[torch.Tensor, torch.Tensor]:
    """W = 0 and the bias at the training label frequencies (log-odds / log-priors): a deterministic start."""
    freq = (y.mean(0) if multilabel else torch.bincount(y, minlength=k).float() / len(y)).clamp(1e-3, 1 - 1e-3)
    bias = freq.log() - (-freq).log1p() if multilabel else freq.log()
    return torch.zeros(d, k), bias


def _preconditioners(x: torch.Tensor, l2_grid) -> dict[float, torch.Tensor]:
    """{l2: the Cholesky factor L of X^T X / N + 8 l2 I} (computed in float64). One model's features are strongly
    correlated, so plain L-BFGS on W needs thousands of steps; solving for G with W = L^-T G is the same problem
    (the same minimum: the penalty still acts on W), but its Hessian at p = 1/2 (logistic curvature 1/4) is I/4."""
    cov = (x.T @ x).double() / len(x)  # (d, d)
    eye = torch.eye(len(cov), dtype=cov.dtype)
    return {l2: torch.linalg.cholesky(cov + 8 * l2 * eye).float() for l2 in l2_grid}


def _fit(x: torch.Tensor, y: torch.Tensor, multilabel: bool, l2: float, L: torch.Tensor, start, max_iter: int):
    """Full-batch L-BFGS on loss + l2 * ||W||^2 (the bias is not penalised) from `start` = (W, b), in the
    preconditioned variable G = L^T W. Deterministic. Returns (W [d, k], b [k])."""
    G = (L.T @ start[0]).requires_grad_()
    b = start[1].clone().requires_grad_()
    opt = torch.optim.LBFGS([G, b], lr=1, max_iter=max_iter, history_size=20, tolerance_grad=1e-5,
                            tolerance_change=1e-6, line_search_fn="strong_wolfe")

    def weights():
        return torch.linalg.solve_triangular(L.T, G, upper=True)  # W = L^-T G, (d, k)

    def closure():
        opt.zero_grad()
        W = weights()
        loss = _loss(x @ W + b, y, multilabel) + l2 * W.square().sum()  # (N, d) @ (d, k) -> (N, k)
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return weights(), b.detach()


def _accuracy(x, W, b, y, multilabel: bool) -> float:
    logits = x @ W + b
    if multilabel:
        return exact_set_accuracy(torch.sigmoid(logits), y)
    return 100.0 * (logits.argmax(1) == y).float().mean().item()


def _prepare(train_x, test_x, l2_grid=L2_GRID) -> tuple[torch.Tensor, torch.Tensor, dict[float, torch.Tensor]]:
    """What the probes of one representation share: the standardised train / test features (fp32, CPU) and the
    preconditioners, which come from the training features alone (no labels) and serve both fits of an l2."""
    train_x, test_x = (torch.as_tensor(x, dtype=torch.float32).cpu() for x in (train_x, test_x))
    train_x, test_x = _standardise(train_x, test_x)
    return train_x, test_x, _preconditioners(train_x, l2_grid)


def _probe(prepared, train_y, test_y, multilabel: bool, max_iter: int = 200, val_fraction: float = 0.2,
           seed: int = 0) -> float:
    """linear_probe on `_prepare`d features."""
    train_x, test_x, factors = prepared
    dtype = torch.float32 if multilabel else torch.long
    train_y, test_y = (torch.as_tensor(y).to(dtype).cpu() for y in (train_y, test_y))
    if len(train_x) != len(train_y) or len(test_x) != len(test_y):
        raise ValueError(f"features and labels differ in length: train {len(train_x)} vs {len(train_y)}, "
                         f"test {len(test_x)} vs {len(test_y)}")
    k = train_y.shape[1] if multilabel else int(max(train_y.max(), test_y.max())) + 1
    perm = torch.randperm(len(train_x), generator=torch.Generator().manual_seed(seed))
    n_val = max(1, round(val_fraction * len(train_x)))
    val, fit = perm[:n_val], perm[n_val:]
    best, chosen, start = -1.0, None, _start(train_y, multilabel, k, train_x.shape[1])
    # strongest first: a tie keeps the stronger regularisation, and each fit starts from the previous solution
    for l2 in sorted(factors, reverse=True):
        start = _fit(train_x[fit], train_y[fit], multilabel, l2, factors[l2], start, max_iter)
        acc = _accuracy(train_x[val], *start, train_y[val], multilabel)
        if acc > best:
            best, chosen = acc, (l2, factors[l2], start)
    W, b = _fit(train_x, train_y, multilabel, *chosen, max_iter)  # the refit starts from the split's solution
    return _accuracy(test_x, W, b, test_y, multilabel)


def linear_probe(train_x, train_y, test_x, test_y, multilabel: bool, l2_grid=L2_GRID, max_iter: int = 200,
                 val_fraction: float = 0.2, seed: int = 0) -> float:
    """Test accuracy (%) of a linear classifier trained on (train_x [N, d], train_y); multi-label y: 0/1 [N, L]
    (sigmoid outputs, exact-set accuracy), else class indices [N] (softmax, accuracy). The L2 weight is the
    value of `l2_grid` scoring best on a seeded `val_fraction` of the training set (ties: the larger); the probe
    is then refit on the whole training set with it. Features are standardised with the training set's mean and
    std. The test set is used for the final score only."""
    return _probe(_prepare(train_x, test_x, l2_grid), train_y, test_y, multilabel, max_iter, val_fraction, seed)


# -------------------------------------------------------------------------------------------- features
@contextlib.contextmanager
def _eval_mode(model):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _batched(model, pixel_values: torch.Tensor, fn, batch_size: int, progress: bool, desc: str) -> torch.Tensor:
    """fn(pixels on the model's device, in its dtype) per batch under no_grad and eval mode -> fp32 CPU rows."""
    out = []
    dtype = model.ln_vision.weight.dtype
    with torch.no_grad(), _eval_mode(model):
        for s in tqdm(range(0, len(pixel_values), batch_size), desc=desc, disable=not progress):
            out.append(fn(pixel_values[s:s + batch_size].to(model.device, dtype)).float().cpu())
    return torch.cat(out)


def load_pixels(model, paths: list, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """Pixel values [N, 3, S, S] (CPU) through the model's processor (`model.pixel_values`, as evaluation)."""
    chunks = tqdm(range(0, len(paths), batch_size), desc="probe images", disable=not progress)
    return torch.cat([model.pixel_values(list(paths[s:s + batch_size])).cpu() for s in chunks])


def pixel_features(pixel_values: torch.Tensor, size: int = 8) -> torch.Tensor:
    """The image average-pooled to size x size: [N, 3, H, W] -> [N, 3 * size * size]."""
    with torch.no_grad():
        return F.adaptive_avg_pool2d(pixel_values.float(), size).flatten(1)


def encoder_features(model, pixel_values: torch.Tensor, batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """The frozen encoder's tokens [B, T, D] (model.vision, before ln_vision) as concat(mean, max) over tokens:
    [N, 2D]."""
    def fn(px):
        tokens = model.vision(px)  # (B, T, D)
        return torch.cat([tokens.mean(1), tokens.amax(1)], dim=1)  # (B, 2D)

    return _batched(model, pixel_values, fn, batch_size, progress, "probe features: encoder")


def query_features(model, pixel_values: torch.Tensor, instruction: str | None = None, batch_size: int = 64,
                   progress: bool = False, desc: str = "probe features: queries") -> torch.Tensor:
    """The Q-Former query outputs [B, Q, H] flattened to [N, Q*H]. `instruction` (InstructBLIP only) enters
    the Q-Former with the queries, tokenised by the model's processor; None: queries alone."""
    ids = mask = None
    if instruction is not None:
        if model.cfg.architecture != "instructblip":
            raise ValueError(f"an instruction enters the Q-Former of an InstructBLIP model only; this model is "
                             f"{model.cfg.architecture!r} (pass instruction=None)")
        ids, mask = model.need_processor().tokenize_qformer([instruction], max_length=model.cfg.qformer_max_text_len)
        ids, mask = ids.to(model.device), mask.to(model.device)  # (1, L), expanded to each batch below

    def fn(px):
        B = len(px)
        q_ids, q_mask = (None, None) if ids is None else (ids.expand(B, -1), mask.expand(B, -1))
        return model.query_features(px, q_ids, q_mask).flatten(1)  # (B, Q, H) -> (B, Q*H)

    return _batched(model, pixel_values, fn, batch_size, progress, desc)


def question_query_features(model, images: list, questions: list[str], template: str = VQA_TEMPLATE,
                            batch_size: int = 64, progress: bool = False) -> torch.Tensor:
    """The query outputs of an InstructBLIP model given each row's own question, flattened: [N, Q*H]. Row i is
    image i (a path) with `template.format(question i)` in the Q-Former, as `model.answer` gives it there; the
    question is cleaned first (`pre_question`, as the quickstart's evaluation does)."""
    if model.cfg.architecture != "instructblip":
        raise ValueError(f"question-conditioned queries need an InstructBLIP model; this one is "
                         f"{model.cfg.architecture!r}")
    if len(images) != len(questions):
        raise ValueError(f"question_query_features: {len(images)} images but {len(questions)} questions")
    proc, out = model.need_processor(), []
    dtype = model.ln_vision.weight.dtype
    with torch.no_grad(), _eval_mode(model):
        for s in tqdm(range(0, len(images), batch_size), desc="probe features: queries given the question",
                      disable=not progress):
            px = model.pixel_values(list(images[s:s + batch_size])).to(model.device, dtype)
            texts = [template.format(pre_question(q)) for q in questions[s:s + batch_size]]
            ids, mask = proc.tokenize_qformer(texts, max_length=model.cfg.qformer_max_text_len)
            ids, mask = ids.to(model.device), mask.to(model.device)
            out.append(model.query_features(px, ids, mask).flatten(1).float().cpu())  # (b, Q*H)
    return torch.cat(out)


def answer_probe_report(world_dir, model_path, test_questions: list[dict], families, max_train: int = 1500,
                        device: str | None = None, batch_size: int = 64, max_iter: int = 200, seed: int = 0,
                        progress: bool = False) -> dict:
    """Does the final model's Q-Former hand the LLM the answer? Per VQA family: a softmax probe from the query
    outputs *given the question* (`question_query_features`) to the answer, trained on up to `max_train` of the
    world's training questions of that family (a seeded sample) and scored on `test_questions` of that family
    (records with "image" (absolute path or relative to `world_dir`), "question", "answer" (a list, the first
    is the label), "question_type"), the questions the model itself is evaluated on. The probe's accuracy
    next to the model's own answers tells what the Q-Former extracts from what the LLM reads off it. Returns
    {"families": {family: {"probe", "majority", "n_train", "n_test"}}, "max_train", "seconds"}."""
    t0 = time.perf_counter()
    world = Path(world_dir)
    model = load(model_path, dtype=torch.float32, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    out = {}
    for fam in families:
        train = json.loads((world / "vqa" / f"train_{fam}.json").read_text())
        train = [train[i] for i in np.random.default_rng(seed).permutation(len(train))[:max_train]]
        test = [r for r in test_questions if r.get("question_type") == fam]
        if not train or not test:
            raise ValueError(f"answer probes: family {fam!r} has {len(train)} training questions in "
                             f"{world / 'vqa' / f'train_{fam}.json'} and {len(test)} test questions")
        answers = {a: i for i, a in enumerate(sorted({r["answer"][0] for r in train + test}))}
        feats = [question_query_features(model, [str(world / r["image"]) for r in rows],
                                         [r["question"] for r in rows], batch_size=batch_size, progress=progress)
                 for rows in (train, test)]
        ys = [np.array([answers[r["answer"][0]] for r in rows]) for rows in (train, test)]
        out[fam] = {"probe": round(_probe(_prepare(*feats), *ys, multilabel=False, max_iter=max_iter), 1),
                    "majority": round(chance_accuracy(*ys, multilabel=False), 1),
                    "n_train": len(train), "n_test": len(test)}
    del model
    gc.collect()
    return {"families": out, "max_train": max_train, "seconds": round(time.perf_counter() - t0, 1)}


# --------------------------------------------------------------------------------------------- report
def _representations(paths: list[str], models: dict, instruction: str, device: str, batch_size: int,
                     progress: bool) -> dict[str, torch.Tensor]:
    """{representation: [N, F] fp32 CPU features of `paths`}: pixels and encoder from the first model, then the
    queries of each model, loaded one at a time (fp32) and released after use."""
    feats: dict[str, torch.Tensor] = {}
    pixels: dict[str, torch.Tensor] = {}  # image processor settings -> pixel values; models usually share one
    for i, (name, path) in enumerate(models.items()):
        model = load(path, dtype=torch.float32, device=device)
        key = repr(model.need_processor().image_processor)
        if key not in pixels:
            pixels[key] = load_pixels(model, paths, batch_size, progress)
        px = pixels[key]
        if i == 0:
            feats["pixels (8x8)"] = pixel_features(px)
            feats["frozen encoder"] = encoder_features(model, px, batch_size, progress)
        text = instruction if model.cfg.architecture == "instructblip" else None
        feats[f"{name} queries"] = query_features(model, px, text, batch_size, progress,
                                                  f"probe features: {name} queries")
        del model
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return feats


def probe_report(world_dir, models: dict, instruction: str = CAPTION_INSTRUCTION, progress: bool = False,
                 device: str | None = None, batch_size: int = 64, max_iter: int = 200) -> dict:
    """Probe every label on the world's train -> test scenes for: the pixels, the frozen encoder (of the first
    model in `models`) and the query outputs of each model ({name: checkpoint directory}); InstructBLIP models
    see `instruction` in the Q-Former; `max_iter`: L-BFGS iterations per probe fit. Returns {"labels",
    "n_train", "n_test", "chance": {label: %}, "rows": {representation: {label: %}}, "seconds"}, percentages
    rounded to 1 decimal."""
    t0 = time.perf_counter()
    if not models:
        raise ValueError("probe_report needs at least one model")
    world = Path(world_dir)
    rows = {s: json.loads((world / "scenes" / f"{s}.json").read_text()) for s in ("train", "test")}
    train, test = (scene_labels([Scene.from_dict(r) for r in rows[s]]) for s in ("train", "test"))
    n_train, n_test = len(rows["train"]), len(rows["test"])
    paths = [str(world / r["image"]) for r in rows["train"] + rows["test"]]  # train then test: split at n_train
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    feats = _representations(paths, models, instruction, device, batch_size, progress)
    chance = {k: round(chance_accuracy(train[k], test[k], MULTILABEL[k]), 1) for k in LABELS}
    scores: dict[str, dict[str, float]] = {rep: {} for rep in feats}
    for rep in tqdm(feats, desc="probes", disable=not progress):
        prepared = _prepare(feats[rep][:n_train], feats[rep][n_train:])  # shared by the four label sets
        for k in LABELS:
            scores[rep][k] = round(_probe(prepared, train[k], test[k], MULTILABEL[k], max_iter=max_iter), 1)
    return {"labels": list(LABELS), "n_train": n_train, "n_test": n_test, "chance": chance, "rows": scores,
            "seconds": round(time.perf_counter() - t0, 1)}


def probe_table(report: dict) -> list[str]:
    """Markdown lines: one row per representation (test accuracy, %; exact-set for multi-label sets), chance
    first."""
    labels = report["labels"]
    body = [["chance (majority set)"] + [pct(report["chance"].get(k)) for k in labels]]
    body += [[rep] + [pct(row.get(k)) for k in labels] for rep, row in report["rows"].items()]
    return table(["representation"] + labels, body)


def answer_probe_table(answers: dict, model_scores: dict | None = None) -> list[str]:
    """Markdown lines: per family, the answer probe on the queries given the question, the model's own answer
    accuracy on the same questions (`model_scores`: {family: %}, optional) and the majority answer's share."""
    scores = model_scores or {}
    body = [[fam, pct(row.get("probe")), pct(scores.get(fam)), pct(row.get("majority")), str(row.get("n_test"))]
            for fam, row in answers["families"].items()]
    return table(["family", "probe on the queries given the question", "the model's answers",
                  "majority answer", "questions"], body)
