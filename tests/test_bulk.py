"""Bulk labelling (blip2.bulk): every input kind with a corrupt image among good ones, every output kind,
kill-and-resume, two processes equal to one, and texts equal to `model.caption` / `answer` / `instruct` called
image by image with the same settings."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile

import pytest
import torch
from PIL import Image

import blip2
from blip2.bulk.run import BulkJob, label_dataset
from blip2.sources import expand_braces, open_source
from blip2.cli import main as cli_main
from hf_models import checkpoint_with_processor

GEN = dict(max_new_tokens=6, num_beams=1)
N = 7  # images per mini dataset, one of them corrupt
CORRUPT = 3


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    d = tmp_path_factory.mktemp("blip2-opt")
    checkpoint_with_processor("blip2-opt", d)
    return d


@pytest.fixture(scope="module")
def model(ckpt):
    return blip2.load(ckpt)


def _png(i: int) -> bytes:
    g = torch.Generator().manual_seed(i)
    px = (torch.rand(20 + 3 * i, 24 + i, 3, generator=g) * 255).to(torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(px).save(buf, format="PNG" if i % 2 else "JPEG")
    return buf.getvalue()


def _bytes(i: int) -> bytes:
    return b"\x89PNG\r\n\x1a\n not an image" if i == CORRUPT else _png(i)


def _ext(i: int) -> str:
    return "png" if i % 2 else "jpg"


QUESTIONS = [f"what is {'thing ' * (i % 3)}number {i}?" for i in range(N)]


def _folder(root):
    """root/a/img0.jpg, root/b/img1.png, ...; img3 is corrupt."""
    for i in range(N):
        p = root / "ab"[i % 2] / f"img{i}.{_ext(i)}"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(_bytes(i))
    return root


def _reference(model, paths, task="caption", questions=None, **kw):
    """What the one-image API gives for each readable image."""
    out = {}
    for i, p in enumerate(paths):
        if i == CORRUPT:
            continue
        if task == "caption":
            out[i] = model.caption([str(p)], **kw, **GEN)[0]
        elif task == "ask":
            out[i] = model.answer([str(p)], [questions[i]], **GEN)[0]
        else:
            out[i] = model.instruct([str(p)], [questions[i]], **GEN)[0]
    return out


def _read_jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _job(src, out, **kw):
    kw = {"task": "caption", "batch_size": 3, "workers": 0, "chunk_size": 4, **kw}
    return BulkJob(input=src, output=out, generation=GEN, progress=False, **kw)


def test_braces():
    assert expand_braces("d/{08..10}.tar") == ["d/08.tar", "d/09.tar", "d/10.tar"]
    assert expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]


def test_folder_to_jsonl_equals_one_by_one(model, tmp_path):
    root = _folder(tmp_path / "imgs")
    out = tmp_path / "caps.jsonl"
    s = label_dataset(model, _job(root, out, prompt="a photo of"))
    assert s["complete"] and s["merged"] == {"done": N - 1, "failed": 1, "skipped": 0}
    rows = _read_jsonl(out)
    keys = sorted(f"{'ab'[i % 2]}/img{i}.{_ext(i)}" for i in range(N) if i != CORRUPT)
    assert [r["key"] for r in rows] == keys  # relative paths, sorted
    ref = _reference(model, [root / "ab"[i % 2] / f"img{i}.{_ext(i)}" for i in range(N)], prompt="a photo of")
    assert {r["key"]: r["text"] for r in rows} == {f"{'ab'[i % 2]}/img{i}.{_ext(i)}": t for i, t in ref.items()}
    failed = _read_jsonl(tmp_path / "caps.failed.jsonl")
    assert [f["key"] for f in failed] == ["b/img3.png"] and "img3.png" in failed[0]["error"]
    meta = json.loads((tmp_path / "caps.meta.json").read_text())
    assert meta["generation"] == GEN and meta["done"] == N - 1
    assert not (tmp_path / "caps.jsonl.parts").exists()
    with pytest.raises(ValueError, match="--overwrite"):
        label_dataset(model, _job(root, out, prompt="a photo of"))


def test_path_list_and_parquet_output_with_workers(model, tmp_path):
    root = _folder(tmp_path / "imgs")
    listing = tmp_path / "list.txt"
    names = [f"imgs/{'ab'[i % 2]}/img{i}.{_ext(i)}" for i in range(N)]
    listing.write_text("\n".join(names) + "\n")
    out = tmp_path / "caps.parquet"
    job = _job(listing, out, workers=2)
    label_dataset(model, job)
    import pyarrow.parquet as pq

    table = pq.read_table(out).to_pylist()
    ref = _reference(model, [root.parent / n for n in names])
    assert [r["key"] for r in table] == [names[i] for i in ref]  # the list's order
    assert [r["text"] for r in table] == list(ref.values())


def _tar(path, indices, with_json=True):
    with tarfile.open(path, "w") as tar:
        for i in indices:
            members = {f"{i:06d}.{_ext(i)}": _bytes(i)}
            if with_json:
                members[f"{i:06d}.json"] = json.dumps({"question": QUESTIONS[i]}).encode()
            for name, data in members.items():
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_webdataset_shards_ask_with_question_field(model, tmp_path):
    (tmp_path / "shards").mkdir()
    _tar(tmp_path / "shards" / "00000.tar", range(0, 4))
    _tar(tmp_path / "shards" / "00001.tar", range(4, N))
    out = tmp_path / "answers.jsonl"
    s = label_dataset(model, _job(str(tmp_path / "shards" / "{00000..00001}.tar"), out, task="ask",
                                  question_column="question"))
    assert s["merged"]["failed"] == 1
    rows = _read_jsonl(out)
    paths = []  # the reference reads the same bytes from files
    for i in range(N):
        paths.append(tmp_path / f"ref{i}.{_ext(i)}")
        paths[-1].write_bytes(_bytes(i))
    ref = _reference(model, paths, "ask", QUESTIONS)
    assert [r["key"] for r in rows] == [f"{'00000' if i < 4 else '00001'}.tar/{i:06d}" for i in ref]
    assert [r["text"] for r in rows] == list(ref.values())
    assert [r["question"] for r in rows] == [QUESTIONS[i] for i in ref]
    assert _read_jsonl(tmp_path / "answers.failed.jsonl")[0]["key"] == "00000.tar/000003"


def _ref_files(tmp_path):
    paths = []
    for i in range(N):
        paths.append(tmp_path / f"ref{i}.{_ext(i)}")
        paths[-1].write_bytes(_bytes(i))
    return paths


def test_parquet_bytes_and_datasets_folder(model, tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    ref = _reference(model, _ref_files(tmp_path))
    table = pa.table({"jpg": [_bytes(i) for i in range(N)], "id": [f"id{i}" for i in range(N)]})
    pq.write_table(table, tmp_path / "data.parquet", row_group_size=3)
    out = tmp_path / "p.jsonl"
    label_dataset(model, _job(tmp_path / "data.parquet", out, key_column="id"))
    rows = _read_jsonl(out)
    assert [r["key"] for r in rows] == [f"id{i}" for i in ref] and [r["text"] for r in rows] == list(ref.values())

    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"picture": [{"bytes": _bytes(i), "path": None} for i in range(N)]},
                                    features=datasets.Features({"picture": datasets.Image()}))
    ds.save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "d.jsonl"
    label_dataset(model, _job(tmp_path / "ds", out, image_column="picture"))
    rows = _read_jsonl(out)
    assert [r["text"] for r in rows] == list(ref.values())
    assert _read_jsonl(tmp_path / "d.failed.jsonl")[0]["key"].endswith(f":{CORRUPT}")
    with pytest.raises(ValueError, match="no column 'nope'"):
        open_source(tmp_path / "data.parquet", image_column="nope")


def test_jsonl_instruct_sidecar_and_overwrite(model, tmp_path):
    root = _folder(tmp_path / "imgs")
    listing = tmp_path / "items.jsonl"
    paths = [f"imgs/{'ab'[i % 2]}/img{i}.{_ext(i)}" for i in range(N)]
    listing.write_text("".join(json.dumps({"file": p, "q": QUESTIONS[i]}) + "\n" for i, p in enumerate(paths)))
    (root / "a" / "img0.txt").write_text("kept\n")  # an existing sidecar: kept without --overwrite
    job = BulkJob(task="instruct", input=listing, sidecar=True, image_column="file", question_column="q",
                  batch_size=2, workers=0, chunk_size=3, generation=GEN, progress=False)
    s = label_dataset(model, job)
    assert s["merged"] == {"done": N - 2, "failed": 1, "skipped": 1}
    ref = _reference(model, [tmp_path / p for p in paths], "instruct", QUESTIONS)
    for i, text in ref.items():
        side = (tmp_path / paths[i]).with_suffix(".txt").read_text()
        assert side == ("kept\n" if i == 0 else text + "\n")
    job.overwrite = True
    label_dataset(model, job)
    assert (root / "a" / "img0.txt").read_text() == ref[0] + "\n"


class Killed(Exception):
    pass


def test_kill_and_resume_equals_uninterrupted(model, tmp_path, monkeypatch):
    root = _folder(tmp_path / "imgs")
    label_dataset(model, _job(root, tmp_path / "full.jsonl"))
    calls = {"n": 0}
    real = type(model).caption

    def dies_after_two(self, *a, **kw):
        calls["n"] += 1
        if calls["n"] > 2:
            raise Killed
        return real(self, *a, **kw)

    out = tmp_path / "resumed.jsonl"
    monkeypatch.setattr(type(model), "caption", dies_after_two)
    with pytest.raises(Killed):  # batches of 3, chunks of 4: chunk 0 is written, chunk 1 is not
        label_dataset(model, _job(root, out))
    assert sorted(p.name for p in (tmp_path / "resumed.jsonl.parts").iterdir()) == ["chunk-000000.jsonl",
                                                                                      "meta.json"]
    monkeypatch.setattr(type(model), "caption", real)
    with pytest.raises(ValueError, match="other settings"):
        label_dataset(model, _job(root, out, prompt="another"))
    s = label_dataset(model, _job(root, out))
    # only the missing chunk was labelled again: items 4..6 of the sorted keys, b/img3 (corrupt) among them
    assert (s["done"], s["failed"]) == (2, 1)
    assert out.read_text() == (tmp_path / "full.jsonl").read_text()
    assert (tmp_path / "resumed.failed.jsonl").read_text() == (tmp_path / "full.failed.jsonl").read_text()


def test_two_processes_equal_one(model, tmp_path):
    root = _folder(tmp_path / "imgs")
    label_dataset(model, _job(root, tmp_path / "one.jsonl", chunk_size=2))
    out = tmp_path / "two.jsonl"
    s1 = label_dataset(model, _job(root, out, chunk_size=2), rank=1, world=2)
    assert not s1["complete"] and not out.exists()  # rank 0's chunks are missing
    s0 = label_dataset(model, _job(root, out, chunk_size=2), rank=0, world=2)
    assert s0["complete"] and s0["done"] + s1["done"] == N - 1
    assert out.read_text() == (tmp_path / "one.jsonl").read_text()


def _json_objects(text: str) -> list[dict]:
    """Every JSON object in TEXT, wherever it starts (two processes' lines may share a line of a pipe)."""
    dec, out, i = json.JSONDecoder(), [], text.find("{")
    while i != -1:
        obj, end = dec.raw_decode(text, i)
        out.append(obj)
        i = text.find("{", end)
    return out


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(ckpt, tmp_path):
    """A real 2-process run (torchrun, gloo): each process labels its chunks, process 0 merges after a barrier."""
    root = _folder(tmp_path / "imgs")
    args = ["caption", "--model", str(ckpt), "--input", str(root), "--max-new-tokens", "6", "--num-beams", "1",
            "--workers", "0", "--chunk-size", "2", "--no-progress"]
    assert cli_main([*args, "--output", str(tmp_path / "one.jsonl")]) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
           str(29500 + os.getpid() % 200), "-m", "blip2.cli", *args, "--output", str(tmp_path / "two.jsonl"), "--json"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    summaries = _json_objects(r.stdout)
    assert sorted(s["rank"] for s in summaries) == [0, 1] and all(s["complete"] for s in summaries)
    assert sum(s["done"] for s in summaries) == N - 1
    assert (tmp_path / "two.jsonl").read_text() == (tmp_path / "one.jsonl").read_text()


def test_cli(ckpt, tmp_path, capsys):
    root = _folder(tmp_path / "imgs")
    out = tmp_path / "cli.jsonl"
    assert cli_main(["caption", "--model", str(ckpt), "--input", str(root), "--output", str(out),
                     "--max-new-tokens", "6", "--num-beams", "1", "--no-progress"]) == 0  # default: 1 worker
    assert "6 labelled, 1 failed" in capsys.readouterr().out
    model = blip2.load(ckpt)
    assert _read_jsonl(out)[0]["text"] == model.caption([str(root / "a" / "img0.jpg")], **GEN)[0]
    assert cli_main(["ask", "--model", str(ckpt), "--input", str(root), "--output", str(tmp_path / "a.jsonl")]) == 2
    assert "--question" in capsys.readouterr().err
    assert cli_main(["ask", "--model", str(ckpt), str(root / "a" / "img0.jpg")]) == 2  # no question
