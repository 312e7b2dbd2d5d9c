"""Reference report text for a phantom: Indication, Technique, Findings, Impression and a Fleischner-style follow-up.

Wording comes from a small grammar (alternatives picked by a seeded generator), so reference reports vary the way
radiologists' phrasing does while every number is taken from the ground truth.
Follow-up lines follow the Fleischner Society 2017 guideline for incidental nodules (low-risk patient, single vs
multiple, solid vs subsolid); calcified granulomas are benign and need none.
"""

from __future__ import annotations

from pipelines.ct.anatomy import LOBE_NAMES

INDICATIONS = ["Chronic cough.", "Shortness of breath.", "Follow-up of abnormal chest radiograph.",
               "Smoker, evaluate for lung pathology.", "Chest pain, rule out pulmonary process.",
               "Dyspnoea on exertion.", "Pre-operative assessment."]
TECHNIQUE = [
    "Helical CT of the chest without intravenous contrast, reconstructed at {t:g} mm.",
    "Non-contrast CT of the chest acquired helically; axial images at {t:g} mm slice thickness.",
    "CT chest performed without IV contrast. Axial reconstructions at {t:g} mm.",
]
NORMAL_LUNGS = ["The lungs are clear.", "No focal consolidation.", "Lungs are clear without focal airspace disease."]
NO_EFFUSION = ["No pleural effusion.", "No pleural effusion or pneumothorax.", "The pleural spaces are clear."]
NORMAL_HEART = ["Heart size is normal. No pericardial effusion.", "Normal heart size without pericardial effusion.",
                "The heart is not enlarged; no pericardial effusion."]
NO_NODULE = ["No suspicious pulmonary nodule.", "No pulmonary nodules are identified.",
             "There are no lung nodules."]
NORMAL_IMPRESSION = ["No acute cardiopulmonary abnormality.", "Normal CT of the chest.",
                     "No significant intrathoracic abnormality."]
NODULE = [
    "{Comp} nodule in the {lobe} measuring {long:.0f} x {short:.0f} mm (mean {d:.0f} mm).",
    "There is a {comp} pulmonary nodule in the {lobe}, {long:.0f} x {short:.0f} mm.",
    "A {d:.0f} mm {comp} nodule is present in the {lobe} ({long:.0f} x {short:.0f} mm).",
]
GRANULOMA = ["Calcified granuloma in the {lobe} ({d:.0f} mm).", "A densely calcified {d:.0f} mm granuloma in the {lobe}.",
             "{d:.0f} mm calcified nodule in the {lobe}, consistent with a granuloma."]
EFFUSION = ["{Size} {side} pleural effusion (approximately {v:.0f} mL).",
            "There is a {size} {side} pleural effusion, estimated volume {v:.0f} mL.",
            "{Size} layering {side} pleural effusion, about {v:.0f} mL."]
PERICARDIAL = ["{Size} pericardial effusion (approximately {v:.0f} mL).",
               "There is a {size} pericardial effusion, about {v:.0f} mL."]
EMPHYSEMA = ["{Sev} {pred} emphysema (LAA-950 {laa:.0f}% of lung volume).",
             "Emphysematous changes, {sev}, {pred}; low-attenuation area below -950 HU {laa:.0f}%.",
             "{Sev} emphysema with {pred} distribution (%LAA-950 = {laa:.0f}%)."]
CONSOLIDATION = ["Consolidation in the {lobe} with air bronchograms (about {v:.0f} mL).",
                 "Airspace consolidation in the {lobe}, approximately {v:.0f} mL, with air bronchograms.",
                 "Focal consolidation involving the {lobe} ({v:.0f} mL)."]
CARDIOMEGALY = ["The heart is enlarged (cardiothoracic ratio {ctr:.2f}).", "Cardiomegaly, cardiothoracic ratio {ctr:.2f}.",
                "Enlarged cardiac silhouette (CTR {ctr:.2f})."]
