"""Evaluation: multiple-choice likelihoods against transformers' own loss, the annotation readers, and `blip2 eval`
end to end for every task on tiny random checkpoints and generated PNG/JPEG files (one process and two)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import blip2
from blip2 import cli, evaluation
from blip2.annotations import read_caption_data, read_choice_data, read_vqa_data
from blip2.evaluation import choice_scores, evaluate, rank_choices
from fixtures import make_bert_tokenizer, sample_image
from hf_models import NUM_QUERY, checkpoint_with_processor, retrieval_hf

SRC = os.path.join(os.path.dirname(__file__), "..", "src")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny ops on a busy 2-core machine spend most of their time in OpenMP barriers."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _checkpoint(kind: str, d):
    """A transformers checkpoint directory (model + processor files); returns the transformers model."""
    return checkpoint_with_processor(kind, d)[0]


@pytest.fixture(scope="module", params=["blip2-opt", "instructblip-t5"])
def ckpt(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(request.param)
    return request.param, d, _checkpoint(request.param, d)


@pytest.fixture(scope="module")
def opt_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("opt-eval")
    _checkpoint("blip2-opt", d)
    return d


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """Four different real-photo crops as PNG files."""
    d = tmp_path_factory.mktemp("photos")
    big = sample_image(None)
    paths = []
    for i, box in enumerate([(0, 0, 256, 256), (256, 0, 512, 256), (0, 256, 256, 512), (128, 128, 384, 384)]):
        p = d / f"img{i}.png"
        big.crop(box).resize((40, 40)).save(p)
        paths.append(p)
    return paths


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


# --------------------------------------------------------------------------------------- choice likelihoods
PROMPTS = ["Question: what is the man holding? Short answer:", "a photo of"]
CHOICES = [["a flag", "a cat on the couch", "two dogs"], ["a dog", "an astronaut in a white suit", "rice"]]


def _reference_scores(kind, d, hf, photos):
    """Per choice: transformers' mean cross-entropy over the choice tokens, one (image, prompt, choice) at a time,
    unpadded. Decoder-only: the choice's ids are the tail of the tokenised "prompt choice" after the prompt's ids;
    encoder-decoder: the choice tokenised alone (with EOS) is the decoder target."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(d)
    tok = proc.tokenizer
    image_token = hf.config.image_token_index
    out = []
    for img, prompt, cands in zip(photos, PROMPTS, CHOICES):
        px = blip2.load(d).processor.images([img])  # the same pixels (our processor matches transformers')
        p_ids = tok(prompt)["input_ids"]
        extra = {}
        if kind == "instructblip-t5":
            q = proc.qformer_tokenizer(prompt, return_tensors="pt")
            extra = {"qformer_input_ids": q["input_ids"], "qformer_attention_mask": q["attention_mask"]}
        sums, means = [], []
        for c in cands:
            if kind == "instructblip-t5":
                ids, labels = [image_token] * NUM_QUERY + p_ids, tok(c)["input_ids"]
            else:
                full = tok(prompt + " " + c)["input_ids"]
                assert full[:len(p_ids)] == p_ids
                ids = [image_token] * NUM_QUERY + full
                labels = [-100] * (NUM_QUERY + len(p_ids)) + full[len(p_ids):]
            n = sum(x != -100 for x in labels)
            with torch.no_grad():
                loss = hf(pixel_values=px, input_ids=torch.tensor([ids]), attention_mask=torch.ones(1, len(ids)),
                          labels=torch.tensor([labels]), **extra).loss
            means.append(-loss.item())
            sums.append(-loss.item() * n)
        out.append({"sum": sums, "mean": means})
    return out


