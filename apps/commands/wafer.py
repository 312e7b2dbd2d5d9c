"""`mmcore wafer synth|score|report` and `mmcore eval wafer`: wafer-map generation, batch scoring, lot reports."""

from __future__ import annotations

import argparse

from apps.commands import add_device_argument


def register(subparsers) -> None:
    p = subparsers.add_parser("wafer", help="wafer maps: generate, batch-score, lot reports")
    sub = p.add_subparsers(dest="wafer_command", metavar="ACTION", parser_class=type(p))
    sub.required = True

    s = sub.add_parser("synth", help="write synthetic labelled wafer maps (one file each) and labels.csv")
    s.add_argument("out_dir", metavar="OUT_DIR")
    s.add_argument("--n", type=int, default=100, help="number of maps (default 100)")
    s.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    s.add_argument("--format", default="npy", choices=("npy", "g85", "png"), help="file format (default npy)")
    s.add_argument("--mixed-fraction", type=float, default=0.25, help="share of MixedWM38-style mixtures (0..1)")
    s.add_argument("--patterns", default=None,
                   help="only these label sets, comma-separated, mixtures joined by '+' (e.g. 'Center,Loc+Scratch,"
                        "none,Reticle'); default: every class and mixture")
    s.set_defaults(handler=_synth)

    sc = sub.add_parser("score", help="batch-score wafer maps (files, folders, zips, pickles) into the database")
    sc.add_argument("inputs", nargs="+", metavar="INPUT")
    sc.add_argument("--lot", default=None, help="lot id; an existing lot resumes (default: a new lot id)")
    sc.add_argument("--product", default=None, help="product whose thresholds apply (default: 'default')")
    sc.add_argument("--db", default=None, help="database URL (default: MMCORE_DB_URL or the local SQLite file)")
    sc.add_argument("--out", default=None, help="also write results to a .csv or .jsonl file")
    sc.add_argument("--engine", default="local", choices=("local", "ray"), help="local (default) or ray (Ray Data)")
    sc.add_argument("--batch-size", type=int, default=256, help="maps per model call (default 256)")
    sc.add_argument("--workers", type=int, default=None,
                    help="local: reader threads (default 1); ray: scorer actors (default 2)")
    sc.add_argument("--checkpoint", default=None, help="model checkpoint folder (default: the shipped demo)")
    sc.add_argument("--thresholds", default=None, help="thresholds JSON (per product); default: the checkpoint's")
    sc.add_argument("--adapter", default=None, help="few-shot adapter folder from `mmcore finetune wafer` (local engine)")
    sc.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_device_argument(sc)
    sc.set_defaults(handler=_score)

    r = sub.add_parser("report", help="lot report: yield, class histogram, fail density, excursions (CSV/JSON/PDF)")
    r.add_argument("lot", metavar="LOT")
    r.add_argument("--db", default=None, help="database URL (default: MMCORE_DB_URL or the local SQLite file)")
    r.add_argument("--out", default=None, help="output folder (default ./report-LOT)")
    r.add_argument("--thresholds", default=None, help="thresholds JSON (per product); default: the checkpoint's")
    r.set_defaults(handler=_report)


def register_eval(subparsers) -> None:
    e = subparsers.add_parser("wafer", help="wafer scoring on held-out synthetic maps (macro-F1, ECE, anomalies)")
    e.add_argument("checkpoint", metavar="CKPT")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--n", type=int, default=1800, help="held-out maps of known classes (default 1800)")
    e.add_argument("--seed", type=int, default=10_000, help="first evaluation seed (training seeds are below)")
    e.add_argument("--linear-steps", type=int, default=None,
                   help="training steps of the linear-head ablation (default: the checkpoint's own steps)")
    e.add_argument("--linear-checkpoint", default=None,
                   help="an ablation checkpoint already trained with `mmcore train wafer --option head=linear` and "
                        "the same settings (skips training it here)")
    e.add_argument("--no-fewshot", action="store_true", help="skip the few-shot LoRA evaluation")
    e.add_argument("--fewshot-steps", type=int, default=150, help="LoRA steps of the few-shot evaluation")
    add_device_argument(e)
    e.set_defaults(handler=_eval)



def _parse_patterns(text: str | None):
    if text is None:
        return None
    out = []
    for item in text.split(","):
        item = item.strip()
        out.append(() if item in ("none", "") else tuple(p.strip() for p in item.split("+")))
    return out


