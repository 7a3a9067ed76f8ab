"""`blip2 serve` on tiny random checkpoints, over real HTTP on 127.0.0.1: API schema, streaming, batching
equivalence (batched = alone = transformers' generate), limits, malformed and fuzzed requests, disconnects.
Also the two decoding-loop hooks the server relies on (GenerationConfig.streamer / .generator) and the batcher."""

from __future__ import annotations

import base64
import functools
import http.client
import io
import json
import random
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlparse

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
pytest.importorskip("uvicorn", reason="the serve extra (fastapi, uvicorn) is not installed")

import blip2  # noqa: E402
from blip2.generation import GenerationConfig  # noqa: E402
from blip2.serve import BackgroundServer, ServeSettings, create_app  # noqa: E402
from blip2.serve.batching import Batcher, Job, QueueFull  # noqa: E402
from fixtures import make_bert_tokenizer, sample_image  # noqa: E402
from hf_models import NUM_QUERY, QFORMER, VISION, _randomize  # noqa: E402
from hf_models import checkpoint_with_processor as _checkpoint  # noqa: E402
from test_api import _reference_texts  # noqa: E402

# the server decodes greedily with transformers' defaults unless a request says otherwise; the model's methods
# default to the original implementation's settings, so comparisons spell the server's out
SERVER = dict(num_beams=1, min_new_tokens=0, length_penalty=1.0, repetition_penalty=1.0)
IMAGES = [sample_image(40), sample_image((48, 36)).rotate(90), sample_image(33).convert("L"), sample_image(52)]
QUESTIONS = ["what is the man holding?", "what color is the cat?", "describe the image", "is it raining?"]
VQA = "Question: {} Short answer:"
JSON = {"Content-Type": "application/json"}


def data_url(img, fmt="PNG") -> str:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def chat_body(img, text=None, **kw) -> dict:
    content = [{"type": "image_url", "image_url": {"url": data_url(img)}}]
    if text is not None:
        content.append({"type": "text", "text": text})
    return {"model": "tiny", "messages": [{"role": "user", "content": content}], **kw}


