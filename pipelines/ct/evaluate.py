"""Measurement accuracy on held-out phantoms: each phantom goes through the full path (DICOM series on disk ->
ingest -> measure) and is compared with its ground truth.

Held-out seeds start at HELD_OUT_SEED (900000-900029 for `--n 30`); the detector's thresholds were tuned on the
development seeds 5000-5039 (seed-drawn mix, and the same seeds with forced nodules) and tests use seeds below 10_000,
so the evaluation never sees a tuned case.
Matching: a detected nodule or granuloma matches a ground-truth lesion when their centres are within
max(4 mm, radius + 2 mm). Sensitivity counts ground-truth nodules >= 5 mm; a false positive is a detected nodule
or granuloma matching no lesion of any size.
Whole-finding detection (precision and recall over the phantoms): a consolidation is found when one is measured on
the side of the true one; cardiomegaly and pericardial effusion are found when the phantom carries them and the
measurement reports them. The cardiothoracic ratio error compares the measured ratio (reported whether or not it is
abnormal) with the phantom's.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass

import numpy as np

HELD_OUT_SEED = 900_000
MIN_SENSITIVITY_MM = 5.0


@dataclass
class CaseResult:
    seed: int
    truth: dict
    measured: dict
    seconds: float


def run_case(seed: int, size: int, slices: int, thickness: float) -> CaseResult:
    from pipelines.ct.dicom import ingest
    from pipelines.ct.measure import measure
    from pipelines.ct.phantom import PhantomConfig, make_phantom, write_series

    t0 = time.perf_counter()
    phantom = make_phantom(seed, None, PhantomConfig(size=size, slices=slices, thickness_mm=thickness))
    with tempfile.TemporaryDirectory(prefix="mmcore-eval-") as tmp:
        write_series(phantom.volume, tmp)
        volume = ingest(tmp).volume
    measured = measure(volume).to_dict()
    return CaseResult(seed, phantom.ground_truth, measured, time.perf_counter() - t0)


def _distance(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a, float) - np.asarray(b, float)))


def score(cases: list[CaseResult]) -> dict:
    n_target = hits = false_pos = 0
    diameter_errors, effusion_errors, pericardial_errors, emphysema_errors = [], [], [], []
    effusions_present = effusions_found = 0
    # per finding type: [true detections, detections, true findings found, true findings]
    counts = {kind: [0, 0, 0, 0] for kind in ("consolidation", "cardiomegaly", "pericardial_effusion")}
    ctr_errors = []
    for case in cases:
        lesions = [f for f in case.truth["findings"] if f["type"] in ("nodule", "calcified_granuloma")]
        found = [f for f in case.measured["findings"] if f["type"] in ("nodule", "calcified_granuloma")]
        used = set()
        for det in found:
            match = None
            for i, gt in enumerate(lesions):
                if _distance(det["center_zyx_mm"], gt["center_zyx_mm"]) <= max(4.0, gt["diameter_mm"] / 2 + 2):
                    match = i
                    break
            if match is None:
                false_pos += 1
            elif match not in used:
                used.add(match)
                gt = lesions[match]
                if gt["type"] == "nodule" and gt["diameter_mm"] >= MIN_SENSITIVITY_MM:
                    diameter_errors.append(abs(det["diameter_mm"] - gt["diameter_mm"]))
        for i, gt in enumerate(lesions):
            if gt["type"] == "nodule" and gt["diameter_mm"] >= MIN_SENSITIVITY_MM:
                n_target += 1
                hits += i in used
        measured_eff = {(f["type"], f.get("side")): f for f in case.measured["findings"]
                        if f["type"] in ("pleural_effusion", "pericardial_effusion")}
        for gt in case.truth["findings"]:
            if gt["type"] not in ("pleural_effusion", "pericardial_effusion"):
                continue
            det = measured_eff.get((gt["type"], gt.get("side")))
            if gt["type"] == "pleural_effusion":
                effusions_present += 1
                if det is not None:
                    effusions_found += 1
                    effusion_errors.append(abs(det["volume_ml"] - gt["volume_ml"]) / gt["volume_ml"])
            elif det is not None:
                pericardial_errors.append(abs(det["volume_ml"] - gt["volume_ml"]) / gt["volume_ml"])
        emphysema_errors.append(abs(case.measured["lungs"]["laa950_percent"] - case.truth["lungs"]["laa950_percent"]))
        true_sides = [f.get("side") for f in case.truth["findings"] if f["type"] == "consolidation"]
        found_sides = [f.get("side") for f in case.measured["findings"] if f["type"] == "consolidation"]
        counts["consolidation"][0] += sum(side in true_sides for side in found_sides)
        counts["consolidation"][1] += len(found_sides)
        counts["consolidation"][2] += sum(side in found_sides for side in true_sides)
        counts["consolidation"][3] += len(true_sides)
        for kind in ("cardiomegaly", "pericardial_effusion"):
            truth_has = any(f["type"] == kind for f in case.truth["findings"])
            found_has = any(f["type"] == kind for f in case.measured["findings"])
            counts[kind][0] += truth_has and found_has
            counts[kind][1] += found_has
            counts[kind][2] += truth_has and found_has
            counts[kind][3] += truth_has
        heart = case.measured.get("heart") or {}
        if heart.get("cardiothoracic_ratio") is not None and case.truth.get("cardiothoracic_ratio") is not None:
            ctr_errors.append(abs(heart["cardiothoracic_ratio"] - case.truth["cardiothoracic_ratio"]))
    n = max(len(cases), 1)

    def mean(values):
        return float(statistics.fmean(values)) if values else None

    out = {
        "n_phantoms": len(cases),
        "n_nodules_ge5mm": n_target,
        "nodule_sensitivity": hits / n_target if n_target else None,
        "fp_per_scan": false_pos / n,
        "median_diameter_error_mm": float(statistics.median(diameter_errors)) if diameter_errors else None,
        "n_pleural_effusions": effusions_present,
        "effusion_detection_rate": effusions_found / effusions_present if effusions_present else None,
        "effusion_volume_rel_error": mean(effusion_errors),
        "effusion_volume_rel_error_max": max(effusion_errors) if effusion_errors else None,
        "pericardial_volume_rel_error": mean(pericardial_errors),
        "emphysema_abs_error_pp": mean(emphysema_errors),
        "emphysema_abs_error_pp_max": max(emphysema_errors) if emphysema_errors else None,
    }
    for kind, (true_det, det, found, present) in counts.items():
        out[f"n_{kind}"] = present
        out[f"{kind}_precision"] = true_det / det if det else None
        out[f"{kind}_recall"] = found / present if present else None
    out["n_cardiothoracic_ratios"] = len(ctr_errors)
    out["cardiothoracic_ratio_abs_error"] = mean(ctr_errors)
    out["cardiothoracic_ratio_abs_error_max"] = max(ctr_errors) if ctr_errors else None
    return out


def evaluate(n: int = 30, size: int = 256, slices: int = 96, thickness: float = 2.5,
             first_seed: int = HELD_OUT_SEED, progress=None) -> dict:
    cases = []
    t0 = time.perf_counter()
    for i in range(n):
        cases.append(run_case(first_seed + i, size, slices, thickness))
        if progress is not None:
            progress(i + 1, n, cases[-1])
    metrics = score(cases)
    metrics.update({"phantom": f"{size}x{size}x{slices} at {thickness:g} mm slices, "
                               f"{360.0 / size:.3f} mm pixels", "first_seed": first_seed,
                    "seconds": round(time.perf_counter() - t0, 1)})
    return metrics
