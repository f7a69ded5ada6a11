"""Prometheus metrics, all prefixed ``nvembed_``, on a registry owned by one app.

A per-app registry (not the process default) lets several apps live in one process (tests, Ray
Serve replicas) without name clashes.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from nvembed_sdk.serve.batcher import Observer

_LATENCY = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_ROWS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
_TOKENS = (64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536)


class Metrics(Observer):
    """The server's metrics; also the batcher's :class:`Observer`."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("nvembed_requests", "HTTP requests to /v1/embeddings by status code",
                                ["code"], registry=r)
        self.texts = Counter("nvembed_texts", "inputs embedded", registry=r)
        self.tokens = Counter("nvembed_prompt_tokens", "tokens embedded (usage.prompt_tokens)", registry=r)
        self.rejected = Counter("nvembed_rejected", "requests refused before any model work", ["reason"], registry=r)
        self.batch_size = Histogram("nvembed_batch_size", "rows per forward pass", buckets=_ROWS, registry=r)
        self.batch_tokens = Histogram("nvembed_batch_tokens", "padded tokens per forward pass (rows x longest)",
                                      buckets=_TOKENS, registry=r)
        self.queue_tokens = Gauge("nvembed_queue_tokens", "tokens admitted and not yet embedded", registry=r)
        self.queue_depth = Gauge("nvembed_queue_depth", "rows admitted and not yet embedded", registry=r)
        self.tokenize_s = Histogram("nvembed_tokenize_seconds", "tokenisation time per request",
                                    buckets=_LATENCY, registry=r)
        self.forward_s = Histogram("nvembed_forward_seconds", "model time per forward pass",
                                   buckets=_LATENCY, registry=r)
        self.total_s = Histogram("nvembed_request_seconds", "time from arrival to response, per request",
                                 buckets=_LATENCY, registry=r)
        self.ready = Gauge("nvembed_ready", "1 when warmed up and not draining", registry=r)

    # Observer hooks (called from the worker thread; prometheus_client is thread-safe)
    def batch(self, rows: int, padded_tokens: int, forward_s: float) -> None:
        self.batch_size.observe(rows)
        self.batch_tokens.observe(padded_tokens)
        self.forward_s.observe(forward_s)

    def queue(self, tokens: int, rows: int) -> None:
        self.queue_tokens.set(tokens)
        self.queue_depth.set(rows)

    def render(self) -> bytes:
        return generate_latest(self.registry)
