"""Load test for `blip2 serve`: N concurrent clients on loopback, with and without dynamic batching.

Builds a random BLIP-2 (OPT) checkpoint with a small tokenizer (or takes --model DIR), then for each mode starts
`blip2 serve` in a subprocess on a free 127.0.0.1 port, lets N client threads send chat requests back to back
(greedy, one image each, `--max-tokens` new tokens) for `--duration` seconds, and reports throughput (requests/s,
generated tokens/s), p50/p99 latency and the batch sizes the server ran. Every loop is bounded in time and
count, and nothing leaves the machine.

    .venv/bin/python benchmarks/serve.py [--size small] [--clients 16] [--duration 15] [--json out.json]
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

# vision, Q-Former, OPT (random weights; sizes chosen so a CPU step costs a few milliseconds)
SIZES = {
    "tiny": ({"image_size": 32, "patch_size": 8, "hidden_size": 32, "num_layers": 2, "num_heads": 4,
              "mlp_hidden_size": 64},
             {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64, "num_query_tokens": 4},
             {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "word_embed_proj_dim": 32}),
    "small": ({"image_size": 64, "patch_size": 8, "hidden_size": 192, "num_layers": 4, "num_heads": 3,
               "mlp_hidden_size": 768},
              {"hidden_size": 192, "num_layers": 2, "num_heads": 3, "intermediate_size": 768, "num_query_tokens": 16},
              {"hidden_size": 512, "ffn_dim": 2048, "num_hidden_layers": 6, "num_attention_heads": 8,
               "word_embed_proj_dim": 512}),
}
QUESTIONS = ["what is the man holding?", "what color is the cat?", "describe the image", "is it raining?",
             "how many dogs are in the picture?", "where is the boat?"]


def build_checkpoint(size: str | tuple[dict, dict, dict], directory: Path) -> Path:
    """A random checkpoint with a small tokenizer in directory/model; size: a SIZES name or (vision, Q-Former, OPT)."""
    import torch
    from transformers import AutoTokenizer

    from blip2.config import Blip2Config
    from blip2.model import Blip2Model
    from blip2.processing import ImageProcessor, Processor
    from blip2.tiny import make_gpt2_tokenizer

    vision, qformer, opt = SIZES[size] if isinstance(size, str) else size
    tok = AutoTokenizer.from_pretrained(make_gpt2_tokenizer(directory / "_tokenizer", vocab_size=512))
    base = Blip2Config.from_preset("tiny-opt").to_dict()
    cfg = Blip2Config.from_dict({
        **base, "image_token_index": tok.convert_tokens_to_ids("<image>"),
        "vision": {**base["vision"], **vision},
        "qformer": {**base["qformer"], **qformer},
        "llm": {**base["llm"], "hf_config": {**base["llm"]["hf_config"], **opt, "vocab_size": len(tok),
                                             "bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id,
                                             "pad_token_id": tok.pad_token_id, "max_position_embeddings": 256}}})
    torch.manual_seed(0)
    model = Blip2Model.from_config(cfg)
    model.processor = Processor(ImageProcessor(image_size=vision["image_size"]), tok)
    model.save_pretrained(directory / "model")
    return directory / "model"


def _images() -> list[str]:
    from PIL import Image
    from skimage import data

    urls = []
    for name in ("astronaut", "chelsea", "coffee", "rocket"):
        img = Image.fromarray(getattr(data, name)()).convert("RGB").resize((96, 96))
        buf = io.BytesIO()
        img.save(buf, "PNG")
        urls.append("data:image/png;base64," + base64.b64encode(buf.getvalue()).decode())
    return urls


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _call(port: int, method: str, path: str, body: dict | None = None, timeout: float = 120) -> tuple[int, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, json.dumps(body) if body is not None else None,
                     {"Content-Type": "application/json"})
        r = conn.getresponse()
        return r.status, json.loads(r.read())
    finally:
        conn.close()


def start_server(model: Path, batch: int, wait_ms: float, max_pending: int) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    cmd = [sys.executable, "-m", "blip2.cli", "serve", "--model", str(model), "--port", str(port),
           "--max-batch-size", str(batch), "--max-wait-ms", str(wait_ms), "--max-pending", str(max_pending),
           "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if _call(port, "GET", "/health", timeout=2)[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("the server did not start within 180 s")


def load(port: int, clients: int, duration: float, max_requests: int, max_tokens: int, images: list[str]) -> dict:
    """`clients` threads send requests back to back until `duration` seconds pass or `max_requests` were sent."""
    latencies, tokens, errors = [], [], []
    lock = threading.Lock()
    budget = [max_requests]
    t_end = time.monotonic() + duration

    def client(i: int):
        rng = random.Random(i)
        while time.monotonic() < t_end:
            with lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            body = {"messages": [{"role": "user", "content": [
                {"type": "image_url", "image_url": {"url": rng.choice(images)}},
                {"type": "text", "text": rng.choice(QUESTIONS)}]}], "max_tokens": max_tokens}
            t0 = time.perf_counter()
            try:
                status, out = _call(port, "POST", "/v1/chat/completions", body)
            except OSError as e:
                status, out = 0, {"error": str(e)}
            dt = time.perf_counter() - t0
            with lock:
                if status == 200:
                    latencies.append(dt)
                    tokens.append(out["usage"]["completion_tokens"])
                else:
                    errors.append(status)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat = sorted(latencies)

    def pct(q):
        return lat[min(len(lat) - 1, int(q * len(lat)))] * 1000 if lat else float("nan")

    return {"requests": len(lat), "errors": len(errors), "seconds": round(wall, 2),
            "requests_per_s": round(len(lat) / wall, 2), "tokens_per_s": round(sum(tokens) / wall, 1),
            "p50_ms": round(pct(0.50), 1), "p99_ms": round(pct(0.99), 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="checkpoint directory (default: build a random one)")
    ap.add_argument("--size", choices=sorted(SIZES), default="small")
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--duration", type=float, default=15.0, help="seconds of load per mode")
    ap.add_argument("--max-requests", type=int, default=5000, help="cap on requests per mode")
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--batch", type=int, default=16, help="max batch size in the batching mode")
    ap.add_argument("--wait-ms", type=float, default=10.0)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()

    images = _images()
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        model = a.model or build_checkpoint(a.size, Path(tmp))
        for mode, batch in (("no batching", 1), (f"batching (<= {a.batch}, {a.wait_ms:g} ms)", a.batch)):
            proc, port = start_server(model, batch, a.wait_ms, max_pending=max(64, 2 * a.clients))
            try:
                load(port, min(a.clients, 4), 2.0, 40, a.max_tokens, images)  # warm up
                stats_before = _call(port, "GET", "/health")[1]["batch_sizes"]
                r = load(port, a.clients, a.duration, a.max_requests, a.max_tokens, images)
                sizes = _call(port, "GET", "/health")[1]["batch_sizes"]
                runs = {int(k): v - stats_before.get(k, 0) for k, v in sizes.items()}
                n = sum(runs.values())
                r["mean_batch"] = round(sum(k * v for k, v in runs.items()) / n, 2) if n else 0.0
                results[mode] = r
            finally:
                proc.terminate()
                proc.wait(30)
            print(f"{mode}: {json.dumps(r)}", flush=True)

    print(f"\n{a.clients} clients, {a.duration:g} s per mode, {a.max_tokens} new tokens per request, "
          f"model: {a.model or a.size}, {os.cpu_count()} CPU cores")
    print("| mode | requests | req/s | tokens/s | p50 ms | p99 ms | mean batch | errors |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['requests']} | {r['requests_per_s']} | {r['tokens_per_s']} | {r['p50_ms']} | "
              f"{r['p99_ms']} | {r['mean_batch']} | {r['errors']} |")
    if a.json:
        a.json.write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