def test_choice_scores_match_transformers_loss(ckpt, photos):
    kind, d, hf = ckpt
    model = blip2.load(d)
    ours = choice_scores(model, photos[:2], PROMPTS, CHOICES, batch_size=2)  # rows of both samples share batches
    ref = _reference_scores(kind, d, hf, photos)
    for o, r in zip(ours, ref):
        torch.testing.assert_close(torch.tensor(o["sum"]), torch.tensor(r["sum"]), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(torch.tensor(o["mean"]), torch.tensor(r["mean"]), atol=1e-5, rtol=1e-5)
        assert all(n >= 1 for n in o["num_tokens"])


def test_rank_choices_batched_and_shared_choices(ckpt, photos):
    kind, d, _ = ckpt
    model = blip2.load(d)
    prompts = ["a photo of"] * 3
    shared = ["a cat", "a dog on the grass", "a red bus", "food"]  # one list for every image: classification
    batched = choice_scores(model, photos[:3], prompts, shared, batch_size=3)
    for i in range(3):
        single = choice_scores(model, photos[i:i + 1], prompts[i:i + 1], [shared], batch_size=1)[0]
        torch.testing.assert_close(torch.tensor(batched[i]["sum"]), torch.tensor(single["sum"]), atol=1e-4, rtol=1e-5)
    for reduce in ("sum", "mean"):
        expected = [max(range(4), key=lambda j: s[reduce][j]) for s in batched]
        assert rank_choices(model, photos[:3], prompts, shared, reduce=reduce, batch_size=2) == expected
    with pytest.raises(ValueError, match="reduce"):
        rank_choices(model, photos[:1], prompts[:1], shared, reduce="max")


# ------------------------------------------------------------------------------------------------ readers
def test_readers_report_bad_entries(tmp_path):
    coco = {"images": [{"id": 7, "file_name": "a.png"}, {"id": 8, "file_name": "b.png"}, {"id": 9}],
            "annotations": [{"image_id": 7, "caption": "x"}, {"image_id": 7, "caption": "y"},
                            {"image_id": 9, "caption": "z"}]}
    items, skipped = read_caption_data(_write(tmp_path / "c.json", coco), tmp_path / "imgs")
    assert [(it["id"], it["references"]) for it in items] == [(7, ["x", "y"])]
    assert items[0]["image"] == str(tmp_path / "imgs" / "a.png")
    assert [(s["id"], s["reason"]) for s in skipped] == [(8, "no reference captions"), (9, "no image file name")]

    plain = [{"image": "a.png", "caption": "one caption"}, {"image": "a.png", "caption": ["p", "q"], "image_id": 0}]
    items, skipped = read_caption_data(_write(tmp_path / "p.json", plain), tmp_path)
    assert items[0]["references"] == ["one caption"] and skipped[0]["reason"] == "duplicate id 0"

    vqa = [{"image": "a.png", "question": "what?", "answer": ["x"] * 10, "question_type": "what"},
           {"image": "a.png", "question": "why?", "answer": []}, {"image": "a.png", "question": "", "answer": "x"},
           "not an object"]
    items, skipped = read_vqa_data([_write(tmp_path / "v.json", vqa)], tmp_path)
    assert [it["id"] for it in items] == [0] and items[0]["question_type"] == "what"
    assert [s["reason"] for s in skipped] == ["empty answer list", "no question",
                                              "entry is not an object: 'not an object'"]

    choice = [{"image": "a.png", "question": "q", "choices": ["x", "y"], "answer": "y"},
              {"image": "a.png", "prompt": "p", "choices": ["x", "y"], "answer": 2},
              {"image": "a.png", "question": "q", "choices": [], "answer": 0}]
    items, skipped = read_choice_data(_write(tmp_path / "m.json", choice), tmp_path)
    assert items[0]["answer"] == 1
    assert [s["index"] for s in skipped] == [1, 2] and "not one of the 2 choices" in skipped[0]["reason"]

    with pytest.raises(ValueError, match="not a caption file"):
        read_caption_data(_write(tmp_path / "bad.json", {"foo": 1}), tmp_path)
    with pytest.raises(FileNotFoundError, match="annotation file not found"):
        read_vqa_data([tmp_path / "missing.json"], tmp_path)


def test_vqav2_two_file_format(tmp_path, photos):
    (tmp_path / "val2014").mkdir()
    sample_image(40).save(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    questions = {"data_subtype": "val2014", "questions": [{"image_id": 42, "question": "what?", "question_id": 420},
                                                           {"image_id": 43, "question": "who?", "question_id": 430}]}
    anns = {"annotations": [{"question_id": 420, "image_id": 42, "question_type": "what", "answer_type": "other",
                             "answers": [{"answer": "cat", "answer_id": i} for i in range(10)]}]}
    # either order of the two files
    files = [_write(tmp_path / "a.json", anns), _write(tmp_path / "q.json", questions)]
    items, skipped = read_vqa_data(files, tmp_path)
    assert items[0]["image"] == str(tmp_path / "val2014" / "COCO_val2014_000000000042.jpg")
    assert items[0]["answers"] == ["cat"] * 10 and items[0]["answer_type"] == "other"
    assert [(s["id"], s["reason"]) for s in skipped] == [(430, "empty answer list")]


# ----------------------------------------------------------------------------------------------- blip2 eval
def _eval(*args):
    assert cli.main(["eval", *map(str, args), "--no-progress"]) == 0


def test_eval_caption_end_to_end(opt_dir, photos, tmp_path, capsys):
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = [["a man in a white suit", "an astronaut with a flag"], ["a person standing outside"],
            ["nothing here"], ["a close up of a face", "a portrait of a man"]]
    coco = {"images": [{"id": i, "file_name": p.name} for i, p in enumerate(photos[:2])]
            + [{"id": 2, "file_name": "missing.png"}, {"id": 3, "file_name": photos[3].name}],
            "annotations": [{"image_id": i, "caption": c} for i, cs in enumerate(refs) for c in cs]}
    out = tmp_path / "out"
    _eval("--task", "caption", "--model", opt_dir, "--data", _write(tmp_path / "caps.json", coco),
          "--images", photos[0].parent, "--output", out, "--batch-size", 2)
    report = json.loads((out / "metrics.json").read_text())
    preds = json.loads((out / "predictions.json").read_text())
    assert [p["image_id"] for p in preds] == [0, 1, 3]  # annotation order, the missing image left out
    assert report["skipped"] == 1 and report["skipped_items"][0]["id"] == 2
    assert "not found" in report["skipped_items"][0]["reason"]
    assert report["generation"] == {"num_beams": 5, "max_new_tokens": 30, "min_new_tokens": 8,  # LAVIS eval defaults
                                    "length_penalty": 1.0, "repetition_penalty": 1.0}
    model = blip2.load(opt_dir)
    for p, img in zip(preds, [photos[0], photos[1], photos[3]]):
        assert p["caption"] == model.caption([img], num_beams=5, max_new_tokens=30, min_new_tokens=8)[0]
    # the scores equal the COCO toolkit run directly on the written predictions (METEOR: range only, to save time)
    tok = PTBTokenizer()
    gts = tok.tokenize({p["image_id"]: [{"caption": c} for c in refs[p["image_id"]]] for p in preds})
    res = tok.tokenize({p["image_id"]: [{"caption": p["caption"]}] for p in preds})
    m = report["metrics"]
    bleu = Bleu(4).compute_score(gts, res, verbose=0)[0]
    assert [m[f"BLEU-{n}"] for n in (1, 2, 3, 4)] == pytest.approx(bleu, abs=1e-12)
    assert m["ROUGE-L"] == pytest.approx(Rouge().compute_score(gts, res)[0], abs=1e-12)
    assert m["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0], abs=1e-12)
    assert 0 <= m["METEOR"] <= 1 and m["SPICE"] is None and "SPICE" in report["notes"]
    md = (out / "metrics.md").read_text()
    assert "| CIDEr |" in md and "| SPICE | n/a |" in md and md in capsys.readouterr().out


def test_eval_vqa_end_to_end(opt_dir, photos, tmp_path):
    model = blip2.load(opt_dir)
    questions = ["what is in the picture?", "what color is the cat?", "how many dogs are there?"]
    # the answers the model gives with the LAVIS eval settings (length penalty 0 for OPT)
    answers = model.answer(photos[:3], questions, num_beams=5, max_new_tokens=10, min_new_tokens=1, length_penalty=0.0)
    # hand-set human answers: question 0 has 2 of 10 humans agreeing (0.6), question 1 all 10 (1.0), question 2
    # none (0.0); question 3 has an empty answer list and is skipped
    data = [{"image": photos[0].name, "question": questions[0], "answer": [answers[0]] * 2 + ["zzz"] * 8,
             "question_id": 10, "question_type": "what is", "answer_type": "other"},
            {"image": photos[1].name, "question": questions[1], "answer": [answers[1]] * 10, "question_id": 11,
             "question_type": "what color", "answer_type": "other"},
            {"image": photos[2].name, "question": questions[2], "answer": ["zzz"] * 10, "question_id": 12,
             "question_type": "how many", "answer_type": "number"},
            {"image": photos[3].name, "question": "why?", "answer": [], "question_id": 13}]
    out = tmp_path / "out"
    ann = _write(photos[0].parent / "vqa_e2e.json", data)  # image names relative to the annotation file's folder
    _eval("--task", "vqa", "--model", opt_dir, "--data", ann, "--output", out, "--batch-size", 2, "--normalize-answers")
    report = json.loads((out / "metrics.json").read_text())
    preds = json.loads((out / "predictions.json").read_text())
    assert [p["answer"] for p in preds] == answers and [p["question_id"] for p in preds] == [10, 11, 12]
    assert [p["score"] for p in preds] == pytest.approx([0.6, 1.0, 0.0])
    m = report["metrics"]
    assert m["accuracy"] == pytest.approx(100 * 1.6 / 3)
    assert m["per_answer_type"] == pytest.approx({"number": 0.0, "other": 80.0})
    assert m["per_question_type"] == pytest.approx({"how many": 0.0, "what color": 100.0, "what is": 60.0})
    assert report["skipped_items"] == [{"index": 3, "id": 13, "image": photos[3].name, "reason": "empty answer list"}]
    assert report["generation"]["length_penalty"] == 0.0


def test_eval_vqa_asks_cleaned_questions_and_keeps_them_as_written(opt_dir, photos, tmp_path, monkeypatch):
    """As the original's eval (and our VQA training data): lower case, `. ! " ( ) * # : ; ~` deleted (LAVIS
    BlipQuestionProcessor keeps '?'); clean_questions=False (--keep-questions) asks them as written."""
    model = blip2.load(opt_dir)
    asked = []
    monkeypatch.setattr(model, "answer", lambda px, qs, **kw: asked.extend(qs) or ["x"] * len(qs))
    data = [{"image": photos[0].name, "question": "What COLOR (fur) is the cat?!", "answer": ["x"], "question_id": 1}]
    ann = _write(photos[0].parent / "vqa_clean.json", data)
    out = tmp_path / "out"
    evaluate("vqa", model, ann, output=out, progress=False)
    assert asked == ["what color fur is the cat?"]
    assert json.loads((out / "predictions.json").read_text())[0]["question"] == "What COLOR (fur) is the cat?!"
    evaluate("vqa", model, ann, clean_questions=False, progress=False)
    assert asked[-1] == "What COLOR (fur) is the cat?!"


def test_eval_choice_end_to_end(opt_dir, photos, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"not a png")
    data = [{"image": str(photos[0]), "question": "what is this?", "choices": ["a cat", "a man", "rice"], "answer": 1},
            {"image": str(photos[1]), "prompt": "a photo of", "choices": ["a dog", "a flag"], "answer": "a flag"},
            {"image": str(tmp_path / "broken.png"), "prompt": "a photo of", "choices": ["x", "y"], "answer": 0},
            {"image": str(photos[2]), "prompt": "a photo of", "choices": ["x", "y"], "answer": "z"}]
    out = tmp_path / "out"
    _eval("--task", "choice", "--model", opt_dir, "--data", _write(tmp_path / "mc.json", data), "--output", out)
    report = json.loads((out / "metrics.json").read_text())
    preds = json.loads((out / "predictions.json").read_text())
    model = blip2.load(opt_dir)
    prompts = ["Question: what is this? Short answer:", "a photo of"]
    expected = rank_choices(model, photos[:2], prompts, [data[0]["choices"], data[1]["choices"]], reduce="sum")
    assert [p["prediction"] for p in preds] == expected and [p["prompt"] for p in preds] == prompts
    assert report["metrics"]["ranked_by"] == "sum"  # the original ranks by the summed log-likelihood
    assert report["metrics"]["accuracy"] == pytest.approx(50.0 * sum(e == a for e, a in zip(expected, [1, 1])))
    assert [s["index"] for s in report["skipped_items"]] == [2, 3]
    assert "cannot read image" in report["skipped_items"][0]["reason"]


def test_eval_retrieval_end_to_end(photos, tmp_path):
    d = tmp_path / "itm"
    retrieval_hf().save_pretrained(d)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(make_bert_tokenizer(tmp_path / "_bert", vocab_size=120)).save_pretrained(d)
    caps = [["a man in a white suit", "an astronaut"], ["a flag"], ["a close up of a face", "a portrait"],
            ["lost"], ["the sky is blue", "a bird"]]
    files = photos[:3] + [photos[0].parent / "gone.png", photos[3]]
    data = [{"image": p.name, "caption": c} for p, c in zip(files, caps)]
    out = tmp_path / "out"
    _eval("--task", "retrieval", "--model", d, "--data", _write(tmp_path / "ret.json", data),
          "--images", photos[0].parent, "--output", out, "--batch-size", 3, "--k", 2)
    report = json.loads((out / "metrics.json").read_text())
    preds = json.loads((out / "predictions.json").read_text())
    assert report["evaluated"] == 4 and report["skipped"] == 1 and report["skipped_items"][0]["index"] == 3
    assert preds["txt2img"] == [0, 0, 1, 2, 2, 3, 3] and preds["img2txt"][3] == [5, 6]
    # the same numbers from score_matrix and recall_at_k called directly (captions are already clean lower case)
    from blip2.metrics import recall_at_k
    from blip2.retrieval import score_matrix

    model = blip2.load(d)
    enc = model.processor.tokenizer(preds["texts"], padding="longest", padding_side="right",  # LAVIS: [CLS] first
                                    return_tensors="pt")
    px = model.processor.images([photos[0], photos[1], photos[2], photos[3]])
    i2t, t2i = score_matrix(model, px, enc["input_ids"], enc["attention_mask"], k=2, progress=False)
    expected = recall_at_k(i2t, t2i, preds["img2txt"], preds["txt2img"])
    assert report["metrics"] == pytest.approx(expected)
    assert report["metrics"]["t2i_r10"] == 100.0  # 4 images: every true image is within the top 10


def test_eval_two_processes_equal_one(opt_dir, photos, tmp_path):
    data = [{"image": p.name, "question": q, "answer": ["yes", "no"] * 5}
            for p, q in zip(photos * 2, ["what?", "who?", "where?", "why?", "how?"])]
    ann = _write(tmp_path / "vqa.json", data)
    args = ["eval", "--task", "vqa", "--model", str(opt_dir), "--data", str(ann), "--images", str(photos[0].parent),
            "--batch-size", "2",
            "--max-new-tokens", "3", "--num-beams", "2", "--no-progress"]
    _eval(*args[1:-1], "--output", tmp_path / "one")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "blip2.cli",
           *args, "--output", str(tmp_path / "two")]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "predictions.json").read_text()) for d in ("one", "two"))
    assert [p["index"] for p in two] == list(range(5)) and two == one
    reports = [json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("one", "two")]
    assert [r["processes"] for r in reports] == [1, 2] and reports[0]["metrics"] == reports[1]["metrics"]


