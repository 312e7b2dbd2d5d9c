"""Evaluation of a wafer scoring model on held-out synthetic maps (seeds disjoint from training).

- 9-class task (maps with one pattern or none): macro-F1, per-class recall, confusion matrix (rows = truth).
- Mixed maps: exact match of the predicted pattern set (each pattern's probability at or above its decision threshold,
  fitted on held-out maps after training) with the truth.
- ECE of the 9-class prediction's confidence.
- Unseen patterns (reticle repeater, half-wafer failure: in no training map): recall of the anomaly flag, and the
  false-alarm rate of the same flag on held-out maps of known classes, `none` included.
- Few-shot: a new class learned from 50 maps with the base frozen (LoRA), recall on new held-out maps of it.
"""

from __future__ import annotations

import numpy as np
import torch

from pipelines.wafer.dataset import WaferSet, synthetic_set
from pipelines.wafer.maps import CLASSES, WaferError
from pipelines.wafer.scoring import expected_calibration_error
from pipelines.wafer.synth import NOVEL_PATTERNS
from pipelines.wafer.train import embed_all

EVAL_SEED = 10_000


def predictions(probs: np.ndarray, defect: np.ndarray, threshold: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """9-class index (CLASSES order; `none` when defect < threshold) and its confidence."""
    pattern = probs.argmax(1)
    is_defect = defect >= threshold
    pred = np.where(is_defect, pattern, CLASSES.index("none"))
    conf = np.where(is_defect, probs[np.arange(len(probs)), pattern], 1.0 - defect)
    return pred, conf


def f1_scores(truth: np.ndarray, pred: np.ndarray, n: int) -> tuple[float, list[float], list[list[int]]]:
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (truth, pred), 1)
    tp = np.diag(confusion).astype(float)
    recall = tp / np.maximum(confusion.sum(1), 1)
    precision = tp / np.maximum(confusion.sum(0), 1)
    f1 = np.where(tp > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
    present = confusion.sum(1) > 0
    return float(f1[present].mean()), recall.tolist(), confusion.tolist()


def model_probs(model, inputs: np.ndarray, temperature: torch.Tensor) -> tuple[np.ndarray, np.ndarray, torch.Tensor]:
    logits, emb, _ = embed_all(model, inputs)
    probs = torch.sigmoid(logits / temperature).numpy()
    return probs[:, :-1], probs[:, -1], emb


def known_class_metrics(model, data: WaferSet, temperature: torch.Tensor,
                        pattern_threshold: np.ndarray | None = None) -> dict:
    """macro_f1, per_class_recall, confusion, mixed_exact_match, ece on a labelled set (pattern sets cut at
    `pattern_threshold`, (K,); 0.5 each when None)."""
    probs, defect, _ = model_probs(model, data.inputs, temperature)
    cut = np.full(probs.shape[1], 0.5) if pattern_threshold is None else np.asarray(pattern_threshold)
    truth = data.class_index()
    single = truth >= 0
    pred, conf = predictions(probs, defect)
    macro_f1, recall, confusion = f1_scores(truth[single], pred[single], len(CLASSES))
    mixed = ~single
    exact = ((probs[mixed] >= cut) == (data.targets[mixed] >= 0.5)).all(1)
    return {"macro_f1": round(macro_f1, 4),
            "per_class_recall": {c: round(r, 4) for c, r in zip(CLASSES, recall)},
            "confusion": confusion,
            "mixed_exact_match": round(float(exact.mean()), 4) if mixed.any() else None,
            "ece": round(expected_calibration_error(conf[single], pred[single] == truth[single]), 4),
            "n_single": int(single.sum()), "n_mixed": int(mixed.sum())}


def unseen_metrics(scorer, n_known: int, n_unseen: int, seed: int) -> dict:
    """Anomaly flag (scorer threshold for the default product) on novel patterns vs held-out known maps."""
    threshold = scorer.thresholds.for_product(None).anomaly
    known = synthetic_set(n_known, seed + 1, scorer.size, scorer.classes)
    unseen = synthetic_set(n_unseen, seed + 2, scorer.size, scorer.classes + NOVEL_PATTERNS,
                           patterns=[(p,) for p in NOVEL_PATTERNS])
    known_scores = scorer.score_inputs(known.inputs).anomaly
    unseen_scores = scorer.score_inputs(unseen.inputs).anomaly
    per_pattern = {}
    for p in NOVEL_PATTERNS:
        sel = np.array([lb == (p,) for lb in unseen.labels])
        per_pattern[p] = round(float((unseen_scores[sel] >= threshold).mean()), 4) if sel.any() else None
    return {"unseen_recall": round(float((unseen_scores >= threshold).mean()), 4),
            "unseen_recall_per_pattern": per_pattern,
            "unseen_false_alarm": round(float((known_scores >= threshold).mean()), 4),
            "anomaly_threshold": threshold}


def evaluate_checkpoint(checkpoint, n: int = 1800, seed: int = EVAL_SEED, device: str = "cpu",
                        linear_steps: int | None = None, linear_checkpoint=None, fewshot: bool = True,
                        fewshot_steps: int = 150, progress: bool = False) -> dict:
    """Every metric of `mmcore eval wafer` for a checkpoint folder."""
    import time

    from pipelines.wafer.scoring import WaferScorer

    t0 = time.perf_counter()
    scorer = WaferScorer(checkpoint, device=device)
    # Single classes and `none` equally often, plus a quarter of mixtures (as in training, other seeds).
    data = synthetic_set(n, seed, scorer.size, scorer.classes, mixed_fraction=0.25)
    metrics = known_class_metrics(scorer.net, data, scorer.temperature.cpu(), scorer.pattern_threshold)
    metrics.update(unseen_metrics(scorer, n_known=n // 2, n_unseen=max(n // 4, 100), seed=seed))
    if linear_checkpoint is not None:
        probe = WaferScorer(linear_checkpoint, device=device)
        if probe.meta.get("head") != "linear":
            raise WaferError(f"{linear_checkpoint}: not a linear-head ablation checkpoint (train it with "
                             f"`mmcore train wafer --option head=linear`)")
        metrics["linear_head_macro_f1"] = known_class_metrics(probe.net, data, probe.temperature.cpu(),
                                                              probe.pattern_threshold)["macro_f1"]
        metrics["linear_head_steps"] = probe.card.get("steps")
    else:
        metrics["linear_head_macro_f1"] = linear_head_macro_f1(scorer, data, linear_steps, progress)
    metrics["steps"] = scorer.card.get("steps")
    if fewshot:
        from pipelines.wafer.finetune import fewshot_eval

        metrics.update(fewshot_eval(checkpoint, seed=seed + 3, steps=fewshot_steps, device=device))
    metrics["n_eval_maps"] = n
    metrics["eval_seed"] = seed
    metrics["eval_s"] = round(time.perf_counter() - t0, 1)
    return metrics


def linear_head_macro_f1(scorer, data: WaferSet, steps: int | None, progress: bool = False) -> float:
    """The ablation: the same encoder architecture with a plain linear head, trained with the same recipe, data and
    steps as the checkpoint (from its card) unless `steps` says otherwise; macro-F1 on the same held-out maps."""
    import tempfile

    from mmcore.train import run_recipe
    from pipelines.wafer.scoring import WaferScorer
    from pipelines.wafer.train import WaferRecipe

    card = scorer.card or {}
    train_cfg = dict(card.get("train_config") or {})
    steps = int(steps or card.get("steps") or train_cfg.get("steps") or 700)
    recipe = WaferRecipe(n_train=card.get("train_maps", 16_000), n_holdout=card.get("holdout_maps", 3_000),
                         mixed_fraction=card.get("mixed_fraction", 0.25), size=scorer.size, head="linear",
                         encoder=scorer.net.core.cfg.image.model_name)
    overrides = {k: train_cfg[k] for k in ("batch_size", "lr", "warmup_steps", "weight_decay", "min_lr_ratio", "seed")
                 if k in train_cfg}
    with tempfile.TemporaryDirectory(prefix="wafer-linear-") as tmp:
        run_recipe(recipe, tmp, steps=steps, progress=progress, **overrides)
        probe = WaferScorer(tmp)
        return known_class_metrics(probe.net, data, probe.temperature.cpu())["macro_f1"]


