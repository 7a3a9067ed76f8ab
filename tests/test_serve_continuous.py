"""Continuous batching, the visual-prompt cache and the server's operations (metrics, request ids, API key,
CORS, back-pressure, graceful shutdown), on tiny random checkpoints.

Equality is checked against the batch-at-once engine running each request alone (itself checked against
transformers in test_serve.py), for greedy, beam and seeded sampling requests that share the step loop and join
it while others decode."""

from __future__ import annotations

import functools
import http.client
import json
import threading
import time

import pytest
import torch

pytest.importorskip("fastapi", reason="the serve extra (fastapi, uvicorn) is not installed")
pytest.importorskip("prometheus_client", reason="the serve extra (prometheus-client) is not installed")

import blip2  # noqa: E402
from blip2.serve import BackgroundServer, ServeSettings, create_app  # noqa: E402
from blip2.serve.continuous import ContinuousBatcher  # noqa: E402
from blip2.generation import GenerationConfig  # noqa: E402
from blip2.search import GreedySearch, plain_greedy  # noqa: E402
from blip2.serve.engine import Decoding, Engine, Progress  # noqa: E402
from blip2.serve.vcache import VisualCache  # noqa: E402
from hf_models import checkpoint_with_processor as _checkpoint  # noqa: E402
from test_serve import IMAGES, JSON, QUESTIONS, Client, chat_body  # noqa: E402


@pytest.fixture(scope="module")
def opt(tmp_path_factory):
    d = tmp_path_factory.mktemp("cont-opt")
    _checkpoint("blip2-opt", d)
    return blip2.load(d)


def _slow(model, monkeypatch, seconds=0.004):
    """Every LLM forward takes a little longer, so that requests overlap in the step loop."""
    forward = model.llm.forward

    @functools.wraps(forward)
    def slow(*a, **kw):
        time.sleep(seconds)
        return forward(*a, **kw)

    monkeypatch.setattr(model.llm, "forward", slow)


def _prefills(model, monkeypatch) -> list[int]:
    """The rows of every LLM prefill (a forward with inputs_embeds) from now on, appended as they run."""
    prefills = []
    forward = model.llm.forward

    @functools.wraps(forward)
    def spy(*a, **kw):
        if kw.get("inputs_embeds") is not None:
            prefills.append(kw["inputs_embeds"].shape[0])
        return forward(*a, **kw)

    monkeypatch.setattr(model.llm, "forward", spy)
    return prefills


def _job(engine, i, decoding=Decoding(), max_tokens=8, seed=None, text=None):
    question = QUESTIONS[i % len(QUESTIONS)] if text is None else text
    prompt = engine.template.replace("{}", question, 1) if question else ""
    job = engine.generation_job(IMAGES[i % len(IMAGES)], prompt, decoding, max_tokens, seed, False)
    done = threading.Event()
    job.result = None

    def emit(event):
        if event[0] in ("done", "error"):
            job.result = event[1] if event[0] == "done" else event[1]
            done.set()

    job.emit, job.event = emit, done
    return job


def _texts(job) -> list[str]:
    assert isinstance(job.result, dict), job.result
    return [c["text"] for c in job.result["choices"]]


def _alone(engine, job_args) -> list[list[str]]:
    """Each request alone through the batch-at-once engine."""
    out = []
    for args in job_args:
        job = _job(engine, *args)
        engine.run([job])
        out.append(_texts(job))
    return out


MIX = [  # (image / question index, decoding, max_tokens, seed): the kinds of request that share the engine
    (0, Decoding(), 20, None),  # the long one: the others join while it decodes
    (1, Decoding(num_beams=3), 6, None),
    (2, Decoding(do_sample=True, temperature=0.9, top_p=0.95, n=2), 8, 7),
    (3, Decoding(), 3, None),
    (1, Decoding(num_beams=3, n=2), 7, None),
    (2, Decoding(do_sample=True, temperature=0.7, top_k=20, num_beams=2), 5, 3),  # beam sampling
]