def test_eval_errors_are_one_line(opt_dir, tmp_path, capsys):
    assert cli.main(["eval", "--task", "caption", "--model", str(opt_dir), "--data", str(tmp_path / "nope.json")]) == 2
    assert "annotation file not found" in capsys.readouterr().err
    bad = _write(tmp_path / "all_bad.json", [{"image": "x.png", "caption": []}])
    assert cli.main(["eval", "--task", "caption", "--model", str(opt_dir), "--data", str(bad)]) == 2
    assert "no usable entries" in capsys.readouterr().err
    with pytest.raises(ValueError, match="unknown task"):
        evaluation.evaluate("nope", blip2.load(opt_dir), bad)


# --------------------------------------------------------------------------------------- table data
def test_eval_reads_tables_like_json(opt_dir, photos, tmp_path):
    """`--data` as a parquet file with image bytes (caption) and as a saved datasets folder (VQA, VQAv2-style
    answer dicts): the same items, predictions and metrics as the JSON annotation file of the same data; a row
    with an undecodable image is skipped with its reason."""
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    model = blip2.load(opt_dir)
    gen = {"num_beams": 1, "max_new_tokens": 4}
    refs = [["a man in a white suit"], ["a person standing outside", "someone outdoors"], ["a face"]]
    caps = [{"image": p.name, "image_id": i, "caption": r} for i, (p, r) in enumerate(zip(photos, refs))]
    from_json = evaluation.evaluate("caption", model, str(_write(tmp_path / "caps.json", caps)), str(photos[0].parent),
                                    generation=gen, progress=False, output=str(tmp_path / "j"))
    table = pa.table({"image": [p.read_bytes() for p in photos[:3]] + [b"not an image"],
                      "image_id": [0, 1, 2, 3], "captions": refs + [["broken"]]})
    pq.write_table(table, tmp_path / "caps.parquet")
    from_table = evaluation.evaluate("caption", model, str(tmp_path / "caps.parquet"), generation=gen,
                                     progress=False, output=str(tmp_path / "t"))
    pj = json.loads((tmp_path / "j" / "predictions.json").read_text())
    pt = json.loads((tmp_path / "t" / "predictions.json").read_text())
    assert [(p["image_id"], p["caption"]) for p in pt] == [(p["image_id"], p["caption"]) for p in pj]
    assert from_table["metrics"] == from_json["metrics"]
    assert from_table["skipped"] == 1 and from_table["skipped_items"][0]["id"] == 3

    questions = ["what is in the picture?", "what color is it?"]
    answers = model.answer(photos[:2], questions, **gen)
    ds = datasets.Dataset.from_dict({
        "image": [{"bytes": p.read_bytes(), "path": None} for p in photos[:2]], "question": questions,
        "question_id": [7, 8], "answers": [[{"answer": answers[0]}] * 10, [{"answer": "zzz"}] * 10]},
        features=datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                    "question_id": datasets.Value("int64"),
                                    "answers": [{"answer": datasets.Value("string")}]}))
    ds.save_to_disk(str(tmp_path / "vqa_ds"))
    report = evaluation.evaluate("vqa", model, str(tmp_path / "vqa_ds"), generation=gen, progress=False,
                                 prompt=None)
    assert report["evaluated"] == 2 and report["metrics"]["accuracy"] == pytest.approx(50.0)


def test_eval_table_without_the_columns_names_them(opt_dir, photos, tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    pq.write_table(pa.table({"image": [photos[0].read_bytes()], "question": ["what?"]}), tmp_path / "q.parquet")
    with pytest.raises(ValueError, match=r"q.parquet: no column for \['answers'\]"):
        evaluation.evaluate("vqa", blip2.load(opt_dir), str(tmp_path / "q.parquet"), progress=False)
