"""Speech evaluation: word error rate and lexicon-term recall, with and without medical biasing.

WER is corpus-level (total word errors / total reference words) after `normalize_text`, so "6mm" and
"six millimeters" agree. Term recall counts each lexicon term occurrence in the references and how many of them the
transcripts contain (a term said twice must be heard twice).
"""

from __future__ import annotations

import time
from collections import defaultdict

import numpy as np

from pipelines.speech.dictation import Dictation
from pipelines.speech.engines import Transcriber
from pipelines.speech.lexicon import CLINICAL_LEXICON, Lexicon, count_terms, normalize_text


def word_errors(reference: str, hypothesis: str) -> tuple[int, int]:
    """(substitutions + deletions + insertions, reference word count) after normalisation."""
    ref, hyp = normalize_text(reference).split(), normalize_text(hypothesis).split()
    row = np.arange(len(hyp) + 1)  # Levenshtein over words, one row at a time
    for i, r in enumerate(ref, 1):
        prev, row = row, np.empty_like(row)
        row[0] = i
        for j, h in enumerate(hyp, 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (r != h))
    return int(row[-1]), len(ref)


def wer(references: list[str], hypotheses: list[str]) -> float:
    if len(references) != len(hypotheses):
        raise ValueError(f"wer: {len(references)} references but {len(hypotheses)} hypotheses")
    errors = [word_errors(r, h) for r, h in zip(references, hypotheses)]
    n_words = sum(n for _, n in errors)
    return sum(e for e, _ in errors) / n_words if n_words else 0.0


def term_recall(references: list[str], hypotheses: list[str], terms: tuple[str, ...]) -> tuple[float, dict]:
    """(recall over all term occurrences, {term: (heard, said)})."""
    per_term: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for ref, hyp in zip(references, hypotheses):
        said, heard = count_terms(ref, terms), count_terms(hyp, terms)
        for term, n in said.items():
            per_term[term][0] += min(n, heard.get(term, 0))
            per_term[term][1] += n
    total = sum(s for _, s in per_term.values())
    recall = sum(h for h, _ in per_term.values()) / total if total else float("nan")
    return recall, {t: tuple(v) for t, v in sorted(per_term.items())}


def evaluate_dictations(transcriber: Transcriber, dictations: list[Dictation], lexicon: Lexicon = CLINICAL_LEXICON,
                        language: str | None = "en", progress=None) -> dict:
    """Transcribe every dictation with and without biasing; flat metrics plus per-condition WER and term misses."""
    if not dictations:
        raise ValueError("evaluate_dictations: no dictations to evaluate")
    refs = [d.text for d in dictations]
    hyps: dict[str, list[str]] = {"biased": [], "unbiased": []}
    compute_s = 0.0
    t0 = time.perf_counter()
    for i, d in enumerate(dictations):
        for mode, lex in (("biased", lexicon), ("unbiased", None)):
            transcript = transcriber.transcribe(d.samples, language=language, lexicon=lex)
            hyps[mode].append(transcript.text)
            compute_s += transcript.transcribe_s
        if progress is not None:
            progress(i + 1, len(dictations))
    recall, per_term = term_recall(refs, hyps["biased"], lexicon.terms)
    recall_unbiased, per_term_unbiased = term_recall(refs, hyps["unbiased"], lexicon.terms)
    audio_s = sum(d.duration_s for d in dictations)
    by_condition: dict[str, list[int]] = defaultdict(list)
    for i, d in enumerate(dictations):
        by_condition[d.condition].append(i)
    metrics = {
        "wer": round(wer(refs, hyps["biased"]), 4),
        "wer_unbiased": round(wer(refs, hyps["unbiased"]), 4),
        "term_recall": round(recall, 4),
        "term_recall_unbiased": round(recall_unbiased, 4),
        "wer_clean": _subset_wer(refs, hyps["biased"], [i for i, d in enumerate(dictations) if d.snr_db is None]),
        "wer_noisy": _subset_wer(refs, hyps["biased"], [i for i, d in enumerate(dictations) if d.snr_db is not None]),
        **_split_metrics(refs, hyps, dictations, lexicon),
        "n_dictations": len(dictations),
        "n_notes": len(set(refs)),
        "audio_s": round(audio_s, 1),
        "rtf": round(compute_s / (2 * audio_s), 4),
        "wall_s": round(time.perf_counter() - t0, 1),
        "engine": transcriber.engine,
        "model": transcriber.model_id,
        "wer_by_condition": {c: _subset_wer(refs, hyps["biased"], idx) for c, idx in sorted(by_condition.items())},
        "missed_terms": {t: f"{h}/{s}" for t, (h, s) in per_term.items() if h < s},
        "missed_terms_unbiased": {t: f"{h}/{s}" for t, (h, s) in per_term_unbiased.items() if h < s},
    }
    return metrics


def _split_metrics(refs: list[str], hyps: dict[str, list[str]], dictations: list[Dictation], lexicon: Lexicon) -> dict:
    """WER and term recall, biased and unbiased, on the notes the biasing was tuned on and on the held-out notes."""
    out = {}
    for split, key in (("tuning", "tuning"), ("held-out", "held_out")):
        index = [i for i, d in enumerate(dictations) if d.split == split]
        if not index:
            continue
        split_refs = [refs[i] for i in index]
        for mode, suffix in (("biased", ""), ("unbiased", "_unbiased")):
            split_hyps = [hyps[mode][i] for i in index]
            out[f"wer_{key}{suffix}"] = round(wer(split_refs, split_hyps), 4)
            out[f"term_recall_{key}{suffix}"] = round(term_recall(split_refs, split_hyps, lexicon.terms)[0], 4)
        out[f"n_dictations_{key}"] = len(index)
    return out


def _subset_wer(refs: list[str], hyps: list[str], index: list[int]) -> float | None:
    return round(wer([refs[i] for i in index], [hyps[i] for i in index]), 4) if index else None
