"""`mmcore eval ct-report CKPT`: the report model on held-out phantoms, with ablations.

Per phantom (seeds HELD_OUT_SEED_BASE.., never used in training): render, measure (`pipelines.ct.measure`), then write
the narrative four ways:
  full         volume + measurements in the prompt (what the application does)
  withheld     volume only, measurements kept from the prompt: the encoder-only ablation
  no_volume    measurements only, no volume tokens: what the encoder adds
  template     the deterministic template writer from the measurements (pipelines.ct.report)
and a constant baseline that writes the most frequent large-scale findings of the phantom mix.
Each text is labelled by the rule-based labeller (`pipelines.ct.grounding.finding_labels`) and compared with the
labels of the phantom's reference report: per-finding precision / recall / F1 and their macro mean. Also: nodule
location accuracy (side and lobe of each reference nodule >= 5 mm the report mentions with a size, paired one to one
by size; and, to tell the writer's errors from the measurement's, the same for the measured nodule nearest each
reference nodule), the finding head's own F1 per label (what the volume encoder put on the prompt's "seen:" line),
grounding flag rates, size mismatches left unflagged, BLEU-4 (sacrebleu) and ROUGE-L (rouge-score) against the
reference text, and generation latency.
"""

from __future__ import annotations

import re
import statistics
import time

import numpy as np

from pipelines.ct.phantom import FINDING_RATES, FINDING_TYPES, PhantomConfig

HELD_OUT_SEED_BASE = 960_000
LARGE_SCALE = ("pleural_effusion", "consolidation", "cardiomegaly", "emphysema")
LOCATION_MIN_MM = 5.0  # reference nodules at least this size count for location accuracy
LOCATION_SIZE_TOL = 0.35  # a mention's size within this share of a reference nodule's size refers to it
COMPOSITION_MISMATCH_MM = 0.5  # pairing cost (mm of size error) of a mention naming another composition


def _labels(text: str) -> dict[str, bool]:
    from pipelines.ct.grounding import finding_labels

    return finding_labels(text)


def f1_table(pairs: list[tuple[dict, dict]], types=FINDING_TYPES) -> tuple[dict, float]:
    """pairs of (generated labels, reference labels) -> ({type: {precision, recall, f1, support}}, macro F1).

    A type with no reference positive and no prediction in the set is left out of the macro mean (F1 undefined)."""
    table, f1s = {}, []
    for t in types:
        tp = sum(g[t] and r[t] for g, r in pairs)
        fp = sum(g[t] and not r[t] for g, r in pairs)
        fn = sum(r[t] and not g[t] for g, r in pairs)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        table[t] = {"precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
                    "support": tp + fn}
        if tp + fp + fn:
            f1s.append(f1)
    return table, round(float(np.mean(f1s)) if f1s else 0.0, 4)


def most_frequent_baseline() -> dict[str, bool]:
    """The constant report of the most frequent large-scale finding(s) in the phantom mix (ties all written)."""
    top = max(FINDING_RATES[t] for t in LARGE_SCALE)
    return {t: (t in LARGE_SCALE and FINDING_RATES[t] == top) for t in FINDING_TYPES}


def narrative_text(findings, impression: str) -> str:
    """Lungs, pleura, heart and impression texts joined: what is compared with the reference narrative."""
    return " ".join(s for s in (findings.lungs_airways, findings.pleura, findings.heart_pericardium, impression) if s)


def reference_text(report: dict) -> str:
    from pipelines.ct.train import split_sections

    return " ".join(split_sections(report))


def text_scores(hypotheses: list[str], references: list[str]) -> dict:
    import sacrebleu
    from rouge_score import rouge_scorer

    bleu = sacrebleu.corpus_bleu(hypotheses, [references]).score / 100.0
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, h)["rougeL"].fmeasure for h, r in zip(hypotheses, references)]
    return {"bleu4": round(bleu, 4), "rougeL": round(float(np.mean(rouge)) if rouge else 0.0, 4)}


