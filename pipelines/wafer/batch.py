"""Streaming batch scoring: every input wafer comes out exactly once, as a `WaferResult` with status ok or error.

Memory is bounded by the batch: inputs are read lazily (`maps.iter_wafers`), turned into model input a batch at a
time and scored; nothing holds the whole run. (A WM-811K pickle is the exception: pickle loads it whole.)

Engines share one scorer class, `scoring.WaferScorer`:
- `local`: a reader thread prepares the next batch while the model scores the current one (torch releases the GIL).
- `ray`: Ray Data `map_batches(WaferScorer, compute=ActorPoolStrategy(size=N), batch_size=B)` (the fixed-size form
  of `concurrency=N`, which Ray 2.51+ deprecates): the model loads once per actor; the
  driver reads inputs in chunks, streams each chunk through the actor pool and yields results in input order.

`skip(wafer_id, source)` lets a caller resume a lot: it returns an already stored result (emitted as is, not
scored again) or None.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import numpy as np

from pipelines.wafer.dataset import fractions
from pipelines.wafer.maps import WaferMap, WaferReadError

RESULT_KEYS = ("wafer_id", "source", "status", "error", "predicted_class", "class_probs", "defect_score",
               "anomaly_score")


@dataclass
class WaferResult:
    wafer_id: str
    source: str
    status: str  # "ok" | "error"
    error: str | None = None
    predicted_class: str | None = None
    class_probs: dict[str, float] | None = None  # the nine CLASSES
    defect_score: float | None = None
    anomaly_score: float | None = None
    slot: int | None = None
    resumed: bool = False  # taken from the store, not scored in this run

    def to_json(self) -> dict:
        """Exactly the published output keys."""
        data = asdict(self)
        return {k: data[k] for k in RESULT_KEYS}


def error_result(item: WaferReadError) -> WaferResult:
    return WaferResult(wafer_id=item.wafer_id, source=item.source, status="error", error=item.error)


def results_from_scores(wafers: list[WaferMap], pattern_probs: np.ndarray, defect: np.ndarray, anomaly: np.ndarray,
                        classes: tuple[str, ...], defect_threshold: float, extra_classes: tuple[str, ...] = (),
                        extra_probs: np.ndarray | None = None) -> list[WaferResult]:
    """Results in the published shape: the nine CLASSES always (plus few-shot classes when an adapter is loaded);
    predicted class = a few-shot class at p >= 0.5 first, else `none` under the defect threshold, else the most
    probable pattern."""
    out = []
    for i, w in enumerate(wafers):
        probs = {c: round(float(p), 6) for c, p in zip(classes, pattern_probs[i])}
        probs["none"] = round(float(1.0 - defect[i]), 6)
        pattern = max((c for c in classes), key=lambda c: probs[c])
        predicted = pattern if defect[i] >= defect_threshold else "none"
        if extra_probs is not None:
            for c, p in zip(extra_classes, extra_probs[i]):
                probs[c] = round(float(p), 6)
            best = int(extra_probs[i].argmax())
            if extra_probs[i, best] >= 0.5:
                predicted = extra_classes[best]
        out.append(WaferResult(wafer_id=w.wafer_id, source=w.source, status="ok", predicted_class=predicted,
                               class_probs=probs, defect_score=round(float(defect[i]), 6),
                               anomaly_score=round(float(anomaly[i]), 6), slot=w.slot))
    return out


Skip = Callable[[str, str], "WaferResult | None"]


def _batches(items: Iterable[WaferMap | WaferReadError], batch_size: int, size: int, skip: Skip | None):
    """Groups of (ordered entries, wafers to score, their model input). An entry is a finished WaferResult or the
    index of a wafer in the group's scoring list."""
    entries, wafers, inputs = [], [], []
    for item in items:
        if isinstance(item, WaferReadError):
            entries.append(error_result(item))
        elif skip is not None and (stored := skip(item.wafer_id, item.source)) is not None:
            entries.append(stored)
        else:
            entries.append(len(wafers))
            wafers.append(item)
            inputs.append(fractions(item.grid, size))
        if len(wafers) >= batch_size or len(entries) >= 4 * batch_size:
            yield entries, wafers, np.stack(inputs) if inputs else None
            entries, wafers, inputs = [], [], []
    if entries:
        yield entries, wafers, np.stack(inputs) if inputs else None