@pytest.mark.parametrize("chunk", [256, 5])  # 5: every prompt is prefilled in several chunks between steps
def test_continuous_equals_alone_with_requests_joining_mid_decode(opt, monkeypatch, chunk):
    engine = Engine(opt, ServeSettings(model_name="tiny"))
    expected = _alone(engine, MIX)
    _slow(opt, monkeypatch)
    batcher = ContinuousBatcher(engine, max_batch_rows=16, prefill_chunk=chunk).start()
    try:
        jobs = [_job(engine, *MIX[0])]
        batcher.submit(jobs[0])
        while jobs[0].payload.first_token_at is None:  # the first request is decoding ...
            time.sleep(0.002)
        for args in MIX[1:]:  # ... when the others arrive, one by one
            jobs.append(batcher.submit(_job(engine, *args)))
            time.sleep(0.01)
        for job in jobs:
            assert job.event.wait(60)
        assert [_texts(j) for j in jobs] == expected
        stats = batcher.stats()
        assert stats["largest_batch"] >= 3, stats  # they did decode together
        assert jobs[0].payload.first_token_at < jobs[1].arrived  # and joined a running decode
        assert all(j.finished for j in jobs) and stats["pending"] == 0
    finally:
        batcher.stop()


def test_requests_starting_together_share_one_prefill(opt, monkeypatch):
    """Requests admitted at the same step boundary: one batched encoder / Q-Former pass and one left-padded
    prefill, and still each one's ids alone."""
    engine = Engine(opt, ServeSettings(model_name="tiny"))
    args = [(i, Decoding(), k, None) for i, k in zip(range(4), (5, 9, 3, 7))]
    args.append((1, Decoding(do_sample=True, temperature=0.8), 6, 21))
    expected = _alone(engine, args)
    prefills = _prefills(opt, monkeypatch)
    batcher = ContinuousBatcher(engine, max_batch_rows=16).start()
    with batcher._cond:  # the worker cannot take any before all are queued: they are admitted together
        jobs = [batcher.submit(_job(engine, *a)) for a in args]
    try:
        assert all(j.event.wait(60) for j in jobs)
        assert [_texts(j) for j in jobs] == expected
        assert prefills == [5], prefills  # one prefill of the five prompts (left-padded to the longest)
    finally:
        batcher.stop()


def test_finished_requests_leave_and_waiting_ones_join_at_once(opt, monkeypatch):
    """A request waiting for a row of a full batch starts as soon as a row frees up, not when the batch ends."""
    engine = Engine(opt, ServeSettings(model_name="tiny"))
    engine.eos = set()  # no EOS: every request runs to its max_tokens
    _slow(opt, monkeypatch, 0.01)
    batcher = ContinuousBatcher(engine, max_batch_rows=2).start()
    try:
        jobs = [_job(engine, 0, max_tokens=40), _job(engine, 1, max_tokens=2), _job(engine, 2, max_tokens=2)]
        ended = {}
        for j in jobs:
            emit = j.emit
            j.emit = functools.partial(lambda job, emit, event: (ended.setdefault(id(job), time.monotonic()),
                                                                 emit(event)), j, emit)
            batcher.submit(j)
        assert all(j.event.wait(60) for j in jobs)
        assert [j.result["choices"][0]["tokens"] for j in jobs] == [40, 2, 2]
        assert ended[id(jobs[2])] < ended[id(jobs[0])]  # the third joined when the second left
        assert batcher.stats()["largest_batch"] == 2
    finally:
        batcher.stop()


