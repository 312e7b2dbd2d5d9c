"""Medical vocabulary biasing: an initial prompt and hot words that steer Whisper towards chest-CT terms, and the
text normalisation that WER and term recall are measured after.

Whisper conditions each window on the text before it; a prompt written like the start of a radiology note, with the
terms spelled as a radiologist spells them, makes "Fleischner" win over "flesh or" and "pleural" over "plural".
Hot words (faster-whisper only) can be prepended to every window's context as well; the clinical lexicon does
without them (see CHEST_CT_HOTWORDS).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

# Terms a chest-CT voice note uses and a general-purpose model gets wrong, spelled as in a radiology report.
# Term recall in the evaluation is measured over these.
CHEST_CT_TERMS = (
    "nodule", "ground-glass", "part-solid", "spiculated", "calcified", "granuloma", "malignancy", "metastases",
    "pleural effusion", "pericardial effusion", "pneumothorax", "pulmonary embolism", "consolidation", "atelectasis",
    "bronchiectasis", "bronchial", "trachea", "bronchi", "emphysema", "centrilobular", "paraseptal", "subpleural",
    "reticulation", "honeycombing", "interstitial", "fibrosis", "cardiomegaly", "pericardial", "mediastinum",
    "mediastinal", "hilar", "lymphadenopathy", "Fleischner", "right upper lobe", "right middle lobe",
    "right lower lobe", "left upper lobe", "left lower lobe", "lingula", "apices", "bilateral",
)

# Written as dictated prose, in whole sentences with their articles, so Whisper expects a spoken note rather than a
# list (after a list-like prompt it dropped the "A" that opens many notes); it carries every term above in ~214
# Whisper tokens, inside the 223-token prompt budget.
CHEST_CT_PROMPT = (
    "Chest CT voice note. There is a solid nodule, a part-solid nodule and a ground-glass nodule, one spiculated and "
    "one calcified, likely a granuloma. A mass is suspicious for malignancy or metastases. Right upper lobe, right "
    "middle lobe, right lower lobe, left upper lobe, lingula and left lower lobe, at the apices. There are bilateral "
    "pleural effusions and a pericardial effusion, no pneumothorax and no pulmonary embolism. There is consolidation "
    "with atelectasis, bronchiectasis and bronchial wall thickening; the trachea and bronchi are clear. A "
    "centrilobular and paraseptal emphysema. Subpleural reticulation and honeycombing, interstitial fibrosis. "
    "Cardiomegaly. The mediastinum shows mediastinal and hilar lymphadenopathy. Fleischner Society."
)

# Hot words (faster-whisper puts them before the prompt) for lexicons whose prompt cannot carry every term. The
# clinical lexicon does not use them: its prompt already holds every term, and repeating ten of them as hot words
# made the tuning dictations worse (WER 0.094 -> 0.083 and term recall 0.894 -> 0.906 without them, full 30 s window;
# docs/speech.md) while adding ~37 tokens to every decoding.
CHEST_CT_HOTWORDS = ("nodule", "pleural", "atelectasis", "bronchiectasis", "emphysema", "mediastinum",
                     "lymphadenopathy", "Fleischner", "spiculated", "consolidation")


@dataclass(frozen=True)
class Lexicon:
    terms: tuple[str, ...]  # what term recall is measured over
    prompt: str  # Whisper reads the initial prompt as the text that came just before the note
    hotword_terms: tuple[str, ...] = ()

    def __post_init__(self):
        if not self.terms or any(not t.strip() for t in self.terms):
            raise ValueError("Lexicon.terms: expected non-empty term strings")
        if not self.prompt.strip():
            raise ValueError("Lexicon.prompt: expected text")

    @property
    def initial_prompt(self) -> str:
        return self.prompt

    @property
    def hotwords(self) -> str | None:
        return ", ".join(self.hotword_terms) or None


CLINICAL_LEXICON = Lexicon(terms=CHEST_CT_TERMS, prompt=CHEST_CT_PROMPT)


def normalize_text(text: str) -> str:
    """Lower case, numbers as words, hyphens and punctuation as spaces, units spelled out, single spaces."""
    text = text.lower().replace("’", "'")
    text = re.sub(r"(\d)([a-z])", r"\1 \2", text)  # "6mm" -> "6 mm"
    text = re.sub(r"\d+(?:\.\d+)?", lambda m: f" {number_words(m.group())} ", text)
    text = re.sub(r"[^a-z0-9' ]+", " ", text)  # hyphens, commas, full stops -> word breaks
    words = [UNIT_WORDS.get(w, w) for w in text.replace("'", "").split()]
    return " ".join(words)


UNIT_WORDS = {
    "mm": "millimeter", "millimeters": "millimeter", "millimetre": "millimeter", "millimetres": "millimeter",
    "cm": "centimeter", "centimeters": "centimeter", "centimetre": "centimeter", "centimetres": "centimeter",
    "ml": "milliliter", "milliliters": "milliliter", "hu": "hounsfield", "x": "by",
}

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def number_words(number: str) -> str:
    """"4.5" -> "four point five", "23" -> "twenty three", "120" -> "one hundred twenty"; up to 9999."""
    whole, _, fraction = number.partition(".")
    words = _integer_words(int(whole)) if len(whole) <= 4 else " ".join(_ONES[int(d)] for d in whole)
    if fraction:
        words += " point " + " ".join(_ONES[int(d)] for d in fraction)
    return words


def _integer_words(n: int) -> str:
    if n < 20:
        return _ONES[n]
    if n < 100:
        return _TENS[n // 10] + ("" if n % 10 == 0 else " " + _ONES[n % 10])
    if n < 1000:
        rest = n % 100
        return _ONES[n // 100] + " hundred" + ("" if rest == 0 else " " + _integer_words(rest))
    rest = n % 1000
    return _integer_words(n // 1000) + " thousand" + ("" if rest == 0 else " " + _integer_words(rest))


def count_terms(text: str, terms: tuple[str, ...]) -> Counter:
    """Occurrences of each term as whole words in the normalised text (terms normalised the same way)."""
    normalized = normalize_text(text)
    counts: Counter = Counter()
    for term in terms:
        n = len(re.findall(rf"(?<!\S){re.escape(normalize_text(term))}(?!\S)", normalized))
        if n:
            counts[term] = n
    return counts