class Client:
    """Plain http.client against a server on loopback: (status, parsed body)."""

    def __init__(self, url: str):
        u = urlparse(url)
        self.host, self.port = u.hostname, u.port

    def request(self, method, path, body=None, raw: bytes | None = None, headers=None):
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, data, {"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        text = r.read().decode()
        conn.close()
        ctype = r.getheader("content-type", "")
        if ctype.startswith("application/json"):
            return r.status, json.loads(text)
        if ctype.startswith("text/event-stream"):
            return r.status, [json.loads(x[6:]) if x[6:] != "[DONE]" else "[DONE]"
                              for x in text.split("\n\n") if x.startswith("data: ")]
        return r.status, text

    def post(self, path, body=None, **kw):
        return self.request("POST", path, body, **kw)

    def get(self, path):
        return self.request("GET", path)


def answer(client, body):
    status, out = client.post("/v1/chat/completions", body)
    assert status == 200, out
    return [c["message"]["content"] for c in out["choices"]]


# ------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    d = tmp_path_factory.mktemp("serve-opt")
    hf, proc = _checkpoint("blip2-opt", d)
    return d, hf, proc, blip2.load(d)


def _server(model, **settings):
    return BackgroundServer(create_app(model, ServeSettings(model_name="tiny", **settings)))


@pytest.fixture(scope="module")
def srv(opt):
    with _server(opt[3], max_wait_ms=2) as s:
        yield Client(s.url)


@pytest.fixture(scope="module")
def batch_srv(opt):
    """The batch-at-once engine, waiting 300 ms for company, so that concurrent requests share batches."""
    with _server(opt[3], engine="batch", max_wait_ms=300, max_batch_rows=16) as s:
        yield Client(s.url)


def concurrently(client, path, bodies):
    with ThreadPoolExecutor(len(bodies)) as pool:
        return list(pool.map(lambda b: client.post(path, b), bodies))


# ------------------------------------------------------------------------------------------- schema
def test_models_health_and_page(srv):
    status, models = srv.get("/v1/models")
    assert status == 200 and models["object"] == "list"
    m = models["data"][0]
    assert m["id"] == "tiny" and m["architecture"] == "blip2" and m["capabilities"] == ["chat", "caption"]
    status, health = srv.get("/health")
    assert status == 200 and health["status"] == "ok" and health["pending"] == 0
    status, page = srv.get("/")
    assert status == 200 and '<input id="file" type="file"' in page and "/v1/chat/completions" in page
    status, err = srv.get("/nope")
    assert status == 404 and "message" in err["error"]


def test_chat_matches_transformers(opt, srv):
    _, hf, proc, _ = opt
    status, out = srv.post("/v1/chat/completions", chat_body(IMAGES[0], QUESTIONS[0], max_tokens=7))
    assert status == 200
    assert out["object"] == "chat.completion" and out["model"] == "tiny" and out["id"].startswith("chatcmpl-")
    (choice,) = out["choices"]
    assert choice["index"] == 0 and choice["message"]["role"] == "assistant"
    expected = _reference_texts("blip2-opt", hf, proc, IMAGES[:1], [VQA.format(QUESTIONS[0])], max_new_tokens=7)
    assert choice["message"]["content"] == expected[0]
    usage = out["usage"]
    assert choice["finish_reason"] in ("stop", "length") and 1 <= usage["completion_tokens"] <= 7
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    # no text: a caption (BLIP-2 starts from BOS), as the library's caption()
    status, out = srv.post("/v1/caption", {"image": data_url(IMAGES[1]), "max_tokens": 6})
    assert status == 200 and out["captions"][0]["text"] == opt[3].caption([IMAGES[1]], max_new_tokens=6, **SERVER)[0]
    assert answer(srv, chat_body(IMAGES[1], max_tokens=6)) == [out["captions"][0]["text"]]


def test_multi_turn_prompt(opt, srv):
    body = chat_body(IMAGES[0], "what is it?", max_tokens=5)
    body["messages"] += [{"role": "assistant", "content": "a man"}, {"role": "user", "content": "where is he?"}]
    prompt = "Question: what is it? Short answer: a man Question: where is he? Short answer:"
    assert answer(srv, body) == opt[3].instruct([IMAGES[0]], [prompt], max_new_tokens=5, **SERVER)


def test_stream_equals_non_stream(srv):
    body = chat_body(IMAGES[2], QUESTIONS[2], max_tokens=16)
    status, events = srv.post("/v1/chat/completions", {**body, "stream": True})
    assert status == 200 and events[-1] == "[DONE]"
    chunks = events[:-1]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    deltas = [c["choices"][0]["delta"]["content"] for c in chunks[1:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("stop", "length") and chunks[-1]["choices"][0]["delta"] == {}
    assert len(deltas) >= 2, "the answer should arrive in several pieces"
    assert "".join(deltas) == answer(srv, body)[0]


# ------------------------------------------------------------------------------------------- batching
def _batched(client) -> int:
    return client.get("/health")[1]["largest_batch"]


def test_greedy_batched_equals_alone_and_transformers(opt, batch_srv, srv):
    _, hf, proc, _ = opt
    lengths = [3, 9, 6, 12]  # different max_tokens share a batch; each request ends at its own length
    bodies = [chat_body(img, q, max_tokens=k) for img, q, k in zip(IMAGES, QUESTIONS, lengths)]
    bodies.append({**bodies[1], "stream": True})
    results = concurrently(batch_srv, "/v1/chat/completions", bodies)
    assert _batched(batch_srv) >= 4, "the requests did not share a batch"
    together = [out["choices"][0]["message"]["content"] for _, out in results[:4]]
    alone = [answer(srv, b)[0] for b in bodies[:4]]
    assert together == alone
    for img, q, k, text in zip(IMAGES, QUESTIONS, lengths, together):
        assert text == _reference_texts("blip2-opt", hf, proc, [img], [VQA.format(q)], max_new_tokens=k)[0]
    streamed = "".join(c["choices"][0]["delta"].get("content", "") for c in results[4][1][:-1])
    assert streamed == together[1]


def test_sampling_seeded_batched_equals_alone_and_transformers(opt, batch_srv, srv):
    _, hf, proc, _ = opt
    kw = dict(temperature=0.9, top_p=0.95, n=2, max_tokens=8)
    bodies = [chat_body(img, q, seed=s, **kw) for img, q, s in zip(IMAGES, QUESTIONS, (11, 12, 13, 14))]
    results = concurrently(batch_srv, "/v1/chat/completions", bodies)
    together = [[c["message"]["content"] for c in out["choices"]] for _, out in results]
    assert [out["seed"] for _, out in results] == [11, 12, 13, 14]
    assert together == [answer(srv, b) for b in bodies]
    # alone, a seed gives what transformers samples after torch.manual_seed(seed)
    torch.manual_seed(11)
    ref = _reference_texts("blip2-opt", hf, proc, IMAGES[:1], [VQA.format(QUESTIONS[0])], do_sample=True,
                           temperature=0.9, top_p=0.95, top_k=0, num_return_sequences=2, max_new_tokens=8)
    assert together[0] == ref
    assert answer(srv, {**bodies[0], "seed": 99}) != together[0]  # (2 x 8 random tokens: never equal by chance)
    status, events = srv.post("/v1/chat/completions", {**bodies[2], "stream": True})  # n = 2 streams, by index
    streams = ["".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]
                       if e["choices"][0]["index"] == i) for i in range(2)]
    assert streams == together[2]


def test_beam_search_batched_equals_alone(opt, batch_srv, srv):
    bodies = [chat_body(img, q, num_beams=3, max_tokens=6) for img, q in zip(IMAGES[:3], QUESTIONS)]
    results = concurrently(batch_srv, "/v1/chat/completions", bodies)
    together = [out["choices"][0]["message"]["content"] for _, out in results]
    assert together == [answer(srv, b)[0] for b in bodies]
    prompts = [VQA.format(q) for q in QUESTIONS[:3]]
    assert together == opt[3].instruct(IMAGES[:3], prompts, max_new_tokens=6, **{**SERVER, "num_beams": 3})
    status, events = srv.post("/v1/chat/completions", {**bodies[0], "stream": True})  # beams: one piece at the end
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in events[:-1]) == together[0]


