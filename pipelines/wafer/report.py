"""Lot report: yield per wafer, class histogram, stacked fail-density map, excursions, gallery of flagged wafers.

Input: the lot's scores (one `LotWafer` per wafer, from the store) and, where the source files are still readable,
the maps themselves (`maps.read_source`); a wafer whose map is gone is listed without yield or picture.
Exports: `<lot>.csv` (one row per wafer), `<lot>.json` (summary + rows), `<lot>.pdf` (reportlab), plus the two
pictures as PNG (`<lot>-density.png`, `<lot>-gallery.png`). Every file is written to a temporary name, then renamed.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from pipelines.wafer.dataset import fractions
from pipelines.wafer.maps import CLASSES, WaferMap, _atomic_write, render_rgb

DENSITY_SIZE = 64  # stacked fail-density map side (cells)
GALLERY_MAX = 24  # flagged wafers shown in the gallery


@dataclass
class LotWafer:
    wafer_id: str
    source: str
    status: str
    slot: int | None = None
    error: str | None = None
    predicted_class: str | None = None
    class_probs: dict[str, float] = field(default_factory=dict)
    defect_score: float | None = None
    anomaly_score: float | None = None
    model_id: str | None = None
    yield_pct: float | None = None  # filled from the map when it can be read
    flags: list[str] = field(default_factory=list)  # "defect", "anomaly"


@dataclass
class LotReport:
    lot_id: str
    product: str
    thresholds: dict[str, float]
    wafers: list[LotWafer]
    density: np.ndarray | None  # (DENSITY_SIZE, DENSITY_SIZE) mean fail fraction, or None without maps
    maps_read: int
    gallery: list[tuple[LotWafer, np.ndarray]]  # flagged wafers with their grids

    def summary(self) -> dict:
        ok = [w for w in self.wafers if w.status == "ok"]
        yields = [w.yield_pct for w in self.wafers if w.yield_pct is not None]
        histogram = {c: sum(w.predicted_class == c for w in ok) for c in CLASSES}
        other = sum(w.predicted_class not in CLASSES for w in ok)
        if other:
            histogram["other"] = other
        return {
            "lot_id": self.lot_id, "product": self.product, "wafers": len(self.wafers), "scored": len(ok),
            "errors": len(self.wafers) - len(ok), "maps_read": self.maps_read,
            "mean_yield_pct": round(float(np.mean(yields)), 3) if yields else None,
            "min_yield_pct": round(float(np.min(yields)), 3) if yields else None,
            "max_yield_pct": round(float(np.max(yields)), 3) if yields else None,
            "class_histogram": histogram, "thresholds": self.thresholds,
            "excursions": [{"wafer_id": w.wafer_id, "source": w.source, "slot": w.slot, "flags": w.flags,
                            "predicted_class": w.predicted_class, "defect_score": w.defect_score,
                            "anomaly_score": w.anomaly_score, "yield_pct": w.yield_pct} for w in self.excursions],
            "model_ids": sorted({w.model_id for w in self.wafers if w.model_id}),
        }

    @property
    def excursions(self) -> list[LotWafer]:
        return [w for w in self.wafers if w.flags]


def build_report(lot_id: str, product: str, wafers: Sequence[LotWafer], maps: dict[tuple[str, str], WaferMap],
                 defect_threshold: float, anomaly_threshold: float) -> LotReport:
    """Flags, yields, the stacked fail density and the gallery; `maps` is keyed by (source, wafer_id)."""
    wafers = sorted(wafers, key=lambda w: (w.slot if w.slot is not None else 10 ** 9, w.wafer_id, w.source))
    density, n_maps, gallery = np.zeros((DENSITY_SIZE, DENSITY_SIZE)), 0, []
    for w in wafers:
        w.flags = []
        if w.status == "ok":
            if w.defect_score is not None and w.defect_score >= defect_threshold:
                w.flags.append("defect")
            if w.anomaly_score is not None and w.anomaly_score >= anomaly_threshold:
                w.flags.append("anomaly")
        m = maps.get((w.source, w.wafer_id))
        if m is None:
            continue
        w.yield_pct = round(m.yield_pct, 3)
        density += fractions(m.grid, DENSITY_SIZE)[2]
        n_maps += 1
        if w.flags and len(gallery) < GALLERY_MAX:
            gallery.append((w, m.grid))
    return LotReport(lot_id, product, {"defect": defect_threshold, "anomaly": anomaly_threshold}, list(wafers),
                     density / n_maps if n_maps else None, n_maps, gallery)


# ------------------------------------------------------------------------------------------------------ pictures

# A perceptually ordered dark-blue -> yellow ramp (anchor colours of matplotlib's viridis), for fail density 0..1.
_RAMP = np.array([(68, 1, 84), (59, 82, 139), (33, 145, 140), (94, 201, 98), (253, 231, 37)], dtype=float)


def density_rgb(density: np.ndarray, scale: int = 6) -> np.ndarray:
    """(S*scale, S*scale, 3) uint8 heat map, normalised to the lot's densest cell."""
    top = float(density.max()) or 1.0
    t = np.clip(density / top, 0, 1) * (len(_RAMP) - 1)
    lo = np.floor(t).astype(int).clip(0, len(_RAMP) - 2)
    frac = (t - lo)[..., None]
    rgb = (_RAMP[lo] * (1 - frac) + _RAMP[lo + 1] * frac).astype(np.uint8)
    return np.repeat(np.repeat(rgb, scale, 0), scale, 1)


