"""The server's Prometheus metrics (``GET /metrics``), in a registry of their own per app."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter(
            "nexttok_requests", "HTTP requests by endpoint and status", ["endpoint", "status"], registry=r
        )
        self.tokens_in = Counter("nexttok_prompt_tokens", "prompt tokens read", registry=r)
        self.tokens_out = Counter("nexttok_generated_tokens", "tokens generated (all samples)", registry=r)
        self.queue_depth = Gauge("nexttok_queue_depth", "requests waiting for room in the batch", registry=r)
        self.running_rows = Gauge("nexttok_running_rows", "decoder rows in the running batch", registry=r)
        self.batch_rows = Histogram(
            "nexttok_batch_rows", "rows per decoder step", buckets=(1, 2, 4, 8, 16, 32, 64), registry=r
        )
        self.first_token = Histogram(
            "nexttok_time_to_first_token_seconds", "arrival to first token", buckets=LATENCY, registry=r
        )
        self.inter_token = Histogram(
            "nexttok_inter_token_seconds", "time between a request's steps", buckets=LATENCY, registry=r
        )

    def text(self) -> bytes:
        return generate_latest(self.registry)
