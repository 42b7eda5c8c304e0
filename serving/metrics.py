"""Prometheus metrics of one server, in the app's own registry (two apps in one process never collide)."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ServingMetrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        r = self.registry = CollectorRegistry()
        self.requests = Counter("bertforge_http_requests", "HTTP requests by route, method and status",
                                ["route", "method", "status"], registry=r)
        self.latency = Histogram("bertforge_http_request_duration_seconds", "HTTP request latency by route",
                                 ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.inputs = Counter("bertforge_inputs", "texts or text pairs answered", registry=r)
        self.model_calls = Counter("bertforge_model_calls", "forward passes of the model (one per batch)", registry=r)
        self.batch_size = Histogram("bertforge_batch_size", "inputs per model call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256), registry=r)
        self.padded_length = Histogram("bertforge_batch_padded_tokens", "sequence length a batch is padded to",
                                       buckets=(8, 16, 32, 64, 128, 256, 512), registry=r)
        self.batch_seconds = Histogram("bertforge_batch_duration_seconds", "tokenize + pad + forward, per batch",
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.queue_depth = Gauge("bertforge_queue_depth", "inputs waiting for the model", registry=r)
        self.in_flight = Gauge("bertforge_inputs_in_flight", "inputs admitted and not yet answered", registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