def gallery_rgb(gallery: list[tuple[LotWafer, np.ndarray]], tile: int = 128, columns: int = 6) -> np.ndarray:
    """Flagged wafers side by side, each resized to a `tile` square (nearest) with a thin border."""
    from PIL import Image

    rows = max(1, -(-len(gallery) // columns))
    sheet = np.full((rows * (tile + 8), columns * (tile + 8), 3), 255, np.uint8)
    for k, (_, grid) in enumerate(gallery):
        img = Image.fromarray(render_rgb(grid)).resize((tile, tile), Image.NEAREST)
        r, c = divmod(k, columns)
        sheet[r * (tile + 8) + 4:r * (tile + 8) + 4 + tile, c * (tile + 8) + 4:c * (tile + 8) + 4 + tile] = \
            np.asarray(img)
    return sheet


def _png_bytes(rgb: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


# ------------------------------------------------------------------------------------------------------- exports

CSV_COLUMNS = ("wafer_id", "source", "slot", "status", "error", "yield_pct", "predicted_class", "defect_score",
               "anomaly_score", "flags", "model_id")


def write_csv(report: LotReport, path: Path) -> Path:
    buf = io.StringIO()
    out = csv.writer(buf)
    out.writerow([*CSV_COLUMNS, *[f"p_{c}" for c in CLASSES]])
    for w in report.wafers:
        row = asdict(w)
        row["flags"] = "+".join(w.flags)
        out.writerow([("" if row[k] is None else row[k]) for k in CSV_COLUMNS] +
                     ["" if w.class_probs.get(c) is None else w.class_probs[c] for c in CLASSES])
    return _atomic_write(path, lambda f: f.write(buf.getvalue().encode()))


def write_json(report: LotReport, path: Path) -> Path:
    doc = {"summary": report.summary(), "wafers": [asdict(w) for w in report.wafers]}
    return _atomic_write(path, lambda f: f.write(json.dumps(doc, indent=2).encode()))


def write_pdf(report: LotReport, path: Path) -> Path:
    from reportlab.lib import colors
    from reportlab.lib.pagesizes import A4
    from reportlab.lib.styles import getSampleStyleSheet
    from reportlab.lib.units import mm
    from reportlab.graphics.charts.barcharts import HorizontalBarChart
    from reportlab.graphics.shapes import Drawing
    from reportlab.platypus import Image, PageBreak, Paragraph, SimpleDocTemplate, Spacer, Table, TableStyle

    styles = getSampleStyleSheet()
    s = report.summary()
    story = [Paragraph(f"Wafer lot report: {s['lot_id']}", styles["Title"]),
             Paragraph(f"Product {s['product'] or '-'}; model {', '.join(s['model_ids']) or '-'}; thresholds: defect "
                       f"{s['thresholds']['defect']}, anomaly {s['thresholds']['anomaly']}", styles["Normal"]),
             Spacer(1, 4 * mm)]
    yields = "-" if s["mean_yield_pct"] is None else \
        f"{s['mean_yield_pct']:.1f}% (min {s['min_yield_pct']:.1f}, max {s['max_yield_pct']:.1f})"
    facts = [["wafers", s["wafers"]], ["scored", s["scored"]], ["errors", s["errors"]],
             ["maps read for yield / density", s["maps_read"]], ["mean yield", yields],
             ["excursions", len(s["excursions"])]]
    story.append(_table(facts, colors, TableStyle, Table, header=False))
    story.append(Spacer(1, 4 * mm))

    story.append(Paragraph("Class histogram", styles["Heading2"]))
    names = list(s["class_histogram"])
    chart = Drawing(170 * mm, 8 * mm * len(names) + 10 * mm)
    bars = HorizontalBarChart()
    bars.x, bars.y, bars.width, bars.height = 25 * mm, 5 * mm, 135 * mm, 8 * mm * len(names)
    bars.data = [[s["class_histogram"][n] for n in reversed(names)]]
    bars.categoryAxis.categoryNames = list(reversed(names))
    bars.valueAxis.valueMin = 0
    bars.bars[0].fillColor = colors.HexColor("#2e75b6")
    bars.barLabelFormat = "%d"
    bars.barLabels.nudge = 7
    chart.add(bars)
    story.append(chart)

    if report.density is not None:
        story.append(Paragraph(f"Stacked fail density ({report.maps_read} wafers; yellow = the lot's densest area, "
                               f"peak {report.density.max():.2f} of dies failing)", styles["Heading2"]))
        story.append(Image(io.BytesIO(_png_bytes(density_rgb(report.density))), width=70 * mm, height=70 * mm))

    story.append(Paragraph("Wafers", styles["Heading2"]))
    rows = [["slot", "wafer", "status", "yield %", "class", "defect", "anomaly", "flags"]]
    for w in report.wafers:
        rows.append([w.slot if w.slot is not None else "", w.wafer_id[:28], w.status,
                     "" if w.yield_pct is None else f"{w.yield_pct:.1f}", w.predicted_class or (w.error or "")[:30],
                     _fmt(w.defect_score), _fmt(w.anomaly_score), "+".join(w.flags)])
    story.append(_table(rows, colors, TableStyle, Table, header=True,
                        highlight=[i + 1 for i, w in enumerate(report.wafers) if w.flags]))

    if report.gallery:
        story.append(PageBreak())
        story.append(Paragraph(f"Flagged wafers (first {len(report.gallery)})", styles["Heading2"]))
        cells = [Table([[Image(io.BytesIO(_png_bytes(gallery_rgb([(w, g)], tile=96, columns=1))), width=36 * mm,
                               height=36 * mm)],
                        [Paragraph(f"<b>{w.wafer_id}</b><br/>{w.predicted_class}; defect {_fmt(w.defect_score)}, "
                                   f"anomaly {_fmt(w.anomaly_score)}", styles["Normal"])]], colWidths=[42 * mm])
                 for w, g in report.gallery]
        per_row = 4
        grid = [cells[i:i + per_row] + [""] * (per_row - len(cells[i:i + per_row]))
                for i in range(0, len(cells), per_row)]
        story.append(Table(grid, colWidths=[44 * mm] * per_row, hAlign="LEFT"))

    buf = io.BytesIO()
    SimpleDocTemplate(buf, pagesize=A4, title=f"Wafer lot {s['lot_id']}", leftMargin=15 * mm, rightMargin=15 * mm,
                      topMargin=15 * mm, bottomMargin=15 * mm).build(story)
    return _atomic_write(path, lambda f: f.write(buf.getvalue()))


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3f}"


def _table(rows, colors, TableStyle, Table, header: bool, highlight: Sequence[int] = ()):
    t = Table(rows, hAlign="LEFT", repeatRows=1 if header else 0)
    style = [("FONTSIZE", (0, 0), (-1, -1), 8), ("GRID", (0, 0), (-1, -1), 0.25, colors.grey),
             ("VALIGN", (0, 0), (-1, -1), "MIDDLE")]
    if header:
        style += [("BACKGROUND", (0, 0), (-1, 0), colors.HexColor("#dde6f0")), ("FONTNAME", (0, 0), (-1, 0),
                                                                                 "Helvetica-Bold")]
    style += [("BACKGROUND", (0, r), (-1, r), colors.HexColor("#fde2e1")) for r in highlight]
    t.setStyle(TableStyle(style))
    return t


def export(report: LotReport, out_dir: str | Path) -> dict[str, Path]:
    """Write CSV, JSON, PDF and the two PNG pictures into `out_dir`; returns {kind: path}."""
    out = Path(out_dir)
    stem = "".join(ch if ch.isalnum() or ch in "._-" else "_" for ch in report.lot_id)
    files = {"csv": write_csv(report, out / f"{stem}.csv"), "json": write_json(report, out / f"{stem}.json"),
             "pdf": write_pdf(report, out / f"{stem}.pdf")}
    if report.density is not None:
        rgb = density_rgb(report.density)
        files["density_png"] = _atomic_write(out / f"{stem}-density.png", lambda f: f.write(_png_bytes(rgb)))
    if report.gallery:
        rgb = gallery_rgb(report.gallery)
        files["gallery_png"] = _atomic_write(out / f"{stem}-gallery.png", lambda f: f.write(_png_bytes(rgb)))
    return files

