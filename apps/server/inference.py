"""Shared inference queues: one per model, each with a concurrency limit, and a micro-batcher for wafer scoring.

`ModelQueue.run(fn)` waits for one of the model's `workers` slots; the queue-depth gauge counts callers waiting or
running. `WaferBatcher.score(maps)` hands maps to one scoring thread that waits `window_ms` after the first request
for others to arrive, scores all of them in one model call (up to `max_batch` maps), and gives each caller its rows.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from concurrent.futures import Future
from typing import Callable, TypeVar

from apps.server.metrics import Metrics

T = TypeVar("T")
log = logging.getLogger("mmcore.server")


class ModelQueue:
    def __init__(self, name: str, workers: int, metrics: Metrics):
        self.name, self.metrics = name, metrics
        self._slots = threading.Semaphore(workers)

    def run(self, fn: Callable[[], T], stage: str = "total") -> T:
        gauge = self.metrics.queue_depth.labels(self.name)
        gauge.inc()
        try:
            with self._slots, self.metrics.stage(self.name, stage):
                return fn()
        finally:
            gauge.dec()


class WaferBatcher:
    """Micro-batches scoring requests: many small requests become one model call."""

    def __init__(self, scorer_factory: Callable[[], object], metrics: Metrics, *, window_ms: float = 5.0,
                 max_batch: int = 256, defect_threshold: Callable[[str | None], float] = lambda product: 0.5):
        self._factory, self.metrics = scorer_factory, metrics
        self.window_s, self.max_batch = window_ms / 1000.0, max_batch
        self.defect_threshold = defect_threshold
        self._scorer = None
        self._load_lock = threading.Lock()
        self._requests: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="wafer-batcher", daemon=True)
        self._thread.start()

    @property
    def scorer(self):
        with self._load_lock:
            if self._scorer is None:
                with self.metrics.stage("wafer", "load"):
                    self._scorer = self._factory()
            return self._scorer

    def score(self, maps: list, product: str | None = None, timeout_s: float = 300.0) -> list:
        """WaferMaps -> WaferResults (same order). Blocks until the batch holding them is scored."""
        if not maps:
            return []
        fut: Future = Future()
        gauge = self.metrics.queue_depth.labels("wafer")
        gauge.inc()
        self._requests.put((maps, product, fut))
        try:
            return fut.result(timeout=timeout_s)
        finally:
            gauge.dec()

    def close(self) -> None:
        self._stop.set()
        self._requests.put(None)
        self._thread.join(timeout=5)

    def _collect(self) -> list:
        first = self._requests.get()
        if first is None:
            return []
        batch, n = [first], len(first[0])
        deadline = time.monotonic() + self.window_s
        while n < self.max_batch:
            remaining = deadline - time.monotonic()
            try:
                item = self._requests.get(timeout=max(remaining, 0)) if remaining > 0 else \
                    self._requests.get_nowait()
            except queue.Empty:
                break
            if item is None:
                self._stop.set()
                break
            batch.append(item)
            n += len(item[0])
        return batch

    def _loop(self) -> None:
        while not self._stop.is_set():
            batch = self._collect()
            if not batch:
                continue
            try:
                self._score_batch(batch)
            except BaseException as exc:  # noqa: BLE001 - every waiting caller gets the error, the loop goes on
                log.exception("wafer batch failed")
                for _, _, fut in batch:
                    if not fut.done():
                        fut.set_exception(exc)

    def _score_batch(self, batch: list) -> None:
        from pipelines.wafer.batch import results_from_scores
        from pipelines.wafer.dataset import fractions

        scorer = self.scorer
        maps = [m for request, _, _ in batch for m in request]
        self.metrics.batch_size.observe(len(maps))
        self.metrics.batch_requests.observe(len(batch))
        import numpy as np

        with self.metrics.stage("wafer", "prepare"):
            x = np.stack([fractions(m.grid, scorer.size) for m in maps])
        results = []
        with self.metrics.stage("wafer", "model"):
            for start in range(0, len(maps), self.max_batch):  # one oversized request still runs in bounded chunks
                s = scorer.score_inputs(x[start:start + self.max_batch])
                results.append(s)
        offset = 0
        for request, product, fut in batch:
            rows, lo = [], offset
            threshold = self.defect_threshold(product)
            for chunk_i, s in enumerate(results):
                c0 = chunk_i * self.max_batch
                c1 = c0 + len(s.defect)
                a, b = max(lo, c0), min(lo + len(request), c1)
                if a >= b:
                    continue
                sl = slice(a - c0, b - c0)
                rows += results_from_scores(maps[a:b], s.pattern_probs[sl], s.defect[sl], s.anomaly[sl],
                                            scorer.classes, threshold, s.extra_classes,
                                            None if s.extra_probs is None else s.extra_probs[sl])
            offset += len(request)
            fut.set_result(rows)