def _prefetch(generator, depth: int = 2):
    """Run `generator` in a thread, `depth` items ahead; exceptions reach the consumer."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    done = object()

    def work():
        try:
            for item in generator:
                q.put(item)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer
            q.put(exc)
        q.put(done)

    threading.Thread(target=work, daemon=True).start()
    while (item := q.get()) is not done:
        if isinstance(item, BaseException):
            raise item
        yield item


def score_local(items: Iterable[WaferMap | WaferReadError], scorer, *, batch_size: int = 256,
                defect_threshold: float = 0.5, skip: Skip | None = None) -> Iterator[WaferResult]:
    """Score a stream in-process; one WaferResult per input item, in input order."""
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive integer, found {batch_size}")
    for entries, wafers, x in _prefetch(_batches(items, batch_size, scorer.size, skip)):
        scored = []
        if wafers:
            s = scorer.score_inputs(x)
            scored = results_from_scores(wafers, s.pattern_probs, s.defect, s.anomaly, scorer.classes,
                                         defect_threshold, s.extra_classes, s.extra_probs)
        for entry in entries:
            yield scored[entry] if isinstance(entry, int) else entry


def score_ray(items: Iterable[WaferMap | WaferReadError], checkpoint, *, batch_size: int = 256,
              concurrency: int = 2, defect_threshold: float = 0.5, skip: Skip | None = None,
              chunk: int = 50_000, size: int | None = None, classes: tuple[str, ...] | None = None,
              device: str = "cpu") -> Iterator[WaferResult]:
    """Score a stream on Ray Data (connects to RAY_ADDRESS or the running/local cluster via `ray.init`)."""
    import ray

    from pipelines.wafer.scoring import WaferScorer, read_wafer_meta

    if batch_size < 1 or concurrency < 1:
        raise ValueError(f"batch_size/concurrency: expected positive integers, found {batch_size}/{concurrency}")
    if size is None or classes is None:
        meta = read_wafer_meta(checkpoint)
        size, classes = int(meta["input_size"]), tuple(meta["classes"])
    if not ray.is_initialized():
        ray.init(ignore_reinit_error=True, log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    for entries, wafers, x in _batches(items, chunk, size, skip):
        scored: list[WaferResult] = []
        if wafers:
            # One block per model batch (at least one per actor), one column "data"; order is preserved end to end.
            n_blocks = max(concurrency, -(-len(wafers) // batch_size))
            ds = ray.data.from_numpy(np.array_split(x, min(n_blocks, len(wafers))))  # float32 already: no copy
            ds = ds.map_batches(WaferScorer, fn_constructor_kwargs={"checkpoint": str(checkpoint), "device": device,
                                                                    "threads": 1},
                                compute=ray.data.ActorPoolStrategy(size=concurrency), batch_size=batch_size,
                                num_cpus=1, batch_format="numpy")
            probs = np.zeros((len(wafers), len(classes)), np.float32)
            defect = np.zeros(len(wafers), np.float32)
            anomaly = np.zeros(len(wafers), np.float32)
            n = 0
            for out in ds.iter_batches(batch_size=None, batch_format="numpy"):
                k = len(out["defect_score"])
                probs[n:n + k], defect[n:n + k] = out["pattern_probs"], out["defect_score"]
                anomaly[n:n + k] = out["anomaly_score"]
                n += k
            if n != len(wafers):
                raise RuntimeError(f"Ray returned {n} scores for {len(wafers)} wafers")
            scored = results_from_scores(wafers, probs, defect, anomaly, classes, defect_threshold)
        for entry in entries:
            yield scored[entry] if isinstance(entry, int) else entry
