"""Lexicon-aware post-correction: put back lexicon terms that Whisper heard almost right.

Whisper base often hears a medical term nearly right but writes it wrong: split ("a telectasis", "bronchi ectasis"),
misspelt ("atlectasis") or with one word of a phrase swapped for a like-sounding everyday one ("plural effusion").
Each run of one to a few transcript words is compared with every lexicon term, both as letters and as sounds
(`sound_key`), and replaced by the term only when it is close on both. The rules are conservative on purpose, so
that the step never invents a term:

- a single-word term must be long (`MIN_FUZZY_LETTERS`); shorter terms are only restored when the letters match
  exactly once spaces and hyphens are dropped ("ground glass" and "groundglass" stay "ground-glass");
- the run and the term must start with the same sound ("module" never becomes "nodule");
- a run that differs from the term only in an inflection ("metastasis" / "metastases", "nodules" / "nodule",
  "consolidated" / "consolidation"), or whose last word does ("plural effusions"), is another form and is left
  as it is;
- a run that already holds a lexicon word the term does not contain ("mediastinal" vs "mediastinum") is left as it is,
  unless its letters are exactly the term's ("bronchi ectasis");
- runs never cross punctuation, so a sentence boundary is never joined.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# Both similarities are 1 - edit distance / longer length, so 0.84 allows one edit in 7-12 letters, two in 13-18.
MIN_SIMILARITY = 0.84
MIN_FUZZY_LETTERS = 8  # shorter single-word terms sit too close to everyday words to correct by similarity
MAX_EXTRA_WORDS = 2  # a term may be heard split into up to this many more words than it has

# Endings that turn one form of a word into another; two spellings differing only here are the same word.
INFLECTIONS = frozenset({"", "s", "es", "is", "ed", "d", "ing", "ion", "ions", "al", "ar", "ic", "ous", "um", "a",
                         "ae", "i", "us", "y", "ies", "e", "ate", "ated", "ation", "er", "ers", "ly"})

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")


@dataclass(frozen=True)
class Correction:
    heard: str  # the transcript's words, as written
    term: str  # the lexicon term put in their place
    similarity: float  # the lower of the letter and sound similarities, 0-1


def correct_terms(text: str, terms: tuple[str, ...]) -> tuple[str, list[Correction]]:
    """(text with near-miss lexicon terms restored, the corrections made, in text order)."""
    words = [(m.start(), m.end(), m.group()) for m in _WORD.finditer(text)]
    targets = [(term, _letters(term), sound_key(term), len(term.split())) for term in terms]
    last_word = {term: _letters(term.split()[-1]) for term in terms}
    lexicon_words = {_letters(w) for term in terms for w in re.split(r"[\s-]+", term)}
    candidates = []  # (similarity, span length, first word, last word + 1, term)
    for i in range(len(words)):
        for term, letters, sound, n_words in targets:
            for n in range(max(1, n_words - 1), n_words + MAX_EXTRA_WORDS + 1):
                span = words[i: i + n]
                if len(span) < n or not _joinable(text, span):
                    continue
                heard = "".join(w for _, _, w in span).lower()
                score = _match(heard, letters, sound, n_words)
                if score is None or (score < 1.0 and not _allowed(span, term, lexicon_words)):
                    continue  # an exact join ("bronchi ectasis") may contain a lexicon word; a near miss may not
                if n == n_words > 1 and _inflection_of(span[-1][2].lower(), last_word[term]):
                    continue  # "plural effusions" keeps its plural: never "pleural effusion"
                candidates.append((score, n, i, i + n, term))
    # Best match first, the longer run on a tie ("bronchi ectasis" is one term, not "bronchi" and a stray word):
    # a term already written right claims its words, so the words beside it are never pulled in
    # ("consolidation in" stays as it is).
    taken = [False] * len(words)
    chosen = []
    for score, n, first, last, term in sorted(candidates, key=lambda c: (-c[0], -c[1], c[2])):
        if not any(taken[first:last]):
            taken[first:last] = [True] * n
            if text[words[first][0]: words[last - 1][1]].lower() != term.lower():
                chosen.append((first, last, term, score))
    out, corrections, cursor = [], [], 0
    for first, last, term, score in sorted(chosen):
        start, end = words[first][0], words[last - 1][1]
        heard = text[start:end]
        replacement = term[0].upper() + term[1:] if heard[0].isupper() else term
        out += [text[cursor:start], replacement]
        corrections.append(Correction(heard, term, round(score, 3)))
        cursor = end
    out.append(text[cursor:])
    return "".join(out), corrections


def sound_key(text: str) -> str:
    """A rough English pronunciation key: letters that sound alike share a symbol and every vowel run is one "a",
    so "atlectasis" and "atelectasis" or "plural" and "pleural" come out close."""
    key = _letters(text)
    for pattern, sound in _SOUNDS:
        key = re.sub(pattern, sound, key)
    key = re.sub(r"(.)\1+", r"\1", key)  # doubled letters sound single
    return re.sub(r"[aeiouy]+", "a", key)


_SOUNDS = (
    (r"^kn", "n"), (r"^wr", "r"), (r"^ps", "s"), (r"ph", "f"), (r"sch", "sh"), (r"ch(?=r|l)", "k"),
    (r"chi(?=[aeou])", "ki"), (r"ck", "k"), (r"c(?=[eiy])", "s"), (r"c", "k"), (r"q", "k"), (r"x", "ks"),
    (r"z", "s"), (r"gh", "g"), (r"dg", "j"), (r"tio", "sho"), (r"h(?![aeiouy])", ""),
)


def similarity(a: str, b: str) -> float:
    """1 - edit distance / longer length (1 = identical)."""
    if not a and not b:
        return 1.0
    return 1.0 - _edit_distance(a, b) / max(len(a), len(b))


def _match(heard: str, letters: str, sound: str, n_words: int) -> float | None:
    """Similarity of a run of words to a term, or None when the rules above forbid the correction."""
    if heard == letters:
        return 1.0
    if n_words == 1 and len(letters) < MIN_FUZZY_LETTERS:
        return None
    heard_sound = sound_key(heard)
    if not heard_sound or heard_sound[0] != sound[0] or _inflection_of(heard, letters):
        return None
    score = min(similarity(heard, letters), similarity(heard_sound, sound))
    return score if score >= MIN_SIMILARITY else None


def _inflection_of(a: str, b: str) -> bool:
    """True when a and b are different forms of one word: a shared stem, then different endings from INFLECTIONS."""
    if a == b:
        return False
    stem = 0
    while stem < min(len(a), len(b)) and a[stem] == b[stem]:
        stem += 1
    return stem >= 3 and a[stem:] in INFLECTIONS and b[stem:] in INFLECTIONS


def _allowed(span: list[tuple[int, int, str]], term: str, lexicon_words: set[str]) -> bool:
    term_words = {_letters(w) for w in re.split(r"[\s-]+", term)}
    return all(w.lower() not in lexicon_words or w.lower() in term_words for _, _, w in span)


def _joinable(text: str, span: list[tuple[int, int, str]]) -> bool:
    """Words separated by spaces or hyphens only: a run never crosses punctuation."""
    return all(re.fullmatch(r"[ \t-]+", text[a[1]: b[0]]) for a, b in zip(span, span[1:]))


def _letters(text: str) -> str:
    return re.sub(r"[^a-z]", "", text.lower())


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row = row, [i] + [0] * len(b)
        for j, cb in enumerate(b, 1):
            row[j] = min(prev[j] + 1, row[j - 1] + 1, prev[j - 1] + (ca != cb))
    return row[-1]