def test_plain_greedy_rows_share_one_argmax_and_each_equals_alone(opt, monkeypatch):
    """Plain greedy requests (one row, no logits processing) with different max_tokens and stop conditions
    (EOS or max_tokens), joining at different steps, next to a sampling request: their tokens come from the
    step's one argmax over all rows (no per-request search), and each result equals the request alone."""
    engine = Engine(opt, ServeSettings(model_name="tiny"))
    seen = []
    add = Progress.add
    monkeypatch.setattr(Progress, "add", lambda self, toks, t: (seen.append(toks[0]), add(self, toks, t))[1])
    _alone(engine, [(0, Decoding(), 12, None)])
    monkeypatch.setattr(Progress, "add", add)
    engine.eos = engine.eos | {seen[3]}  # a token request 0 emits early becomes an EOS: some requests stop on it
    args = [(0, Decoding(), 12, None), (1, Decoding(), 3, None), (2, Decoding(), 16, None),
            (3, Decoding(), 1, None), (1, Decoding(do_sample=True, temperature=0.9, n=2), 6, 5),
            (2, Decoding(), 7, None), (0, Decoding(), 9, None)]
    expected = []
    for a in args:
        job = _job(engine, *a)
        engine.run([job])
        expected.append(job.result["choices"])
    reasons = {c["finish_reason"] for choices in expected for c in choices}
    assert reasons == {"stop", "length"}, expected  # both stop conditions occur
    searched = []
    step = GreedySearch.step
    monkeypatch.setattr(GreedySearch, "step", lambda self, logits: (searched.append(logits.shape[0]),
                                                                     step(self, logits))[1])
    _slow(opt, monkeypatch)
    batcher = ContinuousBatcher(engine, max_batch_rows=16).start()
    try:
        jobs = [batcher.submit(_job(engine, *args[0]))]
        while jobs[0].payload.first_token_at is None:
            time.sleep(0.002)
        for a in args[1:]:  # one joins every couple of steps
            jobs.append(batcher.submit(_job(engine, *a)))
            time.sleep(0.009)
        assert all(j.event.wait(60) for j in jobs)
        assert [j.result["choices"] for j in jobs] == expected
        assert searched and set(searched) == {2}, searched  # only the sampling request ran its own search
        assert batcher.stats()["largest_batch"] >= 3
    finally:
        batcher.stop()


def test_plain_greedy_is_greedy_without_logits_processing():
    """Requests with a repetition penalty, a minimum length, sampling or beams keep their own search."""
    assert plain_greedy(GenerationConfig(max_new_tokens=4))
    for kw in ({"repetition_penalty": 1.3}, {"min_new_tokens": 2}, {"do_sample": True}, {"num_beams": 2}):
        assert not plain_greedy(GenerationConfig(max_new_tokens=4, **kw)), kw


def test_a_full_batch_admits_waiting_requests_in_groups(opt, monkeypatch):
    """Rows that free up one at a time are refilled admit_group at a time: one encoder / Q-Former pass and one
    prefill for the group, not one per request; each result still equals the request alone."""
    engine = Engine(opt, ServeSettings(model_name="tiny"))
    engine.eos = set()  # no EOS: every request runs to its max_tokens
    args = [(i, Decoding(), k, None) for i, k in enumerate((3, 4, 12, 12, 2, 2, 2, 2))]
    expected = _alone(engine, args)
    prefills = _prefills(opt, monkeypatch)
    batcher = ContinuousBatcher(engine, max_batch_rows=4, admit_group=2).start()
    with batcher._cond:  # all queued before the worker takes any
        jobs = [batcher.submit(_job(engine, *a)) for a in args]
    try:
        assert all(j.event.wait(60) for j in jobs)
        assert [_texts(j) for j in jobs] == expected
        # the first four together; the 3- and 4-token ones leave one step apart, and the two waiting requests
        # start together when both rows are free; then the last two, when those leave together
        assert prefills == [4, 2, 2], prefills
    finally:
        batcher.stop()


