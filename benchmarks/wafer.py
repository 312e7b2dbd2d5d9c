"""Wafer batch scoring: 10,000 synthetic maps (.npy files) through the local engine, end to end, against a bare
timm resnet18 classifier on the same tensors, and the Ray engine against the local one on this machine.

maps_per_s               local engine, files read -> model -> results.jsonl written (the store write is measured
                         separately as maps_per_s_with_store: the same run plus SQLite bulk score rows)
ratio_vs_resnet18        our model (encoder + bridge + MoE core + heads + anomaly score) / bare resnet18 (9 classes),
                         maps per second on the same (B, 3, 32, 32) tensors and batch size; our scorer runs its
                         encoder channels-last, so ratio_vs_resnet18_channels_last also gives resnet18 that layout
ray_vs_local_time_ratio  Ray Data engine (2 scorer actors, 1 thread each, local Ray already running) / local time
peak_rss_mb              peak resident memory increase during the local run
"""

from __future__ import annotations

import copy
import json
import tempfile
import time
from pathlib import Path

GOALS = {"maps_per_s": (">=", 1000.0), "ratio_vs_resnet18": (">=", 0.8), "ray_vs_local_time_ratio": ("<=", 1.5)}
LIBRARIES = ("torch", "timm", "numpy", "ray")


def add_arguments(parser) -> None:
    parser.add_argument("--n", type=int, default=10_000, help="synthetic maps (default 10000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--checkpoint", default=None, help="wafer checkpoint (default: the shipped demo)")
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray engine")


def _write_maps(folder: Path, n: int) -> None:
    from pipelines.wafer.maps import write_npy
    from pipelines.wafer.synth import generate

    for w in generate(n, seed=90_000):
        write_npy(w, folder / f"{w.wafer_id}.npy")


def _run_engine(results, out: Path) -> int:
    count = 0
    with open(out, "w") as f:
        for r in results:
            f.write(json.dumps(r.to_json()) + "\n")
            count += 1
    return count


def run(args) -> dict:
    import timm
    import torch

    from benchmarks.harness import PeakRSS, time_interleaved
    from pipelines.wafer.batch import score_local, score_ray
    from pipelines.wafer.dataset import batch_input
    from pipelines.wafer.maps import iter_wafers
    from pipelines.wafer.scoring import DEFAULT_CHECKPOINT, WaferScorer

    torch.set_num_threads(2)
    checkpoint = Path(args.checkpoint or DEFAULT_CHECKPOINT)
    metrics: dict = {"n_maps": args.n, "batch_size": args.batch_size}
    with tempfile.TemporaryDirectory(prefix="wafer-bench-") as tmp:
        tmp = Path(tmp)
        maps = tmp / "maps"
        _write_maps(maps, args.n)
        scorer = WaferScorer(checkpoint)

        # Model against model on identical tensors.
        grids = [w.grid for w, _ in zip(iter_wafers([maps]), range(args.batch_size))]
        x = torch.as_tensor(batch_input(grids, scorer.size))
        resnet = timm.create_model("resnet18", num_classes=9, in_chans=3).eval()
        resnet_nhwc = copy.deepcopy(resnet).to(memory_format=torch.channels_last)
        x_nhwc = x.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            times = time_interleaved({"ours": lambda: scorer.score_inputs(x), "resnet18": lambda: resnet(x),
                                      "resnet18_nhwc": lambda: resnet_nhwc(x_nhwc)}, repeats=7, warmup=2)
        metrics["model_maps_per_s"] = round(args.batch_size / times["ours"], 1)
        metrics["resnet18_maps_per_s"] = round(args.batch_size / times["resnet18"], 1)
        metrics["ratio_vs_resnet18"] = round(times["resnet18"] / times["ours"], 3)
        metrics["ratio_vs_resnet18_channels_last"] = round(times["resnet18_nhwc"] / times["ours"], 3)

        # End to end: read files, score, write JSON lines.
        with PeakRSS() as rss:
            t0 = time.perf_counter()
            n = _run_engine(score_local(iter_wafers([maps]), scorer, batch_size=args.batch_size), tmp / "local.jsonl")
            local_s = time.perf_counter() - t0
        assert n == args.n, f"local engine wrote {n} results for {args.n} maps"
        metrics["maps_per_s"] = round(n / local_s, 1)
        metrics["local_s"] = round(local_s, 2)
        metrics["peak_rss_mb"] = round(rss.increase / 2 ** 20, 1)
        metrics["end_to_end_vs_resnet18"] = round(metrics["maps_per_s"] / metrics["resnet18_maps_per_s"], 3)
        metrics["maps_per_s_with_store"] = _with_store(tmp, maps, scorer, args.batch_size)

        if not args.no_ray:
            import ray

            ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
            try:
                t0 = time.perf_counter()
                n = _run_engine(score_ray(iter_wafers([maps]), checkpoint, batch_size=args.batch_size,
                                          concurrency=2), tmp / "ray.jsonl")
                ray_s = time.perf_counter() - t0
            finally:
                ray.shutdown()
            assert n == args.n, f"ray engine wrote {n} results for {args.n} maps"
            metrics["ray_s"] = round(ray_s, 2)
            metrics["ray_vs_local_time_ratio"] = round(ray_s / local_s, 3)
        else:
            metrics["ray_vs_local_time_ratio"] = None
    return metrics


def _with_store(tmp: Path, maps: Path, scorer, batch_size: int) -> float:
    """The CLI's path: results also written to a fresh SQLite store in bulk batches of 5000."""
    from apps.store import Actor, NewWaferScore, add_wafer_scores, get_or_create_lot, open_store
    from pipelines.wafer.batch import score_local
    from pipelines.wafer.maps import iter_wafers

    store = open_store(f"sqlite:///{tmp / 'bench.db'}", data_dir=tmp / "data")
    actor = Actor.system()
    try:
        get_or_create_lot(store, actor, "BENCH")
        t0 = time.perf_counter()
        pending, n = [], 0
        for r in score_local(iter_wafers([maps]), scorer, batch_size=batch_size):
            pending.append(NewWaferScore(wafer_id=r.wafer_id, source=r.source, model_id="wafer@bench",
                                         probabilities=r.class_probs or {}, predicted_class=r.predicted_class,
                                         defect_score=r.defect_score, anomaly_score=r.anomaly_score,
                                         status=r.status, error=r.error))
            n += 1
            if len(pending) >= 5000:
                add_wafer_scores(store, actor, "BENCH", pending)
                pending = []
        if pending:
            add_wafer_scores(store, actor, "BENCH", pending)
        return round(n / (time.perf_counter() - t0), 1)
    finally:
        store.close()
