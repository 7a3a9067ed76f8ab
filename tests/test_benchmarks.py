"""`blip2 eval --benchmark`: every benchmark on a miniature annotation file in its official format (written from the
format's documentation, with the awkward cases), tiny random checkpoints; prompts against the protocol, metrics
against independent references (the VQA evaluation tool's leave-one-out rule, A-OKVQA's min(1, n/3), pairwise
AUC, pycocoevalcap called directly, exact match)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import blip2
from blip2 import benchmark, cli, protocols
from blip2.benchmark_files import read
from blip2.evaluation import choice_scores
from blip2.metrics import normalize_vqa_answer
from blip2.prompts import pre_question
from fixtures import corpus_lines, make_bert_tokenizer, one_torch_thread, random_pil, sample_image
from hf_models import checkpoint_with_processor, retrieval_hf


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    d = tmp_path_factory.mktemp("b2opt")
    checkpoint_with_processor("blip2-opt", d)
    return blip2.load(d)


@pytest.fixture(scope="module")
def ib(tmp_path_factory):
    d = tmp_path_factory.mktemp("ibt5")
    checkpoint_with_processor("instructblip-t5", d)
    model = blip2.load(d)
    model.cfg.qformer_max_text_len = 48  # the tiny Q-Former has 64 positions; LAVIS truncates too
    return model


def _img(path, k: int = 0):
    path.parent.mkdir(parents=True, exist_ok=True)
    big = sample_image(None)
    big.crop((k * 64, k * 32, k * 64 + 256, k * 32 + 256)).resize((36, 36)).save(path)
    return path


def _w(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return path


def _records(out):
    """Every record of the run's batch log (prompt, answer / caption / scores per item)."""
    lines = [json.loads(x) for f in (out / "cache").glob("*.jsonl") for x in f.read_text().splitlines()]
    return {str(r["id"]): r for batch in lines for r in batch}


def _vqa_reference(pred: str, answers: list[str]) -> float:
    """The VQA evaluation tool: for each human, min(1, matches among the other humans / 3); averaged."""
    pred = normalize_vqa_answer(pred)
    accs = [min(1.0, sum(a == pred for j, a in enumerate(answers) if j != i) / 3) for i in range(len(answers))]
    return sum(accs) / len(accs)


# -------------------------------------------------------------------------------------------- protocols
def test_generation_defaults_equal_the_original():
    # blip2_opt.py / blip2_t5.py generate: 5 beams, max 30, min 1; *_instruct.py: 256 / 1, repetition 1.5
    g = protocols.ORIGINAL_GENERATE
    assert g["instructblip-vicuna"] == {"num_beams": 5, "max_new_tokens": 256, "min_new_tokens": 1,
                                        "length_penalty": 1.0, "repetition_penalty": 1.5,
                                        "repetition_context": "generated"}
    assert g["instructblip-t5"]["min_new_tokens"] == 0  # T5 min_length counts the decoder start token
    assert g["blip2-opt"]["repetition_penalty"] == 1.0 and g["blip2-t5"]["max_new_tokens"] == 30
    a = protocols.ORIGINAL_ANSWER  # predict_answers: 10 / 1, length penalty 0 (OPT) / -1 (T5)
    assert a["blip2-opt"]["length_penalty"] == 0.0 and a["blip2-t5"]["length_penalty"] == -1.0
    assert a["instructblip-vicuna"]["repetition_penalty"] == 1.5 and a["blip2-opt"]["min_new_tokens"] == 1
    assert protocols.original_generation(blip2.Blip2Config.from_preset("tiny-t5"), "answer") == a["blip2-t5"]
    assert protocols.original_generation(blip2.Blip2Config.from_preset("tiny-llama-instruct")) == \
        g["instructblip-vicuna"]
    coco = protocols.get("coco-caption").generation  # caption_coco_opt*_eval.yaml 5 beams 30 / 8
    assert coco["blip2-opt"]["max_new_tokens"] == 30 and coco["blip2-opt"]["min_new_tokens"] == 8
    assert coco["blip2-t5"]["min_new_tokens"] == 7
    assert protocols.get("msvd-qa").generation["instructblip-vicuna"]["max_new_tokens"] == 30
    assert set(protocols.PROTOCOLS) == {
        "coco-caption", "nocaps", "flickr30k-caption", "vqav2", "okvqa", "aokvqa", "gqa", "vizwiz", "textvqa",
        "scienceqa-img", "iconqa", "hatefulmemes", "msvd-qa", "msrvtt-qa", "flickr30k-retrieval", "coco-retrieval"}
    assert all(p.sources for p in protocols.PROTOCOLS.values())