@pytest.mark.parametrize("kind", ["instructblip-t5"])
def test_instructblip_batched_equals_alone_and_transformers(kind, tmp_path):
    hf, proc = _checkpoint(kind, tmp_path)
    model = blip2.load(tmp_path)
    with _server(model, engine="batch", max_wait_ms=300) as s, _server(model, max_batch_rows=1) as one:
        c, c1 = Client(s.url), Client(one.url)
        bodies = [chat_body(img, q, max_tokens=k) for img, q, k in zip(IMAGES[:3], QUESTIONS, (5, 8, 3))]
        together = [out["choices"][0]["message"]["content"] for _, out in concurrently(c, "/v1/chat/completions",
                                                                                       bodies)]
        assert _batched(c) == 3
        assert together == [answer(c1, b)[0] for b in bodies]
        for img, q, k, text in zip(IMAGES, QUESTIONS, (5, 8, 3), together):
            assert text == _reference_texts(kind, hf, proc, [img], [q], max_new_tokens=k)[0]
        status, events = c.post("/v1/chat/completions", {**bodies[1], "stream": True})
        assert "".join(e["choices"][0]["delta"].get("content", "") for e in events[:-1]) == together[1]


# ------------------------------------------------------------------------------------------- ITM, Q-Former
@pytest.fixture(scope="module")
def retrieval(tmp_path_factory):
    from transformers import AutoTokenizer, Blip2Config, Blip2ForImageTextRetrieval

    d = tmp_path_factory.mktemp("serve-itm")
    cfg = Blip2Config(vision_config=VISION, qformer_config={**QFORMER, "use_qformer_text_input": True,
                                                            "vocab_size": 400},
                      num_query_tokens=NUM_QUERY, image_text_hidden_size=16)
    torch.manual_seed(0)
    hf = _randomize(Blip2ForImageTextRetrieval(cfg), 0).eval()
    hf.save_pretrained(d)
    AutoTokenizer.from_pretrained(make_bert_tokenizer(d / "_tok")).save_pretrained(d)
    return hf, blip2.load(d)