def _synth(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from mmcore.errors import InputError
    from pipelines.wafer.synth import write_dataset

    if args.n < 1:
        raise InputError(f"--n: expected a positive number of maps, found {args.n}")
    if not 0 <= args.mixed_fraction <= 1:
        raise InputError(f"--mixed-fraction: expected 0..1, found {args.mixed_fraction}")
    try:
        with tqdm(total=args.n, unit="map", disable=args.n < 500) as bar:
            count = write_dataset(args.out_dir, args.n, args.seed, fmt=args.format,
                                  mixed_fraction=args.mixed_fraction, patterns=_parse_patterns(args.patterns),
                                  progress=bar.update)
    except ValueError as exc:
        raise InputError(f"--patterns: {exc}") from exc
    print(f"wrote {count} {args.format} maps and labels.csv to {args.out_dir}")
    return 0


def _new_lot_id() -> str:
    import datetime as dt
    import secrets

    return f"LOT-{dt.datetime.now(dt.timezone.utc):%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


def _count_wafer_files(inputs) -> int | None:
    """Wafers to expect, for the progress bar's ETA; None when a multi-wafer file (npz, pickle) makes it unknown."""
    from pathlib import Path

    total = 0
    for item in inputs:
        path = Path(item)
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        for f in files:
            suffix = f.suffix.lower()
            if suffix in (".npz", ".pkl", ".pickle", ".zip"):
                return None
            if suffix in (".npy", ".xml", ".g85", ".png") or f == path:
                total += 1
    return total


class _ResultsFile:
    """results.csv or results.jsonl written under a temporary name and renamed when the run completes."""

    def __init__(self, path):
        import csv
        import os
        import tempfile
        from pathlib import Path

        from mmcore.errors import InputError
        from pipelines.wafer.maps import CLASSES

        self.path = Path(path)
        self.kind = self.path.suffix.lower()
        if self.kind not in (".csv", ".jsonl"):
            raise InputError(f"--out: expected a .csv or .jsonl file name, found {self.path.name!r}")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, self.tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        self.f = os.fdopen(fd, "w", newline="")
        self.classes = CLASSES
        if self.kind == ".csv":
            self.csv = csv.writer(self.f)
            self.csv.writerow(["wafer_id", "source", "status", "error", "predicted_class", "defect_score",
                               "anomaly_score", *[f"p_{c}" for c in CLASSES]])

    def write(self, result) -> None:
        import json

        row = result.to_json()
        if self.kind == ".jsonl":
            self.f.write(json.dumps(row) + "\n")
        else:
            probs = row["class_probs"] or {}
            self.csv.writerow([row["wafer_id"], row["source"], row["status"], row["error"] or "",
                               row["predicted_class"] or "", _num(row["defect_score"]), _num(row["anomaly_score"]),
                               *[_num(probs.get(c)) for c in self.classes]])

    def commit(self) -> None:
        import os

        self.f.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        import os

        self.f.close()
        if os.path.exists(self.tmp):
            os.unlink(self.tmp)


def _num(value) -> str:
    return "" if value is None else f"{value:.6g}"


def model_id_for(checkpoint) -> str:
    """`wafer@<first 12 hex of the weights' sha256>`: names the exact weights each score came from."""
    import hashlib
    from pathlib import Path

    from pipelines.wafer.scoring import DEFAULT_CHECKPOINT

    weights = Path(checkpoint or DEFAULT_CHECKPOINT) / "model.safetensors"
    digest = hashlib.sha256()
    with open(weights, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return f"wafer@{digest.hexdigest()[:12]}"


def _score(args: argparse.Namespace) -> int:
    import sys
    import time
    from pathlib import Path

    from tqdm import tqdm

    from apps.store import Actor, NewWaferScore, add_wafer_scores, get_or_create_lot, open_store, scores_for_lot
    from mmcore.device import resolve_device
    from mmcore.errors import InputError
    from pipelines.wafer.batch import WaferResult, score_local, score_ray
    from pipelines.wafer.maps import iter_wafers
    from pipelines.wafer.scoring import DEFAULT_CHECKPOINT, Thresholds, WaferScorer, read_wafer_meta

    if args.batch_size < 1:
        raise InputError(f"--batch-size: expected a positive integer, found {args.batch_size}")
    if args.workers is not None and args.workers < 1:
        raise InputError(f"--workers: expected a positive integer, found {args.workers}")
    if args.out and Path(args.out).suffix.lower() not in (".csv", ".jsonl"):
        raise InputError(f"--out: expected a .csv or .jsonl file name, found {Path(args.out).name!r}")
    device = resolve_device(args.device)
    meta = read_wafer_meta(args.checkpoint)
    thresholds = Thresholds.load(args.thresholds) if args.thresholds else \
        Thresholds.from_dict(meta.get("thresholds", {}), where="checkpoint thresholds")
    limits = thresholds.for_product(args.product)
    model_id = model_id_for(args.checkpoint)
    out = _ResultsFile(args.out) if args.out else None

    store = open_store(args.db)
    actor = Actor.system()
    lot_id = args.lot or _new_lot_id()
    get_or_create_lot(store, actor, lot_id, product=args.product or "")
    stored = {key: info for key, info in scores_for_lot(store, actor, lot_id).items() if info.status == "ok"}

    def skip(wafer_id: str, source: str):
        info = stored.get((source, wafer_id))
        if info is None:
            return None
        return WaferResult(wafer_id=wafer_id, source=source, status="ok", predicted_class=info.predicted_class,
                           class_probs=dict(info.probabilities), defect_score=info.defect_score,
                           anomaly_score=info.anomaly_score, slot=info.slot, resumed=True)

    if args.adapter and args.engine == "ray":
        raise InputError("--adapter: few-shot adapters are scored by the local engine; drop --engine ray")
    items = iter_wafers(args.inputs)
    if args.engine == "ray":
        results = score_ray(items, args.checkpoint or DEFAULT_CHECKPOINT, batch_size=args.batch_size,
                            concurrency=args.workers or 2, defect_threshold=limits.defect, skip=skip,
                            device=str(device))
    else:
        if args.workers:
            import torch

            torch.set_num_threads(args.workers)
        scorer = WaferScorer(args.checkpoint, device=str(device), adapter=args.adapter)
        results = score_local(items, scorer, batch_size=args.batch_size, defect_threshold=limits.defect, skip=skip)

    counts = {"ok": 0, "error": 0, "resumed": 0, "defect": 0, "anomaly": 0}
    pending: list = []
    started = time.perf_counter()

    def flush():
        if pending:
            add_wafer_scores(store, actor, lot_id, pending)
            pending.clear()

    bar = tqdm(total=_count_wafer_files(args.inputs), unit="map", disable=args.no_progress, file=sys.stderr,
               dynamic_ncols=True)
    try:
        for r in results:
            counts[r.status] += 1
            if r.resumed:
                counts["resumed"] += 1
            else:
                pending.append(NewWaferScore(
                    wafer_id=r.wafer_id, source=r.source, model_id=model_id, probabilities=r.class_probs or {},
                    predicted_class=r.predicted_class, defect_score=r.defect_score, anomaly_score=r.anomaly_score,
                    status=r.status, error=r.error, slot=r.slot))
            if r.status == "ok":
                counts["defect"] += (r.defect_score or 0) >= limits.defect
                counts["anomaly"] += (r.anomaly_score or 0) >= limits.anomaly
            if out is not None:
                out.write(r)
            if len(pending) >= 5000:
                flush()
            bar.update(1)
        flush()
    except BaseException:
        if out is not None:
            out.abort()
        raise
    finally:
        bar.close()
    if out is not None:
        out.commit()
    elapsed = time.perf_counter() - started
    total = counts["ok"] + counts["error"]
    print(f"lot {lot_id}: {total} wafers ({counts['ok']} ok, {counts['error']} errors, {counts['resumed']} already "
          f"scored) in {elapsed:.1f} s; {counts['defect']} over defect threshold {limits.defect}, "
          f"{counts['anomaly']} over anomaly threshold {limits.anomaly}" + (f"; results in {args.out}" if out else ""))
    return 0


def _report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from apps.store import Actor, lot_summary, open_store, scores_for_lot
    from pipelines.wafer.maps import read_sources
    from pipelines.wafer.report import LotWafer, build_report, export
    from pipelines.wafer.scoring import Thresholds, read_wafer_meta

    store = open_store(args.db)
    actor = Actor.system()
    summary = lot_summary(store, actor, args.lot)  # NotFoundError (an InputError) for an unknown lot
    scores = scores_for_lot(store, actor, args.lot)
    wafers = [LotWafer(wafer_id=s.wafer_id, source=s.source, status=s.status, slot=s.slot, error=s.error,
                       predicted_class=s.predicted_class, class_probs=dict(s.probabilities or {}),
                       defect_score=s.defect_score, anomaly_score=s.anomaly_score, model_id=s.model_id)
              for s in scores.values()]
    try:
        meta = read_wafer_meta(None)
        thresholds = Thresholds.from_dict(meta.get("thresholds", {}))
    except Exception:  # noqa: BLE001 - no shipped checkpoint: the default thresholds still apply
        thresholds = Thresholds()
    if args.thresholds:
        thresholds = Thresholds.load(args.thresholds)
    limits = thresholds.for_product(summary.product or None)
    maps = read_sources((w.source, w.wafer_id) for w in wafers)
    report = build_report(args.lot, summary.product, wafers, maps, limits.defect, limits.anomaly)
    out_dir = Path(args.out or f"report-{args.lot}".replace("/", "_"))
    files = export(report, out_dir)
    s = report.summary()
    print(f"lot {args.lot}: {s['wafers']} wafers, {s['errors']} errors, mean yield "
          f"{'-' if s['mean_yield_pct'] is None else format(s['mean_yield_pct'], '.1f') + '%'}, "
          f"{len(s['excursions'])} excursions; wrote {', '.join(str(p) for p in files.values())}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from apps.commands.eval import report_metrics
    from mmcore.device import resolve_device
    from mmcore.errors import InputError
    from pipelines.wafer.evaluate import evaluate_checkpoint

    if args.n < 100:
        raise InputError(f"--n: expected at least 100 held-out maps, found {args.n}")
    metrics = evaluate_checkpoint(args.checkpoint, n=args.n, seed=args.seed, device=str(resolve_device(args.device)),
                                  linear_steps=args.linear_steps, linear_checkpoint=args.linear_checkpoint,
                                  fewshot=not args.no_fewshot, fewshot_steps=args.fewshot_steps,
                                  progress=not args.json)
    report_metrics(metrics, args.json, f"wafer evaluation of {args.checkpoint} on held-out synthetic maps")
    return 0
