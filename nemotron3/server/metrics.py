"""Prometheus metrics through `prometheus_client`, with vLLM's names (`vllm:x` -> `nemotron3_x`).

Design decisions:

* **One `CollectorRegistry` per app**, never the process-global one: several apps (tests, or one process
  serving two models) must not collide on metric names.
* **Request-level numbers** (tokens, latencies, finish reasons, errors) are recorded by the server as it
  consumes the engine's outputs. Time to first token is measured from the moment the server hands the
  request to the engine; the inter-token latency is the gap between two outputs of a request divided by the
  tokens the later one carries (speculative decoding emits several per step).
* **Engine-level numbers** (running/waiting sequences, cache use, speculative acceptance) are read at scrape
  time from `EngineSnapshot` (the engine's `snapshot()`), never from the scheduler or caches themselves.
"""
from __future__ import annotations

import math
from typing import Callable

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..engine import EngineSnapshot

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0)
PREFIX = "nemotron3_"


class _EngineCollector:
    """The engine's gauges and counters, built from a fresh snapshot at every scrape."""

    def __init__(self, model_name: str, snapshot: Callable[[], EngineSnapshot]):
        self.model_name, self.snapshot = model_name, snapshot

    def collect(self):
        s, name = self.snapshot(), self.model_name

        def family(kind, metric, help, value=None, label=None, values=None):
            f = kind(PREFIX + metric, help, labels=["model_name"] + ([label] if label else []))
            for k, v in (values.items() if values is not None else [(None, value)]):
                f.add_metric([name] + ([k] if label else []), math.nan if v is None else v)
            return f

        yield family(GaugeMetricFamily, "num_requests_running", "Sequences holding a cache slot.", s.running)
        yield family(GaugeMetricFamily, "num_requests_waiting", "Sequences waiting for a cache slot.", s.waiting)
        yield family(GaugeMetricFamily, "cache_usage_perc", "Fraction of the engine's cache slots in use (1 = full).",
                     s.running / max(1, s.max_num_seqs))
        yield family(GaugeMetricFamily, "cache_bytes", "Bytes held by the hybrid cache (Mamba state, K/V buffers, "
                     "total).", label="kind", values=s.cache_bytes)
        if s.prefix_cache_bytes is not None:
            yield family(GaugeMetricFamily, "prefix_cache_bytes", "Bytes held by the prefix cache.",
                         s.prefix_cache_bytes)
            yield family(GaugeMetricFamily, "prefix_cache_hit_rate", "Prefix cache hit rate.",
                         s.prefix_cache_hit_rate or 0.0)
        yield family(CounterMetricFamily, "engine_steps", "Engine steps.", s.steps)
        yield family(CounterMetricFamily, "spec_decode_num_draft_tokens", "MTP draft tokens proposed.",
                     s.spec_draft_tokens)
        yield family(CounterMetricFamily, "spec_decode_num_accepted_tokens", "MTP draft tokens accepted.",
                     s.spec_accepted_tokens)
        yield family(GaugeMetricFamily, "spec_decode_acceptance_rate",
                     "Accepted / proposed draft tokens (NaN before any).", s.spec_acceptance_rate)


class ServerMetrics:
    """The server's metrics in their own registry; `render()` is the /metrics body (`CONTENT_TYPE`)."""

    def __init__(self, model_name: str, snapshot: Callable[[], EngineSnapshot]):
        self.registry = reg = CollectorRegistry()
        lab = ["model_name"]

        def counter(name, help, extra=()):
            return Counter(PREFIX + name, help, lab + list(extra), registry=reg)

        def histogram(name, help, buckets):
            return Histogram(PREFIX + name, help, lab, buckets=buckets, registry=reg).labels(model_name)

        self._requests = counter("requests", "Generation requests accepted, by endpoint.", ["endpoint"])
        self._finished = counter("request_success", "Finished sequences, by finish reason.", ["finished_reason"])
        self._errors = counter("request_errors", "Error responses, by HTTP status.", ["status"])
        self._prompt = counter("prompt_tokens", "Prompt tokens of finished requests.").labels(model_name)
        self._generation = counter("generation_tokens", "Generated tokens of finished requests.").labels(model_name)
        self._reasoning = counter("reasoning_tokens", "Generated tokens inside <think> blocks.").labels(model_name)
        self._cached = counter("prefix_cache_hit_tokens", "Prompt tokens restored from the prefix cache."
                               ).labels(model_name)
        self._ttft = histogram("time_to_first_token_seconds", "Time to first token.", TTFT_BUCKETS)
        self._itl = histogram("inter_token_latency_seconds", "Time between output tokens.", ITL_BUCKETS)
        self._e2e = histogram("e2e_request_latency_seconds", "End-to-end request latency.", E2E_BUCKETS)
        self.model_name = model_name
        reg.register(_EngineCollector(model_name, snapshot))

    def request(self, endpoint: str) -> None:
        self._requests.labels(self.model_name, endpoint).inc()

    def error(self, status: int) -> None:
        self._errors.labels(self.model_name, str(status)).inc()

    def first_token(self, seconds: float) -> None:
        self._ttft.observe(seconds)

    def tokens(self, gap: float, n: int) -> None:
        for _ in range(n):
            self._itl.observe(gap / n)

    def aborted(self, n: int) -> None:
        """A request left before finishing (client disconnect): its n sequences were aborted."""
        self._finished.labels(self.model_name, "abort").inc(n)

    def done(self, out, seconds: float) -> None:
        """A request's final output (`RequestOutput`)."""
        m = out.metrics
        self._prompt.inc(m.num_prompt_tokens)
        self._cached.inc(m.num_cached_tokens)
        self._generation.inc(sum(len(c.token_ids) for c in out.outputs))
        self._reasoning.inc(m.reasoning_tokens)
        for c in out.outputs:
            self._finished.labels(self.model_name, c.finish_reason or "abort").inc()
        self._e2e.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