def _composition(sentence: str) -> str | None:
    """The nodule composition a sentence names (the phantoms' vocabulary), or None."""
    low = sentence.lower()
    if re.search(r"part[- ]solid", low):
        return "part-solid"
    if re.search(r"ground[- ]glass", low):
        return "ground-glass"
    return "solid" if re.search(r"\bsolid\b", low) else None


def _pair_by_size(refs: list[dict], mentions: list) -> list[tuple[int, int]]:
    """(reference index, mention index) pairs, one to one, at the least total cost: a mention's cost for a reference
    is the mean distance (mm) of all its sizes ("7 mm (8 x 7 mm)") from the reference's diameter, plus
    COMPOSITION_MISMATCH_MM when it names another composition; a mention none of whose sizes lies within
    LOCATION_SIZE_TOL of the diameter does not refer to it. Location never enters the pairing."""
    from scipy.optimize import linear_sum_assignment

    if not refs or not mentions:
        return []
    far = 1e6
    cost = np.full((len(refs), len(mentions)), far)
    for i, f in enumerate(refs):
        d = f["diameter_mm"]
        for j, m in enumerate(mentions):
            errors = [abs(v - d) for v, _, _ in m.sizes_mm]
            if min(errors) <= LOCATION_SIZE_TOL * d:
                said = _composition(m.sentence)
                cost[i, j] = float(np.mean(errors)) + (
                    COMPOSITION_MISMATCH_MM if said and f.get("composition") and said != f["composition"] else 0.0)
    return [(int(i), int(j)) for i, j in zip(*linear_sum_assignment(cost)) if cost[i, j] < far]


def location_hits(findings_text: str, impression: str, truth: list[dict]) -> tuple[int, int]:
    """(correct, checked): reference nodules >= LOCATION_MIN_MM that a nodule mention refers to by size; correct
    when the mention's lobe (or side, when no lobe is named) agrees.

    Nodules are described in the Findings, so references pair with Findings mentions first (`_pair_by_size`); a
    reference left unpaired may pair with an Impression mention, unless that mention restates a paired Findings
    mention (same lobe and a size within 1 mm): a restated nodule is not a mention of another one."""
    from pipelines.ct.grounding import label_text

    def nodules(text):
        return [m for m in label_text(text) if m.type == "nodule" and not m.negated and m.sizes_mm]

    refs = [f for f in truth if f["type"] == "nodule" and f["diameter_mm"] >= LOCATION_MIN_MM]
    described = nodules(findings_text)
    pairs = [(refs[i], described[j]) for i, j in _pair_by_size(refs, described)]
    paired = {id(f) for f, _ in pairs}
    said = [x for _, x in pairs]
    def restates(m, x) -> bool:
        return m.lobe == x.lobe and any(abs(v - w) <= 1.0 for v, _, _ in m.sizes_mm for w, _, _ in x.sizes_mm)

    fresh = [m for m in nodules(impression) if not any(restates(m, x) for x in said)]
    left = [f for f in refs if id(f) not in paired]
    pairs += [(left[i], fresh[j]) for i, j in _pair_by_size(left, fresh)]
    correct = sum((m.lobe == f.get("lobe")) if m.lobe else (m.side == f.get("side")) for f, m in pairs)
    return correct, len(pairs)


def measured_location_hits(found: list, truth: list[dict]) -> tuple[int, int]:
    """(correct, checked): reference nodules >= LOCATION_MIN_MM with a measured nodule whose centre lies within the
    reference's diameter (at least 5 mm); correct when the measured lobe agrees."""
    measured = [f for f in found if f.type == "nodule" and f.center_zyx_mm is not None]
    checked = correct = 0
    for f in truth:
        if f["type"] != "nodule" or f["diameter_mm"] < LOCATION_MIN_MM or not measured:
            continue
        centre = np.asarray(f["center_zyx_mm"], dtype=float)
        near = min(measured, key=lambda m: float(np.linalg.norm(np.asarray(m.center_zyx_mm) - centre)))
        if float(np.linalg.norm(np.asarray(near.center_zyx_mm) - centre)) > max(5.0, f["diameter_mm"]):
            continue
        checked += 1
        correct += near.lobe == f.get("lobe")
    return correct, checked


