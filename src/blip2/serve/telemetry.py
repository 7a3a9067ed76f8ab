"""Prometheus metrics of a server (`GET /metrics`), on a registry of its own (one per app).

Counted as requests pass: `blip2_requests_total{endpoint, status}`, `blip2_request_latency_seconds` and
`blip2_time_to_first_token_seconds` histograms, `blip2_generated_tokens_total` (its rate is tokens/s). Read
from the batcher at each scrape: queue depth, open slots, running rows, batch occupancy, recent tokens/s, and the
visual-prompt cache (`blip2_visual_cache_hits_total`, `..._misses_total`, `..._evictions_total`, bytes, hit rate).
"""

from __future__ import annotations

from typing import Callable

__all__ = ["Metrics"]

_LATENCY = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    def __init__(self, stats: Callable[[], dict], prefix: str = "blip2"):
        # deferred: prometheus-client belongs to the optional `serve` extra
        from prometheus_client import CollectorRegistry, Counter, Histogram

        self.registry = r = CollectorRegistry()
        self.requests = Counter(f"{prefix}_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.latency = Histogram(f"{prefix}_request_latency_seconds", "time from request to the end of the response",
                                 ["endpoint"], buckets=_LATENCY, registry=r)
        self.ttft = Histogram(f"{prefix}_time_to_first_token_seconds",
                              "time from queueing a generation request to its first token", buckets=_LATENCY,
                              registry=r)
        self.tokens = Counter(f"{prefix}_generated_tokens", "tokens generated (all choices)", registry=r)
        r.register(_Snapshot(stats, prefix))

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest  # deferred: the optional `serve` extra

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class _Snapshot:
    """A custom collector: the batcher's state at scrape time."""

    def __init__(self, stats: Callable[[], dict], prefix: str):
        self.stats, self.prefix = stats, prefix

    def collect(self):
        # deferred: prometheus-client belongs to the optional `serve` extra
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        s, p = self.stats(), self.prefix
        gauges = {"queue_depth": ("requests waiting to start", s.get("queued", 0)),
                  "pending_requests": ("queued + running requests (slots held)", s.get("pending", 0)),
                  "running_rows": ("rows decoding in the current step", s.get("running_rows", 0)),
                  "batch_occupancy": ("running rows / max batch rows", s.get("occupancy", 0.0)),
                  "tokens_per_second": ("generated tokens per second over the last 10 s", s.get("tokens_per_s", 0.0))}
        for name, (doc, value) in gauges.items():
            yield GaugeMetricFamily(f"{p}_{name}", doc, value=value)
        yield CounterMetricFamily(f"{p}_batches", "batches run whole, and decode steps", value=s.get("batches", 0))
        cache = s.get("visual_cache")
        if cache is not None:
            for name in ("hits", "misses", "evictions"):
                yield CounterMetricFamily(f"{p}_visual_cache_{name}", f"visual-prompt cache {name}", value=cache[name])
            yield GaugeMetricFamily(f"{p}_visual_cache_bytes", "bytes held by the visual-prompt cache",
                                    value=cache["bytes"])
            yield GaugeMetricFamily(f"{p}_visual_cache_hit_rate", "hits / lookups since start", value=cache["hit_rate"])