def test_visual_cache_lru_bound():
    cache = VisualCache(max_bytes=3 * 400)  # room for three [10, 10] float32 tensors
    for i in range(5):
        cache.put(("m", i), torch.full((10, 10), float(i)))
        assert cache.bytes <= cache.max_bytes
        if i == 2:
            assert cache.get(("m", 0)) is not None  # 0 is now the most recently used
    assert len(cache) == 3 and cache.evictions == 2
    assert cache.get(("m", 1)) is None and cache.get(("m", 2)) is None  # the least recently used went first
    assert float(cache.get(("m", 0))[0, 0]) == 0.0 and cache.get(("m", 4)) is not None
    cache.put(("m", "big"), torch.zeros(1000))  # larger than the whole cache: not kept, nothing evicted
    assert cache.get(("m", "big")) is None and len(cache) == 3
    s = cache.stats()
    assert (s["hits"], s["misses"]) == (3, 3) and s["hit_rate"] == 0.5


def test_visual_cache_keys_on_the_instruction_and_changes_no_result(tmp_path):
    _checkpoint("instructblip-opt", tmp_path)
    model = blip2.load(tmp_path)
    engine = Engine(model, ServeSettings(model_name="tiny"))
    cache = VisualCache(2**20)
    batcher = ContinuousBatcher(engine, visual_cache=cache).start()
    try:
        # image 0 with two instructions, then both again; image 0 again with the first; the same pixels each time
        asks = [(0, "what is it?"), (0, "describe the image"), (0, "what is it?"), (0, "describe the image")]
        got = []
        for i, text in asks:
            job = batcher.submit(_job(engine, i, text=text, max_tokens=6))
            assert job.event.wait(60)
            got.append(_texts(job))
        assert (cache.hits, cache.misses) == (2, 2)  # a different instruction is a miss: the queries depend on it
        assert len(cache) == 2
        expected = _alone(engine, [(i, Decoding(), 6, None, text) for i, text in asks])
        assert got == expected  # cached visual prompts give the results computed afresh
    finally:
        batcher.stop()


# ------------------------------------------------------------------------------------------- operations
def _request(url, method, path, body=None, headers=None):
    c = Client(url)
    conn = http.client.HTTPConnection(c.host, c.port, timeout=60)
    conn.request(method, path, json.dumps(body) if body is not None else None, {**JSON, **(headers or {})})
    r = conn.getresponse()
    data = r.read()
    conn.close()
    return r.status, dict(r.getheaders()), data


def test_api_key_request_ids_and_cors(opt):
    body = chat_body(IMAGES[0], "hi", max_tokens=2)
    with BackgroundServer(create_app(opt, ServeSettings(model_name="tiny", api_key="s3cret"))) as s:
        status, headers, data = _request(s.url, "POST", "/v1/chat/completions", body)
        assert status == 401 and headers.get("www-authenticate") == "Bearer"
        assert json.loads(data)["error"]["code"] == "invalid_api_key"
        for wrong in ("Bearer s3cre", "Bearer s3cretx", "s3cret", "Basic s3cret"):
            assert _request(s.url, "POST", "/v1/chat/completions", body, {"Authorization": wrong})[0] == 401
        assert _request(s.url, "GET", "/metrics")[0] == 401
        status, headers, _ = _request(s.url, "POST", "/v1/chat/completions", body,
                                      {"Authorization": "Bearer s3cret", "X-Request-ID": "req-42"})
        assert status == 200 and headers["x-request-id"] == "req-42"
        status, headers, _ = _request(s.url, "GET", "/health")  # open: load balancers probe it
        assert status == 200 and len(headers["x-request-id"]) == 32  # made up when the client sent none
        preflight = {"Origin": "https://elsewhere.example", "Access-Control-Request-Method": "POST"}
        status, headers, _ = _request(s.url, "OPTIONS", "/v1/chat/completions", None, preflight)
        assert "access-control-allow-origin" not in headers  # CORS is off by default
    settings = ServeSettings(model_name="tiny", cors_origins=("https://elsewhere.example",))
    with BackgroundServer(create_app(opt, settings)) as s:
        status, headers, _ = _request(s.url, "OPTIONS", "/v1/chat/completions", None, preflight)
        assert status == 200 and headers["access-control-allow-origin"] == "https://elsewhere.example"