def test_eval_list(capsys):
    assert cli.main(["eval", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {name} |" in out for name in protocols.PROTOCOLS)


def test_repetition_context_generated_penalises_only_new_tokens(opt):
    """With a prompt, "generated" differs from transformers' "prompt+generated" once the penalty is strong."""
    px = opt.processor.images([sample_image(36)])
    kw = {"num_beams": 1, "max_new_tokens": 6, "repetition_penalty": 50.0}
    a = opt.generate(px, *opt.processor.tokenize_prompts(["a a a a a a"]), **kw)
    b = opt.generate(px, *opt.processor.tokenize_prompts(["a a a a a a"]), repetition_context="generated", **kw)
    c = opt.generate(px, *opt.processor.tokenize_prompts(["a a a a a a"]), repetition_context="generated",
                     **{**kw, "repetition_penalty": 1.0})
    assert len(set(b[0].tolist())) == b.shape[1]  # no new token repeats
    assert a.shape[1] == 6 and c.shape[1] == 6 and not torch.equal(a, c)
    with pytest.raises(ValueError, match="repetition_context"):
        opt.generate(px, repetition_context="both")


# ------------------------------------------------------------------------------------------------- VQA
def _vqav2(tmp_path, subtype="val2014", with_answers=True):
    root = tmp_path / "coco"
    img_sub = subtype.replace("test-dev", "test")
    for i in (1, 2):
        _img(root / img_sub / f"COCO_{img_sub}_{i:012d}.jpg", i)
    qs = {"data_subtype": subtype, "questions": [
        {"question_id": 10, "image_id": 1, "question": "What COLOR is the Cat?"},
        {"question_id": 11, "image_id": 2, "question": "How many dogs are there?"},
        {"question_id": 12, "image_id": 2, "question": "Is it sunny?"}]}
    files = [_w(tmp_path / "q.json", qs)]
    if with_answers:
        def ans(*xs):
            return [{"answer": x, "answer_confidence": "yes", "answer_id": j + 1} for j, x in enumerate(xs)]
        anns = {"annotations": [
            {"question_id": 10, "image_id": 1, "question_type": "what color", "answer_type": "other",
             "answers": ans(*["black"] * 4, *["white"] * 6)},
            {"question_id": 11, "image_id": 2, "question_type": "how many", "answer_type": "number",
             "answers": ans(*["2"] * 9, "3")},
            {"question_id": 12, "image_id": 2, "question_type": "is it", "answer_type": "yes/no",
             "answers": ans(*["yes"] * 10)}]}
        files.append(_w(tmp_path / "a.json", anns))
    return files, root, qs


@pytest.mark.parametrize("name", ["vqav2", "okvqa"])
def test_vqav2_okvqa(opt, tmp_path, name):
    files, root, qs = _vqav2(tmp_path)
    out = tmp_path / "out"
    rep = benchmark.run_benchmark(name, opt, files, root, output=out, batch_size=2, progress=False)
    recs = _records(out)
    for q in qs["questions"]:
        assert recs[str(q["question_id"])]["prompt"] == f"Question: {pre_question(q['question'])} Short answer:"
    assert recs["10"]["prompt"] == "Question: what color is the cat? Short answer:"  # LAVIS keeps "?"
    gts = {10: ["black"] * 4 + ["white"] * 6, 11: ["2"] * 9 + ["3"], 12: ["yes"] * 10}
    ref = 100 * sum(_vqa_reference(recs[str(k)]["answer"], v) for k, v in gts.items()) / 3
    assert rep["metrics"]["accuracy"] == pytest.approx(ref)
    assert set(rep["metrics"]["per_answer_type"]) == {"other", "number", "yes/no"}
    preds = json.loads((out / "predictions.json").read_text())
    assert [p["question_id"] for p in preds] == [10, 11, 12] and set(preds[0]) == {"question_id", "answer"}
    assert rep["generation"] == protocols.get(name).generation["blip2-opt"]
    assert ("lemmatize" in rep["notes"]) == (name == "okvqa")  # spaCy is not installed in the test set-up


def test_vqav2_test_dev_writes_the_submission_file(opt, tmp_path):
    files, root, _ = _vqav2(tmp_path, "test-dev2015", with_answers=False)
    out = tmp_path / "out"
    rep = benchmark.run_benchmark("vqav2", opt, files, root, output=out, progress=False)
    assert rep["metrics"] is None and rep["evaluated"] == 3  # COCO_test2015_* images found for test-dev2015
    assert len(json.loads((out / "predictions.json").read_text())) == 3


def test_aokvqa_direct_and_multiple_choice(opt, tmp_path):
    root = tmp_path / "coco"
    for i in (5, 6):
        _img(root / "val2017" / f"{i:012d}.jpg", i - 4)
    data = [{"question_id": "q1", "image_id": 5, "question": "What is the man holding?",
             "choices": ["a flag", "a cat", "rice", "a bat"], "correct_choice_idx": 0,
             "direct_answers": ["flag"] * 6 + ["banner"] * 4, "difficult_direct_answer": False, "rationales": []},
            {"question_id": "q2", "image_id": 6, "question": "Why is it dark?",
             "choices": ["night", "rain", "smoke", "a tunnel"], "correct_choice_idx": 3,
             "direct_answers": ["night"] * 10, "difficult_direct_answer": True, "rationales": []}]
    out = tmp_path / "out"
    rep = benchmark.run_benchmark("aokvqa", opt, [_w(tmp_path / "aokvqa_v1p0_val.json", data)], root, output=out,
                                  progress=False)
    recs, preds = _records(out), json.loads((out / "predictions.json").read_text())
    assert set(preds) == {"q1", "q2"} and set(preds["q1"]) == {"direct_answer", "multiple_choice"}
    # DA: only the non-difficult question, min(1, matches / 3) on the raw answer (allenai/aokvqa eval_aokvqa)
    a = recs["q1"]["answer"]
    assert rep["metrics"]["da_accuracy"] == pytest.approx(100 * min(1.0, (6 * (a == "flag") + 4 * (a == "banner")) / 3))
    assert rep["metrics"]["da_count"] == 1
    model_choice = [max(range(4), key=s["sum"].__getitem__) for s in choice_scores(
        opt, opt.processor.images([root / "val2017/000000000005.jpg", root / "val2017/000000000006.jpg"]),
        ["Question: what is the man holding? Options: (a) a flag (b) a cat (c) rice (d) a bat. Short answer:",
         "Question: why is it dark? Options: (a) night (b) rain (c) smoke (d) a tunnel. Short answer:"],
        [data[0]["choices"], data[1]["choices"]])]
    assert [recs[q]["prediction"] for q in ("q1", "q2")] == model_choice
    assert recs["q1"]["choice_prompt"] == ("Question: what is the man holding? Options: (a) a flag (b) a cat (c) rice "
                                           "(d) a bat. Short answer:")
    assert rep["metrics"]["mc_accuracy"] == pytest.approx(50.0 * ((model_choice[0] == 0) + (model_choice[1] == 3)))


def test_gqa_exact_match_per_type(opt, tmp_path):
    root = tmp_path / "gqa"
    for i in range(3):
        _img(root / "images" / f"n{i}.jpg", i)
    data = {"201": {"imageId": "n0", "question": "What is on the table?", "answer": "cup",
                    "types": {"structural": "query", "semantic": "rel", "detailed": "relS"}},
            "202": {"imageId": "n1", "question": "Is the sky blue?", "answer": "yes",
                    "types": {"structural": "verify", "semantic": "attr", "detailed": "verifyAttr"}},
            "203": {"imageId": "n2", "question": "Are both the cup and the plate white?", "answer": "no",
                    "types": {"structural": "logical", "semantic": "attr", "detailed": "twoSame"}}}
    out = tmp_path / "out"
    rep = benchmark.run_benchmark("gqa", opt, [_w(tmp_path / "testdev_balanced_questions.json", data)], root,
                                  output=out, progress=False)
    recs = _records(out)
    hits = {q: float(normalize_vqa_answer(recs[q]["answer"]) == e["answer"]) for q, e in data.items()}
    assert rep["metrics"]["accuracy"] == pytest.approx(100 * sum(hits.values()) / 3)
    assert set(rep["metrics"]["per_structural_type"]) == {"query", "verify", "logical"}
    assert rep["metrics"]["per_semantic_type"]["attr"] == pytest.approx(50 * (hits["202"] + hits["203"]))
    assert set(json.loads((out / "predictions.json").read_text())[0]) == {"questionId", "prediction"}


def test_vizwiz_keeps_unanswerable(opt, tmp_path):
    root = tmp_path / "vizwiz"
    names = [f"VizWiz_val_{i:08d}.jpg" for i in range(2)]
    for i, n in enumerate(names):
        _img(root / "val" / n, i)
    data = [{"image": names[0], "question": "What is this?", "answerable": 1, "answer_type": "other",
             "answers": [{"answer": a, "answer_confidence": "yes"} for a in ["soup"] * 7 + ["can"] * 3]},
            {"image": names[1], "question": "What does this say?", "answerable": 0, "answer_type": "unanswerable",
             "answers": [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10}]
    out = tmp_path / "out"
    rep = benchmark.run_benchmark("vizwiz", opt, [_w(tmp_path / "val.json", data)], root, output=out,
                                  progress=False)
    recs = _records(out)
    ref = (_vqa_reference(recs[names[0]]["answer"], ["soup"] * 7 + ["can"] * 3)
           + _vqa_reference(recs[names[1]]["answer"], ["unanswerable"] * 10)) / 2
    assert rep["metrics"]["accuracy"] == pytest.approx(100 * ref) and rep["evaluated"] == 2
    assert "unanswerable" in rep["metrics"]["per_answer_type"]
    assert [p["image"] for p in json.loads((out / "predictions.json").read_text())] == names


def test_textvqa_ocr_tokens_in_the_instruction(ib, tmp_path):
    root = tmp_path / "textvqa"
    _img(root / "train_images" / "abc.jpg")
    data = {"dataset_name": "textvqa", "data": [{"question_id": 34602, "image_id": "abc", "question": "What brand?",
                                                  "answers": ["nokia"] * 8 + ["nokia phone"] * 2}]}
    ocr = {"data": [{"image_id": "abc", "ocr_tokens": ["NOKIA", "5:45"]}]}
    out = tmp_path / "out"
    rep = benchmark.run_benchmark("textvqa", ib, [_w(tmp_path / "TextVQA_0.5.1_val.json", data),
                                                  _w(tmp_path / "ocr.json", ocr)], root, output=out, progress=False)
    assert _records(out)["34602"]["prompt"] == "OCR tokens: NOKIA, 5:45. Question: what brand? Short answer:"
    many = [f"t{i}" for i in range(40)]  # the first 30 OCR tokens only (predict_answers)
    assert protocols.build_prompt(protocols.get("textvqa"), "instructblip", {"question": "Q", "ocr_tokens": many}) \
        == f"OCR tokens: {', '.join(many[:30])}. Question: q Short answer:"
    assert rep["architecture_key"] == "instructblip-t5" and rep["generation"]["repetition_penalty"] == 1.5
    a = _records(out)["34602"]["answer"]
    assert rep["metrics"]["accuracy"] == pytest.approx(100 * _vqa_reference(a, ["nokia"] * 8 + ["nokia phone"] * 2))


# ------------------------------------------------------------------------------------------ choice / binary
def _ranked(model, images, prompts, choices):
    return [max(range(len(c)), key=s["sum"].__getitem__)
            for s, c in zip(choice_scores(model, model.processor.images(images), prompts, choices), choices)]


def test_scienceqa_img_skips_questions_without_image(ib, tmp_path):
    root = tmp_path / "sqa"
    _img(root / "test" / "7" / "image.png")
    problems = {"7": {"question": "Which is a mammal?", "choices": ["frog", "whale", "shark"], "answer": 1,
                      "hint": "A sea.", "image": "image.png", "split": "test", "subject": "nat"},
                "8": {"question": "Which word is a noun?", "choices": ["run", "dog"], "answer": 1, "hint": "",
                      "image": None, "split": "test", "subject": "lan"},
                "9": {"question": "Train question", "choices": ["a", "b"], "answer": 0, "hint": "",
                      "image": None, "split": "train"}}
    splits = {"train": ["9"], "val": [], "test": ["7", "8"]}
    out = tmp_path / "out"
    rep = benchmark.run_benchmark("scienceqa-img", ib, [_w(tmp_path / "problems.json", problems),
                                                        _w(tmp_path / "pid_splits.json", splits)], root,
                                  output=out, progress=False)
    assert rep["evaluated"] == 1 and rep["skipped_items"][0]["id"] == "8"
    assert "no image" in rep["skipped_items"][0]["reason"]
    prompt = "Context: A sea. Question: which is a mammal? Options: (a) frog (b) whale (c) shark. Answer:"
    assert _records(out)["7"]["prompt"] == prompt
    best = _ranked(ib, [root / "test/7/image.png"], [prompt], [problems["7"]["choices"]])[0]
    assert json.loads((out / "predictions.json").read_text()) == [{"pid": "7", "prediction": best}]
    assert rep["metrics"]["accuracy"] == 100.0 * (best == 1) and rep["metrics"]["ranked_by"] == "sum"


def test_iconqa_multiple_text_choice(ib, tmp_path):
    root = tmp_path / "iconqa"
    _img(root / "test" / "choose_txt" / "55" / "image.png")
    problems = {"55": {"question": "How many shapes are there?", "choices": ["3", "4", "5"], "answer": 2,
                       "ques_type": "choose_txt", "split": "test"}}
    out = tmp_path / "out"
    rep = benchmark.run_benchmark("iconqa", ib, [_w(tmp_path / "problems.json", problems),
                                                 _w(tmp_path / "pid_splits.json", {"choose_txt_test": ["55"]})],
                                  root, output=out, progress=False)
    prompt = "Question: how many shapes are there? Options: (a) 3 (b) 4 (c) 5. Short answer:"
    assert _records(out)["55"]["prompt"] == prompt
    best = _ranked(ib, [root / "test/choose_txt/55/image.png"], [prompt], [["3", "4", "5"]])[0]
    assert rep["metrics"]["accuracy"] == 100.0 * (best == 2)


def test_hatefulmemes_auc(ib, tmp_path):
    pytest.importorskip("sklearn")
    root = tmp_path / "hm"
    lines = []
    for i, (label, text) in enumerate([(0, "have a nice day"), (1, "bad words here"), (0, "cats are great"),
                                       (1, "more bad words")]):
        _img(root / "img" / f"{i:05d}.png", i)
        lines.append(json.dumps({"id": 42950 + i, "img": f"img/{i:05d}.png", "label": label, "text": text}))
    out = tmp_path / "out"
    rep = benchmark.run_benchmark("hatefulmemes", ib, [_w(tmp_path / "dev_seen.jsonl", "\n".join(lines) + "\n")],
                                  root, output=out, progress=False)
    recs = _records(out)
    assert recs["42950"]["prompt"] == 'This is an image with: "have a nice day" written on it. Is it hateful? Answer:'
    probs = {int(k): r["proba"] for k, r in recs.items()}
    pos, neg = [probs[42951], probs[42953]], [probs[42950], probs[42952]]
    pairwise = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / 4  # AUC = P(score+ > score-)
    assert rep["metrics"]["auc"] == pytest.approx(100 * pairwise)
    assert [set(p) for p in json.loads((out / "predictions.json").read_text())] == [{"id", "proba", "label"}] * 4


# ---------------------------------------------------------------------------------------------- captions
def _karpathy(tmp_path, coco: bool):
    root = tmp_path / "karpathy"
    images = []
    for i, split in enumerate(["test", "restval", "test"]):
        name = f"COCO_val2014_{i:012d}.jpg" if coco else f"{1000092795 + i}.jpg"
        _img(root / ("val2014" if coco else "") / name, i)
        e = {"filename": name, "imgid": i, "split": split, "sentids": [2 * i, 2 * i + 1],
             "sentences": [{"raw": f"A dog number {i} runs.", "tokens": [], "imgid": i, "sentid": 2 * i},
                           {"raw": "Two dogs on the grass.", "tokens": [], "imgid": i, "sentid": 2 * i + 1}]}
        if coco:
            e.update(filepath="val2014", cocoid=391895 + i)
        images.append(e)
    return _w(tmp_path / ("dataset_coco.json" if coco else "dataset_flickr30k.json"),
              {"images": images, "dataset": "coco" if coco else "flickr30k"}), root


def _cider(preds: dict, refs: dict) -> float:
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": c}] for k, c in preds.items()})
    return Cider().compute_score(gts, res)[0]


def test_coco_caption_karpathy_test(opt, tmp_path):
    pytest.importorskip("pycocoevalcap")
    path, root = _karpathy(tmp_path, coco=True)
    out = tmp_path / "out"
    rep = benchmark.run_benchmark("coco-caption", opt, [path], root, output=out, progress=False)
    preds = json.loads((out / "predictions.json").read_text())
    assert [p["image_id"] for p in preds] == [391895, 391897]  # the test split only; cocoid
    assert {r["prompt"] for r in _records(out).values()} == {"a photo of"}
    refs = {391895: ["A dog number 0 runs.", "Two dogs on the grass."],
            391897: ["A dog number 2 runs.", "Two dogs on the grass."]}
    assert rep["metrics"]["CIDEr"] == pytest.approx(_cider({p["image_id"]: p["caption"] for p in preds}, refs))


def test_flickr30k_caption_instructblip(ib, tmp_path):
    pytest.importorskip("pycocoevalcap")
    path, root = _karpathy(tmp_path, coco=False)
    out = tmp_path / "out"
    short = {"max_new_tokens": 6, "min_new_tokens": 1}  # the protocol's 80 tokens x 5 beams are slow on a busy CPU
    rep = benchmark.run_benchmark("flickr30k-caption", ib, [path], root, output=out, progress=False, generation=short)
    assert [p["image_id"] for p in json.loads((out / "predictions.json").read_text())] == [1000092795, 1000092797]
    assert {r["prompt"] for r in _records(out).values()} == {"A short image caption."}
    settings = protocols.get("flickr30k-caption").settings("instructblip-t5")
    assert settings["min_new_tokens"] == 9 and settings["max_new_tokens"] == 80  # min_length 10 counts the start
    assert rep["generation"] == {**settings, **short}


def test_nocaps_domains(opt, tmp_path):
    pytest.importorskip("pycocoevalcap")
    root = tmp_path / "nocaps"
    doms = ["in-domain", "near-domain", "out-domain", "in-domain"]  # the official file's `domain` per image
    images = [{"id": i, "file_name": f"{i:04x}.jpg", "open_images_id": f"{i:04x}", "domain": d}
              for i, d in enumerate(doms)]
    for i in range(4):
        _img(root / f"{i:04x}.jpg", i)
    anns = [{"image_id": i, "id": 10 * i + j, "caption": c} for i in range(4)
            for j, c in enumerate([f"a photo of thing {i}", "an object on a table"])]
    out = tmp_path / "out"
    rep = benchmark.run_benchmark("nocaps", opt, [_w(tmp_path / "nocaps_val_4500_captions.json",
                                                      {"images": images, "annotations": anns})], root,
                                  output=out, progress=False, generation={"max_new_tokens": 6, "min_new_tokens": 1})
    preds = {p["image_id"]: p["caption"] for p in json.loads((out / "predictions.json").read_text())}
    refs = {i: [f"a photo of thing {i}", "an object on a table"] for i in range(4)}
    assert rep["metrics"]["in-domain"]["CIDEr"] == pytest.approx(_cider({i: preds[i] for i in (0, 3)},
                                                                        {i: refs[i] for i in (0, 3)}))
    assert set(rep["metrics"]) >= {"CIDEr", "in-domain", "near-domain", "out-domain"}


# --------------------------------------------------------------------------------------------- retrieval
@pytest.mark.parametrize("name", ["flickr30k-retrieval", "coco-retrieval"])
def test_retrieval_karpathy_test(tmp_path, name):
    from transformers import AutoTokenizer

    d = tmp_path / "itm"
    retrieval_hf().save_pretrained(d)
    AutoTokenizer.from_pretrained(make_bert_tokenizer(tmp_path / "_bert", vocab_size=120)).save_pretrained(d)
    path, root = _karpathy(tmp_path, coco=name.startswith("coco"))
    out = tmp_path / "out"
    rep = benchmark.run_benchmark(name, blip2.load(d), [path], root, output=out, progress=False)
    preds = json.loads((out / "predictions.json").read_text())
    assert len(preds["images"]) == 2 and preds["txt2img"] == [0, 0, 1, 1]  # the test split's 2 images, 4 captions
    assert set(rep["metrics"]) >= {"i2t_r1", "t2i_r1", "mean"}


def _hand_recall(i2t: np.ndarray, t2i: np.ndarray, txt2img: list[int]) -> dict:
    """R@1/5/10 from the score matrices by sorting: a row is a hit at K when one of its own columns is in its K
    best (image rows own their captions; caption rows own their image)."""
    out = {}
    for name, scores, own in (("i2t", i2t, lambda r, c: txt2img[c] == r), ("t2i", t2i, lambda r, c: txt2img[r] == c)):
        first = [next(n for n, c in enumerate(np.argsort(-row, kind="stable")) if own(r, c)) for r, row in
                 enumerate(scores)]
        for k in (1, 5, 10):
            out[f"{name}_r{k}"] = 100.0 * sum(f < k for f in first) / len(first)
    return out


def test_coco_retrieval_fold_average_is_the_mean_of_per_fold_recalls(tmp_path, monkeypatch):
    """COCO 1k: the test images in file order, in folds (5 images here), each fold its own gallery; the breakdown
    is the mean of the folds' recalls, computed here by hand from the whole split's score matrix (k = 128 re-ranks
    every pair, so a fold's matrix is a diagonal block of the whole one)."""
    from transformers import AutoTokenizer

    from blip2 import evaluation

    d = tmp_path / "itm"
    retrieval_hf(seed=3).save_pretrained(d)
    AutoTokenizer.from_pretrained(make_bert_tokenizer(tmp_path / "_bert", vocab_size=120)).save_pretrained(d)
    root, entries, lines = tmp_path / "coco", [], corpus_lines()
    for i in range(11):  # 10 test images (2 folds of 5) and one train image between them
        name = f"COCO_val2014_{i:012d}.jpg"
        (root / "val2014").mkdir(parents=True, exist_ok=True)
        random_pil("RGB", 36, seed=i).save(root / "val2014" / name)
        entries.append({"filepath": "val2014", "filename": name, "cocoid": 100 + i, "split": "train" if i == 4 else
                        "test", "sentences": [{"raw": lines[2 * i]}, {"raw": lines[2 * i + 1]}]})
    path = _w(tmp_path / "dataset_coco.json", {"images": entries})
    calls = []
    real = evaluation.score_matrix
    monkeypatch.setattr(evaluation, "score_matrix", lambda *a, **kw: calls.append(real(*a, **kw)) or calls[-1])
    rep = benchmark.run_benchmark("coco-retrieval", blip2.load(d), [path], root, output=tmp_path / "out",
                                  progress=False, fold_size=5)
    assert [c[0].shape for c in calls] == [(10, 20), (5, 10), (5, 10)]  # the whole split, then each fold alone
    i2t, t2i = (m.numpy() for m in calls[0])
    txt2img = [i for i in range(10) for _ in range(2)]
    whole = _hand_recall(i2t, t2i, txt2img)
    folds = [_hand_recall(i2t[f * 5:(f + 1) * 5, f * 10:(f + 1) * 10], t2i[f * 10:(f + 1) * 10, f * 5:(f + 1) * 5],
                          [i for i in range(5) for _ in range(2)]) for f in range(2)]
    m = rep["metrics"]
    assert {k: m[k] for k in whole} == pytest.approx(whole)
    assert {k: m["folds_of_5"][k] for k in whole} == pytest.approx({k: (folds[0][k] + folds[1][k]) / 2 for k in whole})
    assert m["folds_of_5"]["folds"] == 2 and m["folds_of_5"]["i2t_r1"] != m["i2t_r1"]  # 5 candidates, not 10
    assert "## folds_of_5" in (tmp_path / "out" / "metrics.md").read_text()
    model = blip2.load(d)
    assert not [k for k in benchmark.run_benchmark("coco-retrieval", model, [path], root, progress=False,
                                                   fold_size=0)["metrics"] if k.startswith("folds")]
    rep = benchmark.run_benchmark("coco-retrieval", model, [path], root, progress=False, fold_size=4)
    assert rep["metrics"]["folds_of_4"]["folds"] == 2 and "last 2 of 10 images" in rep["notes"]["folds"]
    with pytest.raises(ValueError, match="fold_size must be >= 0"):
        benchmark.run_benchmark("coco-retrieval", model, [path], root, progress=False, fold_size=-1)


# ------------------------------------------------------------------------------------------------- video
def _video(path, n: int):
    """An MPEG-4 clip whose frame i is uniformly grey at level 20 * i."""
    import av
    import numpy as np

    with av.open(str(path), mode="w") as c:
        st = c.add_stream("mpeg4", rate=5)
        st.width, st.height, st.pix_fmt = 32, 32, "yuv420p"
        for i in range(n):
            frame = av.VideoFrame.from_ndarray(np.full((32, 32, 3), 20 * i, dtype=np.uint8), format="rgb24")
            for packet in st.encode(frame):
                c.mux(packet)
        for packet in st.encode():
            c.mux(packet)
    return path


def test_video_frames_uniform(tmp_path):
    pytest.importorskip("av")
    import numpy as np

    frames = benchmark.sample_frames(_video(tmp_path / "v.mp4", 10), 4)
    # numpy.arange(0, 10, 2.5) -> frames 0, 2, 5, 7 (LAVIS load_video "uniform")
    assert [round(float(np.asarray(f).mean()) / 20) for f in frames] == [0, 2, 5, 7]
    with pytest.raises(ValueError, match="not a readable video"):
        benchmark.sample_frames(_w(tmp_path / "bad.mp4", "not a video"), 4)


@pytest.mark.parametrize("name", ["msvd-qa", "msrvtt-qa"])
def test_video_qa(ib, tmp_path, name):
    pytest.importorskip("av")
    data = [{"answer": "dog", "id": 0, "question": "what is running?", "video_id": 1},
            {"answer": "man", "id": 1, "question": "who talks?", "video_id": 2}]
    files = [_w(tmp_path / "test_qa.json", data)]
    if name == "msvd-qa":  # MSVD names its clips after YouTube ids: youtube_mapping.txt maps vid<N> to them
        files.append(_w(tmp_path / "youtube_mapping.txt", "abc_1_5 vid1\ndef_2_9 vid2\n"))
        videos = ["abc_1_5.avi", "def_2_9.avi"]
    else:
        videos = ["video1.mp4", "video2.mp4"]
    _video(tmp_path / videos[0], 6)
    _w(tmp_path / videos[1], "broken")
    items, _ = read("video-qa", files, tmp_path)
    assert [it["video"] for it in items] == [str(tmp_path / v) for v in videos]
    out = tmp_path / "out"
    rep = benchmark.run_benchmark(name, ib, files, tmp_path, output=out, progress=False,
                                  generation={"max_new_tokens": 4})
    assert rep["evaluated"] == 1 and "not a readable video" in rep["skipped_items"][0]["reason"]
    rec = _records(out)["0"]
    assert rec["prompt"] == "Question: what is running? Short Answer:"
    assert rep["metrics"]["accuracy"] == 100.0 * (normalize_vqa_answer(rec["answer"]) == "dog")
    # the answer is the model's on the 4 sampled frames, [1, 4, 3, S, S] through the Q-Former
    px = torch.stack([ib.processor.image_processor.preprocess_one(f)
                      for f in benchmark.sample_frames(tmp_path / videos[0], 4)])[None]
    gen = {**protocols.get(name).settings("instructblip-t5"), "max_new_tokens": 4}
    assert ib.instruct(px, [rec["prompt"]], **gen)[0].strip() == rec["answer"]


# ---------------------------------------------------------------------------------------- resume / cache
def test_killed_eval_resumes_with_identical_results(opt, tmp_path, monkeypatch):
    files, root, _ = _vqav2(tmp_path)
    full = benchmark.run_benchmark("vqav2", opt, files, root, output=tmp_path / "full", batch_size=1,
                                   progress=False)
    calls, killed = [], []
    real = type(opt).instruct

    def dies_on_second_batch(self, images, prompts, **kw):
        calls.append(list(prompts))
        if len(calls) == 2 and not killed:
            killed.append(True)
            raise KeyboardInterrupt("killed")
        return real(self, images, prompts, **kw)

    monkeypatch.setattr(type(opt), "instruct", dies_on_second_batch)
    out = tmp_path / "resumed"
    with pytest.raises(KeyboardInterrupt):
        benchmark.run_benchmark("vqav2", opt, files, root, output=out, batch_size=1, progress=False)
    log = next((out / "cache").glob("*.jsonl"))
    log.write_text(log.read_text() + '[{"id": 11, "answer": "tor')  # a line torn by the kill
    calls.clear()
    rep = benchmark.run_benchmark("vqav2", opt, files, root, output=out, batch_size=1, progress=False)
    assert len(calls) == 2  # questions 11 and 12: question 10 is not recomputed
    assert rep["metrics"] == full["metrics"]
    assert (out / "predictions.json").read_text() == (tmp_path / "full" / "predictions.json").read_text()
    calls.clear()
    again = benchmark.run_benchmark("vqav2", opt, files, root, output=out, batch_size=1, progress=False)
    assert calls == [] and again["metrics"] == full["metrics"]  # the cache answers everything
    benchmark.run_benchmark("vqav2", opt, files, root, output=out, batch_size=1, progress=False,
                            generation={"num_beams": 2})
    assert len(calls) == 3  # other settings: another cache key, everything recomputed


def test_cli_benchmark(opt, tmp_path):
    files, root, _ = _vqav2(tmp_path)
    d = tmp_path / "ckpt"
    opt.save_pretrained(d)
    opt.processor.save_pretrained(d)
    out = tmp_path / "out"
    assert cli.main(["eval", "--benchmark", "vqav2", "--model", str(d), "--data", *map(str, files), "--images",
                     str(root), "--output", str(out), "--no-progress", "--num-beams", "1"]) == 0
    rep = json.loads((out / "metrics.json").read_text())
    assert rep["benchmark"] == "vqav2" and rep["generation"]["num_beams"] == 1
    assert (out / "metrics.md").read_text().startswith("# blip2 eval: vqav2")
    assert cli.main(["eval", "--model", str(d), "--data", str(files[0])]) == 2  # neither --task nor --benchmark


def test_docs_table_is_current():
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    for doc in ("README.md", "docs/evaluation.md"):
        assert protocols.table() in (root / doc).read_text(), f"{doc}: regenerate the table (protocols.table())"