def head_f1(pairs: list[tuple[list | None, list[float]]]) -> dict:
    """Per label of the finding head: F1 of its seen findings against the ground truth, and their macro mean."""
    from pipelines.ct.finding_head import SEEN_LABELS, labels_of

    rows = [(labels_of(seen), truth) for seen, truth in pairs if seen is not None]
    if not rows:
        return {}
    out = {}
    for k, (kind, side) in enumerate(SEEN_LABELS):
        tp = sum(p[k] and t[k] for p, t in rows)
        n_pred, n_true = sum(p[k] for p, _ in rows), sum(t[k] for _, t in rows)
        out["_".join(x for x in (kind, side) if x)] = round(2 * tp / (n_pred + n_true), 4) if n_pred + n_true else None
    scored = [v for v in out.values() if v is not None]
    return {"per_label": out, "macro_f1": round(sum(scored) / len(scored), 4) if scored else None}


def unflagged_size_mismatches(report) -> int:
    """Size mismatches an independent grounding pass finds in the final text that the report does not flag."""
    from pipelines.ct.grounding import ground

    check = ground(report.model_copy(deep=True), size_policy="check")
    flagged = {(f.measurement_id, f.kind) for f in report.flags}
    return sum(1 for f in check.flags if f.kind == "size_mismatch"
               and (f.measurement_id, "size_mismatch") not in flagged
               and (f.measurement_id, "size_corrected") not in flagged)


# ------------------------------------------------------------------------------------- validation on cached cases

def evaluate_cases(writer, cases: list[tuple[np.ndarray, dict]], seed: int = 0) -> dict:
    """Training-time check on cached (grid, truth) cases with simulated measurements: measured and withheld modes."""
    import torch

    from pipelines.ct.report_model import HU_SCALE
    from pipelines.ct.train import simulate_measurements

    rng = np.random.default_rng(seed)
    grids = [torch.from_numpy(g.astype(np.float32) / HU_SCALE) for g, _ in cases]
    measured = [simulate_measurements(t["findings"], rng) for _, t in cases]
    full = writer.write(grids, measured, [None] * len(cases))
    withheld = writer.write(grids, [None] * len(cases), [None] * len(cases))
    refs = [reference_text(t["report"]) for _, t in cases]
    ref_labels = [_labels(r) for r in refs]
    hyps = [narrative_text(d.findings, d.impression) for d in full]
    _, macro = f1_table([(_labels(h), r) for h, r in zip(hyps, ref_labels)])
    _, enc = f1_table([(_labels(narrative_text(d.findings, d.impression)), r) for d, r in zip(withheld, ref_labels)],
                      LARGE_SCALE)
    return {"finding_macro_f1": macro, "encoder_only_f1": enc, **text_scores(hyps, refs)}


# ------------------------------------------------------------------------------------------- held-out evaluation

