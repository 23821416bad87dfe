"""Prometheus metrics, written by hand in the text exposition format (version 0.0.4) so the server needs no
extra dependency. Names follow vLLM's (`vllm:x` -> `nemotron3_x`).

Request-level numbers (tokens, latencies, finish reasons) are recorded by the server as it consumes the
engine's outputs; engine-level ones (running/waiting sequences, cache use, speculative acceptance) are read
from the engine when `/metrics` is scraped. Time to first token is measured from the moment the server
hands the request to the engine; the inter-token latency is the gap between two outputs of a request
divided by the tokens the later one carries (speculative decoding emits several per step).
"""
from __future__ import annotations

import math
import threading
from collections import defaultdict

TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0)
ITL_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5,
               0.75, 1.0, 2.5, 5.0)
E2E_BUCKETS = (0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
               240.0, 480.0)
PREFIX = "nemotron3_"


class Histogram:
    def __init__(self, buckets):
        self.buckets = tuple(buckets)
        self.counts = [0] * len(self.buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, v: float) -> None:
        self.sum += v
        self.count += 1
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1
                break

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, acc = [], 0
        sep = "," if labels else ""
        for b, c in zip(self.buckets, self.counts):
            acc += c
            out.append(f'{name}_bucket{{{labels}{sep}le="{b}"}} {acc}')
        out.append(f'{name}_bucket{{{labels}{sep}le="+Inf"}} {self.count}')
        lab = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{lab} {_num(self.sum)}")
        out.append(f"{name}_count{lab} {self.count}")
        return out


def _num(v) -> str:
    if v is None:
        return "NaN"
    v = float(v)
    if math.isnan(v):
        return "NaN"
    if math.isinf(v):
        return "+Inf" if v > 0 else "-Inf"
    return str(int(v)) if v.is_integer() and abs(v) < 1e15 else repr(v)


def _label(v: str) -> str:
    return str(v).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class ServerMetrics:
    def __init__(self, model_name: str):
        self.model_name = model_name
        self.lock = threading.Lock()
        self.requests = defaultdict(int)          # (endpoint) -> accepted generation requests
        self.finished = defaultdict(int)          # (finish reason) -> finished sequences
        self.errors = defaultdict(int)            # (status code) -> error responses
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.reasoning_tokens = 0
        self.cached_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)

    # ---- recording (event loop thread) ----
    def request(self, endpoint: str) -> None:
        with self.lock:
            self.requests[endpoint] += 1

    def error(self, status: int) -> None:
        with self.lock:
            self.errors[str(status)] += 1

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def tokens(self, gap: float, n: int) -> None:
        with self.lock:
            for _ in range(n):
                self.itl.observe(gap / n)

    def aborted(self, n: int) -> None:
        """A request left before finishing (client disconnect): its n sequences were aborted."""
        with self.lock:
            self.finished["abort"] += n

    def done(self, out, seconds: float) -> None:
        """A request's final output (`RequestOutput`)."""
        with self.lock:
            m = out.metrics
            self.prompt_tokens += m.num_prompt_tokens
            self.cached_tokens += m.num_cached_tokens
            self.generation_tokens += sum(len(c.token_ids) for c in out.outputs)
            self.reasoning_tokens += m.reasoning_tokens
            for c in out.outputs:
                self.finished[c.finish_reason or "abort"] += 1
            self.e2e.observe(seconds)

    # ---- exposition ----
    def render(self, engine) -> str:
        lab = f'model_name="{_label(self.model_name)}"'
        lines: list[str] = []

        def metric(name, kind, help, samples):
            full = PREFIX + name
            lines.append(f"# HELP {full} {help}")
            lines.append(f"# TYPE {full} {kind}")
            for extra, value in samples:
                labels = lab + ("," + extra if extra else "")
                lines.append(f"{full}{{{labels}}} {_num(value)}")

        sch = engine.scheduler
        stats = engine.stats
        with self.lock:
            metric("requests_total", "counter", "Generation requests accepted, by endpoint.",
                   [(f'endpoint="{_label(k)}"', v) for k, v in sorted(self.requests.items())] or [("", 0)])
            metric("request_success_total", "counter", "Finished sequences, by finish reason.",
                   [(f'finished_reason="{_label(k)}"', v) for k, v in sorted(self.finished.items())] or [("", 0)])
            metric("request_errors_total", "counter", "Error responses, by HTTP status.",
                   [(f'status="{k}"', v) for k, v in sorted(self.errors.items())] or [("", 0)])
            metric("prompt_tokens_total", "counter", "Prompt tokens of finished requests.", [("", self.prompt_tokens)])
            metric("generation_tokens_total", "counter", "Generated tokens of finished requests.",
                   [("", self.generation_tokens)])
            metric("reasoning_tokens_total", "counter", "Generated tokens inside <think> blocks.",
                   [("", self.reasoning_tokens)])
            metric("prefix_cache_hit_tokens_total", "counter", "Prompt tokens restored from the prefix cache.",
                   [("", self.cached_tokens)])
            for name, h, help in (("time_to_first_token_seconds", self.ttft, "Time to first token."),
                                  ("inter_token_latency_seconds", self.itl, "Time between output tokens."),
                                  ("e2e_request_latency_seconds", self.e2e, "End-to-end request latency.")):
                full = PREFIX + name
                lines += [f"# HELP {full} {help}", f"# TYPE {full} histogram"] + h.lines(full, lab)
        running = len(sch.running)
        metric("num_requests_running", "gauge", "Sequences holding a cache slot.", [("", running)])
        metric("num_requests_waiting", "gauge", "Sequences waiting for a cache slot.", [("", len(sch.waiting))])
        metric("cache_usage_perc", "gauge", "Fraction of the engine's cache slots in use (1 = full).",
               [("", running / max(1, engine.max_num_seqs))])
        nb = engine.cache.nbytes()
        metric("cache_bytes", "gauge", "Bytes held by the hybrid cache (Mamba state, K/V buffers, total).",
               [(f'kind="{_label(k)}"', v) for k, v in nb.items()])
        pc = engine.prefix_cache
        if pc is not None:
            metric("prefix_cache_bytes", "gauge", "Bytes held by the prefix cache.", [("", pc.bytes)])
            metric("prefix_cache_hit_rate", "gauge", "Prefix cache hit rate.", [("", pc.stats.hit_rate or 0.0)])
        metric("engine_steps_total", "counter", "Engine steps.", [("", stats.steps)])
        metric("spec_decode_num_draft_tokens_total", "counter", "MTP draft tokens proposed.",
               [("", stats.spec_draft_tokens)])
        metric("spec_decode_num_accepted_tokens_total", "counter", "MTP draft tokens accepted.",
               [("", stats.spec_accepted_tokens)])
        metric("spec_decode_acceptance_rate", "gauge", "Accepted / proposed draft tokens (NaN before any).",
               [("", stats.spec_acceptance_rate)])
        return "\n".join(lines) + "\n"