# Wording for a finding seen on the images but not measured (a finding dict with "unmeasured": True): no numbers,
# since nothing measured them. The report model learns these for what its volume encoder sees at large scale.
EFFUSION_SEEN = ["{Side} pleural effusion.", "There is a {side} pleural effusion.", "Layering {side} pleural effusion."]
PERICARDIAL_SEEN = ["Pericardial effusion.", "There is a pericardial effusion."]
EMPHYSEMA_SEEN = ["{Pred} emphysema.", "Emphysematous changes, {pred}."]
CONSOLIDATION_SEEN = ["Consolidation in the {lobe}.", "Airspace consolidation in the {lobe}.",
                      "Focal consolidation involving the {lobe}."]
CARDIOMEGALY_SEEN = ["The heart is enlarged.", "Cardiomegaly.", "Enlarged cardiac silhouette."]


def _size_word(volume_ml: float, small: float, large: float) -> str:
    return "small" if volume_ml < small else "moderate" if volume_ml < large else "large"


def fleischner(nodules: list[dict]) -> str:
    """Follow-up recommendation for incidental nodules (Fleischner 2017, low-risk patient); '' when none needed."""
    if not nodules:
        return ""
    biggest = max(nodules, key=lambda n: n["diameter_mm"])
    d = biggest["diameter_mm"]
    multiple = len(nodules) > 1
    comp = biggest.get("composition", "solid")
    if comp == "solid":
        if d < 6:
            return "No routine follow-up is required for solid nodule(s) under 6 mm in a low-risk patient (Fleischner 2017)."
        if d <= 8:
            return ("CT at 3-6 months, then consider CT at 18-24 months (Fleischner 2017, multiple solid nodules 6-8 mm)."
                    if multiple else
                    "CT at 6-12 months, then consider CT at 18-24 months (Fleischner 2017, solid nodule 6-8 mm).")
        return ("CT at 3-6 months, then consider CT at 18-24 months (Fleischner 2017, multiple solid nodules > 8 mm)."
                if multiple else
                "Consider CT at 3 months, PET/CT, or tissue sampling (Fleischner 2017, solid nodule > 8 mm).")
    if d < 6:
        return "No routine follow-up is required for a subsolid nodule under 6 mm (Fleischner 2017)."
    if comp == "ground-glass":
        return ("CT at 6-12 months to confirm persistence, then every 2 years until 5 years "
                "(Fleischner 2017, ground-glass nodule >= 6 mm).")
    return ("CT at 3-6 months to confirm persistence; if unchanged and the solid component stays under 6 mm, annual CT "
            "for 5 years (Fleischner 2017, part-solid nodule >= 6 mm).")