def evaluate(checkpoint: str, n: int = 100, size: int = 256, slices: int = 96, thickness: float = 2.5,
             device: str = "cpu", progress=None) -> dict:
    from pipelines.ct.finding_head import labels_of
    from pipelines.ct.measure import measure
    from pipelines.ct.phantom import make_phantom
    from pipelines.ct.report import MODEL_SIZE_POLICY, build_report, measurements_from_findings, write_narrative
    from pipelines.ct.report_model import ReportModel, measurement_dicts, volume_grid

    writer = ReportModel.load(checkpoint, device=device)
    cfg = PhantomConfig(size=size, slices=slices, thickness_mm=thickness)
    cfg.validate()
    started = time.perf_counter()
    rows = {"full": [], "withheld": [], "no_volume": [], "template": [], "baseline": []}
    hyps, refs, latencies, flag_counts = [], [], [], {}
    location, measured_location = [0, 0], [0, 0]
    head_rows = []
    unflagged = 0
    baseline = most_frequent_baseline()
    for i in range(n):
        seed = HELD_OUT_SEED_BASE + i
        t0 = time.perf_counter()
        phantom = make_phantom(seed, None, cfg)
        found = measure(phantom.volume)
        measurements = measurements_from_findings(found.findings, phantom.volume.spacing_zyx)
        prompt_rows = measurement_dicts(measurements)
        grid = volume_grid(phantom.volume.hu)
        g0 = time.perf_counter()
        full = writer.write_one(grid, prompt_rows)
        latencies.append(time.perf_counter() - g0)
        withheld, no_volume = writer.write([grid, None], [None, prompt_rows], [None, None])
        report = build_report(found.findings, metadata=phantom.volume.metadata,
                              lung_volume_ml=sum(found.lung_volume_ml.values()),
                              spacing_zyx=phantom.volume.spacing_zyx, model=writer.info(),
                              narrative=(full.findings, full.impression), size_policy=MODEL_SIZE_POLICY)
        for f in report.flags:
            flag_counts[f.kind] = flag_counts.get(f.kind, 0) + 1
        unflagged += unflagged_size_mismatches(report)
        reference = reference_text(phantom.ground_truth["report"])
        ref_labels = _labels(reference)
        text = narrative_text(report.findings, report.impression)
        template_findings, template_impression, _ = write_narrative(report.measurements)
        rows["full"].append((_labels(text), ref_labels))
        rows["withheld"].append((_labels(narrative_text(withheld.findings, withheld.impression)), ref_labels))
        rows["no_volume"].append((_labels(narrative_text(no_volume.findings, no_volume.impression)), ref_labels))
        rows["template"].append((_labels(narrative_text(template_findings, template_impression)), ref_labels))
        rows["baseline"].append((baseline, ref_labels))
        hit, checked = location_hits(narrative_text(report.findings, ""), report.impression,
                                     phantom.ground_truth["findings"])
        location[0] += hit
        location[1] += checked
        hit, checked = measured_location_hits(found.findings, phantom.ground_truth["findings"])
        measured_location[0] += hit
        measured_location[1] += checked
        head_rows.append((withheld.seen, labels_of(phantom.ground_truth["findings"])))
        hyps.append(text)
        refs.append(reference)
        if progress:
            progress(i + 1, n, seed, time.perf_counter() - t0)
    per_finding, macro = f1_table(rows["full"])
    _, encoder_only = f1_table(rows["withheld"], LARGE_SCALE)
    _, baseline_f1 = f1_table(rows["baseline"], LARGE_SCALE)
    _, no_volume_f1 = f1_table(rows["no_volume"])
    _, template_f1 = f1_table(rows["template"])
    _, full_large = f1_table(rows["full"], LARGE_SCALE)
    _, no_volume_large = f1_table(rows["no_volume"], LARGE_SCALE)
    return {
        "checkpoint": str(checkpoint), "model": writer.model_id, "n_phantoms": n,
        "phantom": (f"{size}x{size}x{slices} at {thickness:g} mm, "
                    f"seeds {HELD_OUT_SEED_BASE}-{HELD_OUT_SEED_BASE + n - 1}"),
        "finding_macro_f1": macro, "per_finding": per_finding,
        "encoder_only_f1": encoder_only, "baseline_f1": baseline_f1,
        "ablation": {"full_large_scale_f1": full_large, "no_volume_f1": no_volume_f1,
                     "no_volume_large_scale_f1": no_volume_large, "template_f1": template_f1,
                     "encoder_only_large_scale_f1": encoder_only, "finding_head": head_f1(head_rows)},
        "location_accuracy": round(location[0] / location[1], 4) if location[1] else None,
        "location_checked": location[1],
        "measured_location_accuracy": (round(measured_location[0] / measured_location[1], 4)
                                       if measured_location[1] else None),
        "unflagged_size_mismatches": unflagged,
        "flags_per_report": {k: round(v / n, 3) for k, v in sorted(flag_counts.items())},
        **text_scores(hyps, refs),
        "generation_median_s": round(statistics.median(latencies), 3),
        "seconds": round(time.perf_counter() - started, 1),
    }
