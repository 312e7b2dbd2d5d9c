"""Rule-based finding labeller for chest CT report text, and grounding of a narrative in the measurements.

Labeller: sentence by sentence, finds mentions of the seven finding types, their side, lobe, sizes (mm) and volumes
(mL), and whether they are negated ("no pleural effusion", "nodule is not seen"), NegEx-style: a negation cue
before the term within its clause, or a negating phrase right after it.

Grounding (the check no report generator does by itself):
  - every measured finding must be mentioned in the narrative, else "measured_not_mentioned";
  - every finding the narrative asserts must be backed by a measurement, else "not_confirmed";
  - every size or volume in the narrative is compared with the measured value; a mismatch is flagged
    ("size_mismatch"), or with size_policy="replace" the number is rewritten and the change flagged
    ("size_corrected"), so no size mismatch ever goes unflagged;
  - with size_policy="replace", a nodule whose numbers match exactly one measured nodule but whose lobe is another
    gets the measured lobe ("location_corrected"): a writer copies numbers more reliably than anatomy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from pipelines.ct.report import FINDING_TYPES, SYSTEM_TITLES, SYSTEMS, CTReport, Flag, Measurement

GROUNDING_KINDS = ("measured_not_mentioned", "not_confirmed", "size_mismatch", "size_corrected", "location_corrected")
# Flags that describe the current text and are recomputed on every grounding; "size_corrected" and
# "location_corrected" record changes made to the text and are kept.
STATE_KINDS = ("measured_not_mentioned", "not_confirmed", "size_mismatch")

# Tolerances for a narrative number to agree with a measurement: mm sizes are written rounded to whole mm.
SIZE_TOL_MM, SIZE_TOL_REL = 1.0, 0.10
VOLUME_TOL_ML, VOLUME_TOL_REL = 5.0, 0.20
PERCENT_TOL_PP = 2.0
RATIO_TOL = 0.03
MATCH_SLACK = 0.35  # match-score margin within which two measurements count as equally good for one mention

_LOBE = r"(?:right|left)\s+(?:upper|middle|lower)\s+lobe|\b(?:RUL|RML|RLL|LUL|LLL)\b|lingula(?:r)?"
_LOBE_RE = re.compile(_LOBE, re.I)
_LOBE_CODE = {("right", "upper"): "RUL", ("right", "middle"): "RML", ("right", "lower"): "RLL",
              ("left", "upper"): "LUL", ("left", "lower"): "LLL"}
_SIDE_RE = re.compile(r"\b(right|left|bilateral|both)\b", re.I)
_NUMBER = r"(\d+(?:\.\d+)?)"
_SIZE_RE = re.compile(rf"{_NUMBER}(?:\s*(?:x|×|by)\s*{_NUMBER})?(?:\s*(?:x|×|by)\s*{_NUMBER})?\s*(mm|cm)\b", re.I)
_VOLUME_RE = re.compile(rf"{_NUMBER}\s*(?:ml|mL|cc)\b", re.I)
_PERCENT_RE = re.compile(rf"{_NUMBER}\s*%")
_RATIO_RE = re.compile(r"(?:cardiothoracic ratio|CTR)\s*(?:of|=|:)?\s*(0?\.\d+|1\.\d+)", re.I)
_ID_RE = re.compile(r"\b(M\d+)\b")  # measurement ids the template (and the model's prompt) cite
_COUNT_WORDS = {"two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
                "multiple": 0, "several": 0}
_COUNT_RE = re.compile(r"\b(\d+|two|three|four|five|six|seven|eight|nine|ten|multiple|several)\s+(?:\w+\s+){0,3}"
                       r"(?:nodules|nodule\(s\)|granulomas|effusions)(?!\w)", re.I)

# Finding terms; order matters only for overlaps (earlier patterns win).
TERMS: list[tuple[str, re.Pattern]] = [
    ("calcified_granuloma", re.compile(r"\bcalcified\s+(?:pulmonary\s+)?(?:granulomas?|nodules?)\b|"
                                       r"\bgranulomas?\b", re.I)),
    ("pericardial_effusion", re.compile(r"\bpericardial\s+(?:effusions?|fluid)\b|\bhaemopericardium\b|"
                                        r"\bhemopericardium\b", re.I)),
    ("pleural_effusion", re.compile(r"\bpleural\s+(?:(?:or|and)\s+pericardial\s+)?(?:effusions?|fluid)\b|"
                                    r"\bhydrothora(?:x|ces)\b|\b(?:left|right|bilateral)\s+effusions?\b", re.I)),
    ("emphysema", re.compile(r"\bemphysema(?:tous)?\b", re.I)),
    ("consolidation", re.compile(r"\bconsolidations?\b|\bconsolidative\b|\bairspace\s+(?:disease|opacit(?:y|ies))\b",
                                 re.I)),
    ("cardiomegaly", re.compile(r"\bcardiomegaly\b|\benlarged\s+(?:heart|cardiac\s+silhouette)\b|"
                                r"\bheart\s+is\s+(?:mildly\s+|moderately\s+|markedly\s+)?enlarged\b|"
                                r"\bcardiac\s+enlargement\b", re.I)),
    ("nodule", re.compile(r"\bnodules?(?:\(s\))?(?!\w)|\bmass(?:es)?\b|\bnodular\s+opacit(?:y|ies)\b", re.I)),
]
# Pre-negation cues: the term is negated when one of these precedes it in the same clause.
_PRE_NEG = re.compile(r"\b(?:no|without|negative\s+for|free\s+of|absence\s+of|no\s+evidence\s+of|"
                      r"rather\s+than|resolution\s+of|not)\b", re.I)
# Post-negation phrases right after the term.
_POST_NEG = re.compile(r"^[^.;]{0,25}?\b(?:is|are|was|were|has|have)\s+(?:not\s+(?:seen|identified|present|"
                       r"demonstrated|visuali[sz]ed)|absent|resolved)\b", re.I)
# Clause breaks stop a negation cue from reaching a later term ("No effusion, but a nodule ...").
_CLAUSE_BREAK = re.compile(r"\b(?:but|however|although|though|except|apart\s+from|aside\s+from|which|with)\b|[;:]",
                           re.I)


@dataclass
class Mention:
    type: str
    negated: bool
    section: str  # a SYSTEMS name, "impression" or "text"
    start: int  # character span of the term in the section text
    end: int
    sentence: str
    side: str | None = None
    lobe: str | None = None
    lobe_span: tuple[int, int] | None = None  # where the lobe is named, in the section text
    sizes_mm: list[tuple[float, int, int]] = field(default_factory=list)  # (value mm, start, end in section text)
    volumes_ml: list[tuple[float, int, int]] = field(default_factory=list)
    percents: list[tuple[float, int, int]] = field(default_factory=list)
    ratios: list[tuple[float, int, int]] = field(default_factory=list)
    count: int = 1  # "3 additional nodules" covers three measurements
    ids: list[str] = field(default_factory=list)  # measurement ids cited next to the term, e.g. "(M3)"

    def describe(self) -> str:
        where = f"{self.side} " if self.side and self.type != "nodule" else ""
        lobe = f" in the {_LOBE_NAME[self.lobe]}" if self.lobe else ""
        return f"{where}{self.type.replace('_', ' ')}{lobe}"


_LOBE_NAME = {"RUL": "right upper lobe", "RML": "right middle lobe", "RLL": "right lower lobe",
              "LUL": "left upper lobe", "LLL": "left lower lobe"}


def _sentences(text: str) -> list[tuple[int, int]]:
    """Character spans of sentences; decimals ("0.55", "2.5 mm") and numbered list markers do not end a sentence."""
    spans, start = [], 0
    for m in re.finditer(r"(?<!\d)[.!?](?=\s|$)|(?<=\d)\.(?=\s+[A-Z(])|\n+", text):
        end = m.end()
        if text[start:end].strip():
            spans.append((start, end))
        start = end
    if text[start:].strip():
        spans.append((start, len(text)))
    return spans


def _lobe_code(match: str) -> str:
    s = match.lower()
    if s.startswith("lingula"):
        return "LUL"
    if len(s) == 3:
        return s.upper()
    words = s.split()
    return _LOBE_CODE.get((words[0], words[1]), "")


def _nearest(items: list[tuple], pos: int):
    return min(items, key=lambda it: abs(it[1] - pos)) if items else None


def label_text(text: str, section: str = "text") -> list[Mention]:
    """All finding mentions in `text` with side, lobe, sizes, volumes and negation."""
    out: list[Mention] = []
    for s0, s1 in _sentences(text):
        sentence = text[s0:s1]
        taken: list[tuple[int, int]] = []
        hits = []
        for kind, pattern in TERMS:
            for m in pattern.finditer(sentence):
                if any(a < m.end() and m.start() < b for a, b in taken):
                    continue
                taken.append((m.start(), m.end()))
                hits.append((m.start(), m.end(), kind, m.group(0)))
        if not hits:
            continue
        hits.sort()
        lobes = [(_lobe_code(m.group(0)), m.start(), m.end()) for m in _LOBE_RE.finditer(sentence)]
        lobe_spans = [(m.start(), m.end()) for m in _LOBE_RE.finditer(sentence)]
        sides = [(m.group(1).lower(), m.start()) for m in _SIDE_RE.finditer(sentence)
                 if not any(a <= m.start() < b for a, b in lobe_spans)]
        sizes = []
        for m in _SIZE_RE.finditer(sentence):
            scale = 10.0 if m.group(4).lower() == "cm" else 1.0
            for g in (1, 2, 3):
                if m.group(g):
                    sizes.append((float(m.group(g)) * scale, m.start(g), m.end(g)))
        volumes = [(float(m.group(1)), m.start(1), m.end(1)) for m in _VOLUME_RE.finditer(sentence)]
        percents = [(float(m.group(1)), m.start(1), m.end(1)) for m in _PERCENT_RE.finditer(sentence)]
        ratios = [(float(m.group(1)), m.start(1), m.end(1)) for m in _RATIO_RE.finditer(sentence)]
        counts = [(m.group(1).lower(), m.start()) for m in _COUNT_RE.finditer(sentence)]
        cited = [(m.group(1), m.start()) for m in _ID_RE.finditer(sentence)]
        kept: list[Mention] = []
        for idx, (a, b, kind, term) in enumerate(hits):
            negated = _negated(sentence, a, b)
            # Numbers belong to the nearest term of a type that carries them (a size next to an effusion is not its).
            def mine(items, carriers, hit=hits[idx]):
                if kind not in carriers:
                    return []
                holders = [h for h in hits if h[2] in carriers]
                return [it for it in items if min(holders, key=lambda h: _distance(h, it[1])) is hit]

            mention = Mention(type=kind, negated=negated, section=section, start=s0 + a, end=s0 + b,
                              sentence=sentence.strip())
            near_lobe = _nearest([lb for lb in lobes if _owner(hits, sentence, lb[1]) == idx], a)
            if near_lobe and kind in ("nodule", "calcified_granuloma", "consolidation"):
                mention.lobe = near_lobe[0] or None
                mention.lobe_span = (s0 + near_lobe[1], s0 + near_lobe[2])
            near_side = _nearest([sd for sd in sides if _owner(hits, sentence, sd[1]) == idx], a)
            if mention.lobe:
                mention.side = "right" if mention.lobe.startswith("R") else "left"
            elif near_side:
                mention.side = "bilateral" if near_side[0] in ("bilateral", "both") else near_side[0]
            plural = re.search(r"effusions\b", term, re.I)
            if kind == "pleural_effusion" and plural and mention.side in (None, "bilateral"):
                mention.side, mention.count = "bilateral", 2
            mention.sizes_mm = [(v, s0 + p, s0 + q) for v, p, q in mine(sizes, ("nodule", "calcified_granuloma"))]
            mention.volumes_ml = [(v, s0 + p, s0 + q) for v, p, q in
                                  mine(volumes, ("pleural_effusion", "pericardial_effusion", "consolidation"))]
            mention.percents = [(v, s0 + p, s0 + q) for v, p, q in mine(percents, ("emphysema",))]
            mention.ratios = [(v, s0 + p, s0 + q) for v, p, q in mine(ratios, ("cardiomegaly",))]
            count = _nearest([c for c in counts if _owner(hits, sentence, c[1]) == idx], a)
            if count and re.search(r"s\)?$", term) and kind in ("nodule", "calcified_granuloma"):
                mention.count = _COUNT_WORDS.get(count[0], None) if not count[0].isdigit() else int(count[0])
                mention.count = mention.count if mention.count else 99  # "multiple nodules": any number
            mention.ids = [c for c, pos in cited if _owner(hits, sentence, pos) == idx]
            if kind == "nodule":  # several nodules in one sentence are several findings
                kept.append(mention)
            else:
                _merge_into(kept, mention)
        out.extend(kept)
    return out


def _merge_into(kept: list[Mention], mention: Mention) -> None:
    """Two terms for one finding in a sentence ("calcified nodule ... consistent with a granuloma") are one mention;
    the same finding on two sides ("right and left pleural effusion") stays two."""
    for other in kept:
        if other.type != mention.type:
            continue
        if (mention.side and other.side and mention.side != other.side) or \
                (mention.lobe and other.lobe and mention.lobe != other.lobe):
            continue
        other.negated = other.negated and mention.negated  # a positive statement wins
        if not other.lobe:
            other.lobe, other.lobe_span = mention.lobe, mention.lobe_span
        other.side = other.side or mention.side
        for name in ("sizes_mm", "volumes_ml", "percents", "ratios", "ids"):
            getattr(other, name).extend(getattr(mention, name))
        other.count = max(other.count, mention.count)
        return
    kept.append(mention)


def _distance(hit, pos: int) -> int:
    a, b = hit[0], hit[1]
    return 0 if a <= pos < b else min(abs(pos - a), abs(pos - b))


def _owner(hits: list[tuple], sentence: str, pos: int) -> int:
    """Index of the term a modifier at `pos` describes: the next term when it follows within a few words in the same
    clause ("small right pleural effusion"), else the term before it ("nodule in the right upper lobe")."""
    after = [i for i, h in enumerate(hits) if h[0] >= pos]
    if after:
        gap = sentence[pos:hits[after[0]][0]]
        if len(gap.split()) <= 5 and not re.search(r"[,;:()]", gap):
            return after[0]
    before = [i for i, h in enumerate(hits) if h[0] < pos]
    return before[-1] if before else after[0]


def _negated(sentence: str, a: int, b: int) -> bool:
    head = sentence[:a]
    cue = None
    for m in _PRE_NEG.finditer(head):
        cue = m
    if cue is not None and not _CLAUSE_BREAK.search(head[cue.end():]):
        between = head[cue.end():]
        # "not" only negates when it directly governs ("not enlarged"), not in "not only"; "no" reaches across a list
        if cue.group(0).lower() != "not" or len(between.split()) <= 2:
            return True
    return bool(_POST_NEG.search(sentence[b:]))


def label_report(report: CTReport) -> list[Mention]:
    mentions = []
    for system in SYSTEMS:
        mentions += label_text(getattr(report.findings, system), system)
    mentions += label_text(report.impression, "impression")
    return mentions


def finding_labels(text: str) -> dict[str, bool]:
    """Per finding type: is it asserted (positively mentioned) in `text`? For precision / recall against a reference."""
    positive = {m.type for m in label_text(text) if not m.negated}
    return {t: t in positive for t in FINDING_TYPES}


# ------------------------------------------------------------------------------------------------------- grounding

@dataclass
class Grounding:
    flags: list[Flag]
    mentions: list[Mention]
    matches: dict[str, list[Mention]]  # measurement id -> mentions of it
    corrections: int = 0


def _compatible(m: Measurement, x: Mention) -> float | None:
    """Match score (higher = better) of a measurement and a positive mention, or None when they cannot match."""
    if x.type != m.kind:
        return None
    if x.ids and m.id not in x.ids:
        return None  # the text cites another measurement
    score = 10.0 if m.id in x.ids else 1.0
    if x.lobe and m.lobe:
        if x.lobe != m.lobe:
            return None
        score += 2.0
    if x.side and m.side and x.side != "bilateral" and m.side != "bilateral":
        if x.side != m.side:
            return None
        score += 1.0
    if x.sizes_mm and m.diameter_mm:  # mean distance (mm) of the numbers said to the nearest measured dimension
        dims = [v for v in (m.diameter_mm, m.long_axis_mm, m.short_axis_mm) if v is not None]
        gap = sum(min(abs(v - d) for d in dims) for v, _, _ in x.sizes_mm) / len(x.sizes_mm)
        score += 1.0 / (1.0 + gap)
    if x.volumes_ml and m.volume_ml:
        score += 1.0 / (1.0 + min(abs(v - m.volume_ml) for v, _, _ in x.volumes_ml) / max(m.volume_ml, 1.0))
    if _sizes_agree(m, x):  # every number said fits this measurement ("9 x 6 mm" for 9 x 5, not for 7 x 4)
        score += 1.0
    return score


def _number_checks(m: Measurement, x: Mention):
    """(value said, span, measured reference values, unit, tolerance) for every number in the mention."""
    if m.kind in ("nodule", "calcified_granuloma"):
        refs = [v for v in (m.diameter_mm, m.long_axis_mm, m.short_axis_mm) if v is not None]
        for v, a, b in x.sizes_mm:
            yield v, a, b, refs, "mm", lambda said, ref: abs(said - ref) <= max(SIZE_TOL_MM, SIZE_TOL_REL * ref)
    if m.volume_ml is not None:
        for v, a, b in x.volumes_ml:
            yield v, a, b, [m.volume_ml], "mL", lambda s, r: abs(s - r) <= max(VOLUME_TOL_ML, VOLUME_TOL_REL * r)
    if m.laa950_percent is not None:
        for v, a, b in x.percents:
            yield v, a, b, [m.laa950_percent], "%", lambda s, r: abs(s - r) <= PERCENT_TOL_PP
    if m.cardiothoracic_ratio is not None:
        for v, a, b in x.ratios:
            yield v, a, b, [m.cardiothoracic_ratio], "", lambda s, r: abs(s - r) <= RATIO_TOL


def _format_like(said_text: str, value: float, unit_cm: bool) -> str:
    if unit_cm:
        value = value / 10.0
    decimals = len(said_text.split(".")[1]) if "." in said_text else 0
    return f"{value:.{decimals}f}"


def ground(report: CTReport, size_policy: str = "check") -> Grounding:
    """Compare narrative and measurements; with size_policy='replace' wrong numbers are rewritten in the report."""
    if size_policy not in ("check", "replace"):
        raise ValueError(f"size_policy: expected 'check' or 'replace', found {size_policy!r}")
    relocated = _relocate(report) if size_policy == "replace" else []
    mentions = label_report(report)
    positive = [x for x in mentions if not x.negated]
    capacity = {id(x): x.count for x in positive}
    matches: dict[str, list[Mention]] = {m.id: [] for m in report.measurements}
    # Greedy assignment, best pairs first; a mention covers up to `count` measurements.
    pairs = sorted(((s, i, j) for i, m in enumerate(report.measurements) for j, x in enumerate(positive)
                    if (s := _compatible(m, x)) is not None), key=lambda t: (-t[0], t[1], t[2]))
    # A single mention may only take a measurement about as good as the best one it could describe, so a
    # restatement in the Impression does not steal a different, still unmatched nodule.
    best: dict[int, float] = {}
    for score, _, j in pairs:
        best[j] = max(best.get(j, score), score)
    assigned: set[str] = set()
    used: set[int] = set()
    for score, i, j in pairs:
        m, x = report.measurements[i], positive[j]
        if m.id in assigned or capacity[id(x)] <= 0:
            continue
        if x.count == 1 and score < best[j] - MATCH_SLACK:
            continue
        assigned.add(m.id)
        used.add(id(x))
        capacity[id(x)] -= 1
        matches[m.id].append(x)
    # Repeats (the Impression restating a finding) confirm an already-matched measurement.
    for _, i, j in pairs:
        m, x = report.measurements[i], positive[j]
        if id(x) not in used:
            used.add(id(x))
            matches[m.id].append(x)

    flags: list[Flag] = list(relocated)
    for m in report.measurements:
        if not matches[m.id]:
            flags.append(Flag(kind="measured_not_mentioned", measurement_id=m.id,
                              message=f"Measured but not mentioned: {m.label()} does not appear in the narrative."))
    for x in positive:
        if id(x) not in used:
            flags.append(Flag(kind="not_confirmed",
                              message=f"Not confirmed by measurement: the narrative reports a {x.describe()} "
                                      f"(\"{x.sentence}\") but no measurement supports it."))

    # Size checks, collected first so replacements can run from the end of each section backwards.
    edits: dict[str, list[tuple[int, int, str]]] = {}
    corrections = 0
    for m in report.measurements:
        for x in matches[m.id]:
            if x.count != 1:  # a count summary ("4 additional nodules up to 6 mm") is not one measurement's size
                continue
            section_text = _section_text(report, x.section)
            for said, a, b, refs, unit, agrees in _number_checks(m, x):
                if any(agrees(said, r) for r in refs):
                    continue
                measured = refs[0]
                where = "Impression" if x.section == "impression" else SYSTEM_TITLES.get(x.section, x.section)
                shown = f"{measured:.0f} {unit}" if unit in ("mm", "mL") else (
                    f"{measured:.0f}{unit}" if unit == "%" else f"{measured:.2f}")
                if size_policy == "replace":
                    unit_cm = unit == "mm" and re.match(r"\s*(?:x|×|by|\d|\.|\s)*\s*cm", section_text[b:],
                                                        re.I) is not None
                    edits.setdefault(x.section, []).append((a, b, _format_like(section_text[a:b], measured, unit_cm)))
                    corrections += 1
                    flags.append(Flag(kind="size_corrected", measurement_id=m.id,
                                      message=f"Size corrected: {where} said {said:g} {unit} for {m.label()}; "
                                              f"replaced with the measured {shown}."))
                else:
                    flags.append(Flag(kind="size_mismatch", measurement_id=m.id,
                                      message=f"Size mismatch: {where} says {said:g} {unit} for {m.label()}; "
                                              f"measured {shown}."))
    _apply_edits(report, edits)
    return Grounding(flags=flags, mentions=mentions, matches=matches, corrections=corrections)


def _sizes_agree(m: Measurement, x: Mention) -> bool:
    checks = list(_number_checks(m, x))
    return bool(checks) and all(any(agrees(said, r) for r in refs) for said, _, _, refs, _, agrees in checks)


def _relocate(report: CTReport) -> list[Flag]:
    """Rewrite the lobe of nodule mentions that match a measured nodule by their numbers alone: no mention in the
    measurement's own lobe gives its numbers, the mention's sizes all agree with it and with no measurement in the
    lobe it names, it is the only such measurement, and a nodule measured in the lobe it names keeps another mention
    there. One "location_corrected" flag per rewrite."""
    positive = [x for x in label_report(report) if not x.negated and x.count == 1 and x.lobe and x.lobe_span
                and x.type in ("nodule", "calcified_granuloma")]
    kinds = ("nodule", "calcified_granuloma")
    edits: dict[str, list[tuple[int, int, str]]] = {}
    flags = []
    for x in positive:
        if any(m.kind == x.type and m.lobe == x.lobe and _sizes_agree(m, x) for m in report.measurements):
            continue  # the lobe it names holds a measurement of that size
        fits = [m for m in report.measurements if m.kind in kinds and m.kind == x.type and m.lobe and
                m.lobe != x.lobe and (not x.ids or m.id in x.ids) and _sizes_agree(m, x) and
                not any(y.lobe == m.lobe and _compatible(m, y) is not None and _sizes_agree(m, y)
                        for y in positive)]
        if len(fits) != 1:
            continue
        m = fits[0]
        if any(n.kind == x.type and n.lobe == x.lobe for n in report.measurements) and not any(
                y is not x and y.type == x.type and y.lobe == x.lobe and not _sizes_agree(m, y) for y in positive):
            continue  # moving it (and its restatements) would leave the nodule measured in its lobe unmentioned
        a, b = x.lobe_span
        said = _section_text(report, x.section)[a:b]
        new = m.lobe if said.isupper() else _LOBE_NAME[m.lobe]
        if said[:1].isupper() and not said.isupper():
            new = new[0].upper() + new[1:]
        edits.setdefault(x.section, []).append((a, b, new))
        where = "Impression" if x.section == "impression" else SYSTEM_TITLES.get(x.section, x.section)
        flags.append(Flag(kind="location_corrected", measurement_id=m.id,
                          message=f"Location corrected: {where} placed {m.label()} in the {_LOBE_NAME[x.lobe]}; "
                                  f"replaced with the measured {_LOBE_NAME[m.lobe]}."))
    _apply_edits(report, edits)
    return flags


def _apply_edits(report: CTReport, edits: dict[str, list[tuple[int, int, str]]]) -> None:
    """Replace (start, end) spans of each section's text, last first so earlier offsets stay valid."""
    for section, changes in edits.items():
        text = _section_text(report, section)
        for a, b, new in sorted(set(changes), reverse=True):
            text = text[:a] + new + text[b:]
        _set_section_text(report, section, text)


def _section_text(report: CTReport, section: str) -> str:
    return report.impression if section == "impression" else getattr(report.findings, section)


def _set_section_text(report: CTReport, section: str, text: str) -> None:
    if section == "impression":
        report.impression = text
    else:
        setattr(report.findings, section, text)


def apply_grounding(report: CTReport, size_policy: str = "check") -> Grounding:
    """Ground the report and replace its previous grounding state flags with the new ones; warnings and the record
    of earlier size corrections are kept."""
    result = ground(report, size_policy)
    report.flags = [f for f in report.flags if f.kind not in STATE_KINDS] + result.flags
    return result