def reference_report(findings: list[dict], meta, cfg, rng) -> dict:
    """Sections as text plus the full report; numbers come from `findings` (the ground truth)."""
    pick = lambda options: options[int(rng.integers(len(options)))]  # noqa: E731 - grammar choice
    by_type: dict[str, list[dict]] = {}
    for f in findings:
        by_type.setdefault(f["type"], []).append(f)
    lung_lines, pleura_lines, heart_lines, impression = [], [], [], []

    nodules = sorted(by_type.get("nodule", []), key=lambda f: -f["diameter_mm"])
    for f in nodules:
        comp = f["composition"]
        lung_lines.append(pick(NODULE).format(Comp=comp.capitalize(), comp=comp, lobe=LOBE_NAMES.get(f["lobe"], "lung"),
                                              long=f["long_axis_mm"], short=f["short_axis_mm"], d=f["diameter_mm"]))
    if nodules:
        n = nodules[0]
        more = f" and {len(nodules) - 1} smaller nodule(s)" if len(nodules) > 1 else ""
        impression.append(f"{n['diameter_mm']:.0f} mm {n['composition']} nodule in the "
                          f"{LOBE_NAMES.get(n['lobe'], 'lung')}{more}.")
    for f in by_type.get("calcified_granuloma", []):
        lung_lines.append(pick(GRANULOMA).format(lobe=LOBE_NAMES.get(f["lobe"], "lung"), d=f["diameter_mm"]))
    for f in by_type.get("consolidation", []):
        # a consolidation seen on the coarse grid has a side but no lobe
        lobe = LOBE_NAMES.get(f.get("lobe")) or (f"{f['side']} lung" if f.get("side") in ("right", "left") else "lung")
        lung_lines.append(pick(CONSOLIDATION_SEEN).format(lobe=lobe) if f.get("unmeasured") else
                          pick(CONSOLIDATION).format(lobe=lobe, v=f["volume_ml"]))
        impression.append(f"Consolidation in the {lobe}, compatible with pneumonia in the appropriate clinical setting.")
    for f in by_type.get("emphysema", []):
        pred = "upper-lobe predominant" if f.get("predominance") == "upper lobe" else "diffuse"
        if f.get("unmeasured"):
            lung_lines.append(pick(EMPHYSEMA_SEEN).format(Pred=pred.capitalize(), pred=pred))
            impression.append("Emphysema.")
            continue
        laa = f["laa950_percent"]
        sev = "mild" if laa < 10 else "moderate" if laa < 25 else "severe"
        lung_lines.append(pick(EMPHYSEMA).format(Sev=sev.capitalize(), sev=sev, pred=pred, laa=laa))
        impression.append(f"{sev.capitalize()} emphysema (LAA-950 {laa:.0f}%).")
    if not lung_lines:
        lung_lines = [pick(NORMAL_LUNGS), pick(NO_NODULE)]
    elif not nodules:
        lung_lines.append(pick(NO_NODULE))

    for f in by_type.get("pleural_effusion", []):
        if f.get("unmeasured"):
            pleura_lines.append(pick(EFFUSION_SEEN).format(Side=f["side"].capitalize(), side=f["side"]))
            impression.append(f"{f['side'].capitalize()} pleural effusion.")
            continue
        size = _size_word(f["volume_ml"], 300, 1000)
        pleura_lines.append(pick(EFFUSION).format(Size=size.capitalize(), size=size, side=f["side"], v=f["volume_ml"]))
        impression.append(f"{size.capitalize()} {f['side']} pleural effusion (about {f['volume_ml']:.0f} mL).")
    if not pleura_lines:
        pleura_lines = [pick(NO_EFFUSION)]
    cardio = by_type.get("cardiomegaly", [])
    peri = by_type.get("pericardial_effusion", [])
    for f in cardio:
        heart_lines.append(pick(CARDIOMEGALY_SEEN) if f.get("unmeasured") else
                           pick(CARDIOMEGALY).format(ctr=f["cardiothoracic_ratio"]))
        impression.append("Cardiomegaly.")
    for f in peri:
        if f.get("unmeasured"):
            heart_lines.append(pick(PERICARDIAL_SEEN))
            impression.append("Pericardial effusion.")
            continue
        size = _size_word(f["volume_ml"], 100, 500)
        heart_lines.append(pick(PERICARDIAL).format(Size=size.capitalize(), size=size, v=f["volume_ml"]))
        impression.append(f"{size.capitalize()} pericardial effusion.")
    if not heart_lines:
        heart_lines = [pick(NORMAL_HEART)]
    elif not peri:
        heart_lines.append("No pericardial effusion.")
    if not impression:
        impression = [pick(NORMAL_IMPRESSION)]

    sections = {
        "indication": pick(INDICATIONS),
        "technique": pick(TECHNIQUE).format(t=cfg.thickness_mm),
        "findings": " ".join(["Lungs: " + " ".join(lung_lines), "Pleura: " + " ".join(pleura_lines),
                              "Heart and mediastinum: " + " ".join(heart_lines)]),
        "impression": " ".join(f"{i + 1}. {line}" for i, line in enumerate(impression)),
        "recommendation": fleischner(nodules),
    }
    text = (f"INDICATION: {sections['indication']}\nTECHNIQUE: {sections['technique']}\n"
            f"FINDINGS: {sections['findings']}\nIMPRESSION: {sections['impression']}")
    if sections["recommendation"]:
        text += f"\nRECOMMENDATION: {sections['recommendation']}"
    return {**sections, "text": text}