def test_back_pressure_is_429_with_retry_after(opt, monkeypatch):
    _slow(opt, monkeypatch, 0.02)
    settings = ServeSettings(model_name="tiny", max_batch_rows=1, max_queue=1)
    with BackgroundServer(create_app(opt, settings)) as s:
        c = Client(s.url)
        running = threading.Thread(target=c.post, args=("/v1/chat/completions", chat_body(IMAGES[0], "a",
                                                                                          max_tokens=30)))
        running.start()
        deadline = time.monotonic() + 10
        while c.get("/health")[1].get("running_rows", 0) < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        waiting = threading.Thread(target=c.post, args=("/v1/chat/completions", chat_body(IMAGES[1], "b",
                                                                                          max_tokens=2)))
        waiting.start()
        while c.get("/health")[1]["queued"] < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        status, headers, data = _request(s.url, "POST", "/v1/chat/completions", chat_body(IMAGES[2], "c",
                                                                                          max_tokens=2))
        running.join()
        waiting.join()
        assert status == 429 and headers["retry-after"] == "1" and json.loads(data)["error"]["code"] == "rate_limited"
        assert c.post("/v1/chat/completions", chat_body(IMAGES[2], "c", max_tokens=2))[0] == 200  # room again


def test_metrics_parse_with_the_prometheus_parser(opt):
    from prometheus_client.parser import text_string_to_metric_families

    with BackgroundServer(create_app(opt, ServeSettings(model_name="tiny"))) as s:
        c = Client(s.url)
        for _ in range(3):  # the same image three times: one miss, two hits
            assert c.post("/v1/chat/completions", chat_body(IMAGES[0], "hi", max_tokens=3))[0] == 200
        assert c.post("/v1/chat/completions", {"messages": []})[0] == 400
        status, headers, data = _request(s.url, "GET", "/metrics")
        assert status == 200 and headers["content-type"].startswith("text/plain")
    families = {f.name: f for f in text_string_to_metric_families(data.decode())}
    samples = {(x.name, tuple(sorted(x.labels.items()))): x.value for f in families.values() for x in f.samples}
    chat = "/v1/chat/completions"
    assert samples[("blip2_requests_total", (("endpoint", chat), ("status", "200")))] == 3
    assert samples[("blip2_requests_total", (("endpoint", chat), ("status", "400")))] == 1
    assert samples[("blip2_request_latency_seconds_count", (("endpoint", chat),))] == 4
    assert samples[("blip2_time_to_first_token_seconds_count", ())] == 3
    assert 3 <= samples[("blip2_generated_tokens_total", ())] <= 9
    assert samples[("blip2_visual_cache_hits_total", ())] == 2
    assert samples[("blip2_visual_cache_misses_total", ())] == 1
    assert samples[("blip2_visual_cache_bytes", ())] > 0
    for name in ("blip2_queue_depth", "blip2_batch_occupancy", "blip2_tokens_per_second",
                 "blip2_visual_cache_hit_rate"):
        assert families[name].type == "gauge"


def test_graceful_shutdown_finishes_running_requests(opt, monkeypatch):
    _slow(opt, monkeypatch, 0.01)
    server = BackgroundServer(create_app(opt, ServeSettings(model_name="tiny")))
    c = Client(server.url)
    results = []
    t = threading.Thread(target=lambda: results.append(c.post("/v1/chat/completions",
                                                             chat_body(IMAGES[0], "hi", max_tokens=25))))
    t.start()
    deadline = time.monotonic() + 10
    while c.get("/health")[1]["pending"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    server.stop()  # while the request decodes
    t.join(30)
    assert results and results[0][0] == 200, results
    assert results[0][1]["usage"]["completion_tokens"] >= 1