def test_itm_matches_transformers_and_batches(retrieval):
    hf, model = retrieval
    texts = [["a cat on a couch", "a dog"], ["a man riding a bicycle down a city street", "rain", "a bus"]]
    with _server(model, max_wait_ms=300) as s:
        c = Client(s.url)
        bodies = [{"image": data_url(img), "texts": t} for img, t in zip(IMAGES, texts)]
        results = concurrently(c, "/v1/itm", bodies)
        assert _batched(c) == 2
        for (status, out), img, t, body in zip(results, IMAGES, texts, bodies):
            assert status == 200 and [x["index"] for x in out["scores"]] == list(range(len(t)))
            alone = c.post("/v1/itm", body)[1]["scores"]
            px = model.processor.images([img]).repeat(len(t), 1, 1, 1)
            enc = model.processor.tokenizer(t, padding=True, padding_side="right", return_tensors="pt")
            with torch.no_grad():
                itm = hf(pixel_values=px, input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                         use_image_text_matching_head=True).logits_per_image.softmax(-1)[:, 1]
                itc = hf(pixel_values=px[:1], input_ids=enc["input_ids"],
                         attention_mask=enc["attention_mask"]).logits_per_image[0]
            for key, ref in (("itm", itm), ("itc", itc)):
                got = torch.tensor([x[key] for x in out["scores"]])
                torch.testing.assert_close(got, ref.float(), atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(got, torch.tensor([x[key] for x in alone]), atol=1e-5, rtol=1e-4)
        status, err = c.post("/v1/chat/completions", chat_body(IMAGES[0], "hi"))
        assert status == 400 and "language model" in err["error"]["message"]
        status, err = c.post("/v1/caption", {"image": data_url(IMAGES[0])})  # no Q-Former LM head either
        assert status == 400 and "cannot generate" in err["error"]["message"]


def test_qformer_caption_stage1(tmp_path):
    from blip2.config import Blip2Config
    from blip2.model import Blip2Model
    from blip2.processing import ImageProcessor, Processor
    from transformers import AutoTokenizer

    cfg = Blip2Config.from_preset("tiny-stage1")
    cfg.qformer.vocab_size = 400
    torch.manual_seed(0)
    model = Blip2Model.from_config(cfg).eval()
    tok = AutoTokenizer.from_pretrained(make_bert_tokenizer(tmp_path / "tok"))
    model.processor = Processor(ImageProcessor(image_size=32), tok)
    with _server(model, max_wait_ms=200) as s:
        c = Client(s.url)
        assert c.get("/v1/models")[1]["data"][0]["capabilities"] == ["caption", "itm"]
        bodies = [{"image": data_url(img), "max_tokens": 6} for img in IMAGES[:3]]
        got = [out["captions"][0]["text"] for _, out in concurrently(c, "/v1/caption", bodies)]
        assert got == model.caption(IMAGES[:3], max_new_tokens=6, **SERVER)
        status, err = c.post("/v1/caption", {**bodies[0], "prompt": "a photo of"})
        assert status == 400 and "no prompt" in err["error"]["message"]


# ------------------------------------------------------------------------------------------- limits
def test_limits(opt, tmp_path):
    IMAGES[0].save(tmp_path / "ok.png")
    small = dict(max_body_bytes=20_000, max_image_pixels=48 * 48, max_prompt_tokens=12, max_tokens=20, max_n=2)
    with _server(opt[3], image_root=str(tmp_path), **small) as s:
        c = Client(s.url)

        def refused(body, status=400, code=None, path="/v1/chat/completions", **kw):
            got, out = c.post(path, body, **kw)
            assert got == status, out
            assert set(out["error"]) == {"message", "type", "code"} and out["error"]["type"] == "invalid_request_error"
            if code:
                assert out["error"]["code"] == code, out
            return out["error"]["message"]

        refused(None, 413, "body_too_large", raw=b"{" + b" " * 30_000 + b"}")
        refused(chat_body(sample_image(64), "hi"), 413, "image_too_large")
        assert "12" in refused(chat_body(IMAGES[0], "a photo of a cat " * 6), code="prompt_too_long")
        assert "max_tokens" in refused(chat_body(IMAGES[0], "hi", max_tokens=21))
        refused(chat_body(IMAGES[0], "hi", max_tokens=0))
        assert "n must be" in refused(chat_body(IMAGES[0], "hi", n=3, temperature=1))
        assert "num_return_sequences" in refused(chat_body(IMAGES[0], "hi", n=2))  # greedy gives one answer
        refused(chat_body(IMAGES[0], "hi", temperature=float("nan")))
        body = chat_body(IMAGES[0], "hi")
        for url, status, code in (("http://127.0.0.1:9/cat.png", 400, "remote_image"),
                                  ("file:///etc/passwd", 403, "path_not_allowed"),
                                  ("../../etc/passwd", 403, "path_not_allowed"),
                                  ("missing.png", 400, "image_not_found")):
            body["messages"][0]["content"][0]["image_url"]["url"] = url
            refused(body, status, code)
        body["messages"][0]["content"][0]["image_url"]["url"] = "ok.png"
        assert c.post("/v1/chat/completions", body)[0] == 200  # inside the image root
        body["messages"][0]["content"][0]["image_url"]["url"] = str(tmp_path / "ok.png")
        assert c.post("/v1/chat/completions", body)[0] == 200
    # context: 4 visual + 1 + prompt + max_tokens must fit the OPT's 128 positions
    with _server(opt[3]) as s:
        c = Client(s.url)
        got, out = c.post("/v1/chat/completions", chat_body(IMAGES[0], "hi", max_tokens=125))
        assert got == 400 and out["error"]["code"] == "context_length_exceeded"
        got, out = c.post("/v1/chat/completions", chat_body(IMAGES[0], "hi", max_tokens=5) | {
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": "file:///x.png"}]}]})
        assert got == 403 and out["error"]["code"] == "local_images_disabled"


MALFORMED = [
    b"", b"not json", b"{", b"[]", b"null", b'"text"', b"\xff\xfe\x00", b'{"messages": []}',
    b'{"messages": [{"role": "user"}]}', b'{"messages": [{"role": "robot", "content": "hi"}]}',
    b'{"messages": [{"role": "user", "content": "no image"}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "video", "url": "x"}]}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:,"}}]}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,'
    b'@@@"}}]}]}',
    b'{"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,'
    + base64.b64encode(b"GIF89a truncated") + b'"}}]}]}',
]


def test_malformed_requests_get_4xx_json(srv):
    png = data_url(IMAGES[0])
    two = json.dumps({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": png}] * 2}]})
    bad_role = json.dumps({"messages": [{"role": "assistant", "content": [{"type": "image_url", "image_url": png}]}]})
    for raw in MALFORMED + [two.encode(), bad_role.encode()]:
        for path in ("/v1/chat/completions", "/v1/caption", "/v1/itm"):
            status, out = srv.post(path, raw=raw)
            assert 400 <= status < 500 and isinstance(out["error"]["message"], str), (path, raw[:80], status, out)
    status, out = srv.request("GET", "/v1/chat/completions")
    assert status == 405 and "error" in out
    for ctype in ("text/plain", ""):  # JSON only with a JSON content type (no cross-site posts without CORS)
        status, out = srv.post("/v1/chat/completions", chat_body(IMAGES[0], "hi"), headers={"Content-Type": ctype})
        assert status == 415 and "application/json" in out["error"]["message"]


_POOL = [None, True, False, -1, 0, 7, 2**70, 1.5, -1e308, float("nan"), float("inf"), "", "x" * 300, "\ud800",
         "caf\u00e9 \U0001f600", [], [{}], {}, {"type": "image_url"}, {"type": "text", "text": 3},
         {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}},
         "data:image/png;base64,AAAA", "http://127.0.0.1:9/x.png", "/etc/passwd", "file:///etc/hosts", "user",
         "assistant", "system", "image_url", "text"]


def _paths(obj, prefix=()):
    yield prefix
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else ()
    for k, v in items:
        yield from _paths(v, prefix + (k,))


def _mutate(rng: random.Random, base: dict):
    body = json.loads(json.dumps(base))
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(list(_paths(body)))
        if not path:
            return rng.choice(_POOL)
        *head, last = path
        parent = functools.reduce(lambda o, k: o[k], head, body)
        action = rng.random()
        if action < 0.25:
            del parent[last]
        elif action < 0.35 and isinstance(parent, dict):
            parent[rng.choice(["stream", "n", "temperature", "top_p", "seed", "max_tokens", "num_beams", "top_k",
                               "texts", "prompt", "image", "zzz"])] = rng.choice(_POOL)
        else:
            parent[last] = rng.choice(_POOL)
    return body


def test_fuzzed_requests_never_500(opt):
    rng = random.Random(1234)
    bases = {"/v1/chat/completions": chat_body(IMAGES[0], "hi", max_tokens=4),
             "/v1/caption": {"image": data_url(IMAGES[0]), "max_tokens": 4},
             "/v1/itm": {"image": data_url(IMAGES[0]), "texts": ["a cat"]}}
    with _server(opt[3], max_tokens=8, max_n=2) as s:
        c = Client(s.url)
        statuses = []
        for i in range(240):
            path = rng.choice(list(bases))
            if i % 20 == 0:  # raw bytes: cut JSON or noise
                text = json.dumps(bases[path]).encode()
                raw = text[: rng.randint(0, len(text) - 1)] if i % 40 else bytes(rng.randrange(256) for _ in range(64))
                status, out = c.post(path, raw=raw)
            else:
                status, out = c.post(path, _mutate(rng, bases[path]))
            statuses.append(status)
            assert status < 500, (path, status, out)
            if status >= 400:
                assert isinstance(out["error"]["message"], str), out
            elif isinstance(out, list):  # a mutation turned streaming on
                assert out[-1] == "[DONE]" and not any("error" in e for e in out[:-1]), out
        assert statuses.count(200) >= 10 and sum(400 <= s < 500 for s in statuses) >= 150  # both kinds exercised
        assert c.get("/health")[1]["pending"] == 0


# ------------------------------------------------------------------------------------------- slots
@pytest.fixture
def slow_llm(opt, monkeypatch):
    """Every LLM forward takes 20 ms longer, so that requests are still running when the client leaves."""
    llm = opt[3].llm
    forward = llm.forward

    @functools.wraps(forward)
    def slow(*a, **kw):
        time.sleep(0.02)
        return forward(*a, **kw)

    monkeypatch.setattr(llm, "forward", slow)
    return opt[3]


def _wait_for(cond, timeout=5.0):
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


def test_disconnect_frees_slot_and_stops_work(slow_llm):
    with _server(slow_llm, max_pending=2, max_wait_ms=1) as s:
        c = Client(s.url)
        # streaming: read the first event, then hang up
        conn = http.client.HTTPConnection(c.host, c.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps(chat_body(IMAGES[0], "hi", max_tokens=100,
                                                                          stream=True)), JSON)
        r = conn.getresponse()
        assert r.status == 200 and r.readline().startswith(b"data: ")
        assert c.get("/health")[1]["pending"] == 1
        t0 = time.monotonic()
        conn.sock.close()
        conn.close()
        assert _wait_for(lambda: c.get("/health")[1]["pending"] == 0), "the slot was not freed"
        # the abandoned batch stopped: a new request is not stuck behind 100 slow steps (2 s)
        assert c.post("/v1/chat/completions", chat_body(IMAGES[0], "hi", max_tokens=2))[0] == 200
        assert time.monotonic() - t0 < 1.5
        # not streaming: send and hang up without reading
        conn = http.client.HTTPConnection(c.host, c.port, timeout=30)
        conn.request("POST", "/v1/chat/completions", json.dumps(chat_body(IMAGES[0], "hi", max_tokens=100)), JSON)
        assert _wait_for(lambda: c.get("/health")[1]["pending"] == 1)
        conn.sock.close()
        conn.close()
        assert _wait_for(lambda: c.get("/health")[1]["pending"] == 0), "the slot was not freed"


def test_full_queue_is_503(slow_llm):
    with _server(slow_llm, max_pending=1, max_wait_ms=1) as s:
        c = Client(s.url)
        first = threading.Thread(target=c.post, args=("/v1/chat/completions", chat_body(IMAGES[0], "hi",
                                                                                          max_tokens=30)))
        first.start()
        assert _wait_for(lambda: c.get("/health")[1]["pending"] == 1)
        status, out = c.post("/v1/chat/completions", chat_body(IMAGES[0], "hi", max_tokens=2))
        first.join()
        assert status == 503 and out["error"]["code"] == "busy"


@pytest.mark.parametrize("engine", ["batch", "continuous"])
def test_model_failure_is_a_json_500_or_an_error_event(opt, monkeypatch, engine):
    def broken(*a, **kw):
        raise RuntimeError("out of memory (simulated)")

    with _server(opt[3], engine=engine) as s:
        c = Client(s.url)
        monkeypatch.setattr(opt[3].llm, "forward", broken)
        status, out = c.post("/v1/chat/completions", chat_body(IMAGES[0], "hi"))
        assert status == 500 and out["error"]["type"] == "server_error" and "simulated" in out["error"]["message"]
        status, events = c.post("/v1/chat/completions", chat_body(IMAGES[0], "hi", stream=True))
        assert status == 200 and "simulated" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
        monkeypatch.undo()
        assert c.post("/v1/chat/completions", chat_body(IMAGES[0], "hi"))[0] == 200  # the worker survived
        assert c.get("/health")[1]["pending"] == 0


# ------------------------------------------------------------------------------------------- pieces
def test_batcher_groups_by_key_and_isolates_failures():
    ran = []

    def run(jobs):
        ran.append([j.payload for j in jobs])
        for j in jobs:
            if j.payload == "bad":
                raise ValueError("bad job")
            j.done(j.payload)

    b = Batcher(run, max_batch_rows=3, max_wait_s=0.2, max_pending=10)
    events = {}
    jobs = [Job(key=k, payload=p, rows=r) for k, p, r in
            [("a", "a1", 1), ("b", "b1", 1), ("a", "a2", 2), ("a", "a3", 1), ("c", "bad", 1), ("c", "c1", 1)]]
    for j in jobs:
        j.emit = lambda e, j=j: events.setdefault(j.payload, e)
    gone = Job(key="a", payload="gone")
    b.start()
    with b._cond:  # queue everything before the worker looks
        for j in jobs + [gone]:
            b.submit(j)
        b.cancel(gone)
    assert _wait_for(lambda: len(events) == 6)
    b.stop()
    assert ran[0] == ["a1", "a2"] and ran[1] == ["b1"] and ran[2] == ["a3"]  # 1 + 2 rows fill a batch of 3
    assert ran[3] == ["bad", "c1"] and ran[4:] == [["bad"], ["c1"]]  # a failed batch reruns its jobs alone
    assert events["c1"] == ("done", "c1") and events["bad"][0] == "error"
    assert "gone" not in sum(ran, []) and b.stats()["pending"] == 0
    full = Batcher(run, max_pending=1)
    full.start()
    with full._cond:
        full.submit(Job(key="a", payload="x"))
        with pytest.raises(QueueFull):
            full.submit(Job(key="a", payload="y"))
    full.stop()


def test_generation_hooks_stream_and_per_input_generators(opt):
    model = opt[3]
    px = model.processor.images(IMAGES[:3])
    ids, mask = model.processor.tokenize_prompts(QUESTIONS[:3])
    seen = []
    out = model.generate(px, input_ids=ids, attention_mask=mask, max_new_tokens=6,
                         streamer=lambda tokens, t: seen.append(tokens.clone()))
    assert torch.equal(torch.stack(seen, 1), out)  # the streamer saw every token the loop returned

    def sample(i, gens):
        return model.generate(px[i], input_ids=ids[i], attention_mask=mask[i], max_new_tokens=6, do_sample=True,
                              num_return_sequences=2, generator=gens)

    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731
    together = sample(slice(0, 3), gens([5, 6, 7]))
    alone = torch.cat([sample(slice(i, i + 1), gens([s])[0]) for i, s in enumerate([5, 6, 7])])
    assert torch.equal(together, alone)
    with pytest.raises(ValueError, match="2 generators for a batch of 3"):
        sample(slice(0, 3), gens([5, 6]))
    with pytest.raises(ValueError, match="num_beams == 1"):
        GenerationConfig(num_beams=2, generator=gens([1]))
    with pytest.raises(ValueError, match="streamer must be callable"):
        GenerationConfig(streamer=3)


def test_import_blip2_needs_no_fastapi_and_cli_has_serve(opt):
    code = ("import sys, blip2, blip2.serve, blip2.serve.batching, blip2.serve.engine; "
            "assert 'fastapi' not in sys.modules and 'uvicorn' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    r = subprocess.run([sys.executable, "-m", "blip2.cli", "serve", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "--max-batch-size" in r.stdout and "--image-root" in r.stdout
