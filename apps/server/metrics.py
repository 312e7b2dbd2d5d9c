"""Prometheus metrics: requests, latency histograms, errors, queue depth and model time per stage.

Each app owns its registry, so several servers (tests, the benchmark) can live in one process.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("mmcore_http_requests_total", "HTTP requests", ["method", "route", "status"],
                                registry=r)
        self.latency = Histogram("mmcore_http_request_seconds", "HTTP request latency (s)", ["method", "route"],
                                 buckets=LATENCY_BUCKETS_S, registry=r)
        self.errors = Counter("mmcore_http_errors_total", "HTTP responses with status >= 400", ["route", "status"],
                              registry=r)
        self.queue_depth = Gauge("mmcore_queue_depth", "requests waiting for or inside a model queue", ["model"],
                                 registry=r)
        self.model_seconds = Histogram("mmcore_model_seconds", "time per model stage (s)", ["model", "stage"],
                                       buckets=LATENCY_BUCKETS_S, registry=r)
        self.batch_size = Histogram("mmcore_wafer_batch_maps", "wafer maps per micro-batched model call",
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512), registry=r)
        self.batch_requests = Histogram("mmcore_wafer_batch_requests", "requests merged into one model call",
                                        buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32), registry=r)

    @contextmanager
    def stage(self, model: str, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.model_seconds.labels(model, stage).observe(time.perf_counter() - t0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
