"""Synthetic clinical dictations: espeak-ng reads chest-CT sentences, three to a voice note, in two voices at two
speeds, half of the recordings with white noise added at 20 dB SNR. They are the speech evaluation set and the test fixtures; no recording of a patient
is needed or shipped.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

import numpy as np

from pipelines.speech.audio import SAMPLE_RATE, Audio, decode_audio
from pipelines.speech.errors import EngineError

# Numbers are written as words: that is how they are spoken, and normalize_text turns "6 mm" into the same words.
CLINICAL_SENTENCES = (
    "There is a six millimeter solid nodule in the right upper lobe.",
    "A ground-glass nodule in the left lower lobe measures eight millimeters.",
    "Small right pleural effusion with adjacent atelectasis.",
    "Moderate centrilobular emphysema, most marked in the upper lobes.",
    "Patchy consolidation in the right middle lobe, consistent with pneumonia.",
    "The heart is enlarged, in keeping with cardiomegaly.",
    "There is no pericardial effusion.",
    "The mediastinum is within normal limits and there is no lymphadenopathy.",
    "Follow up according to the Fleischner Society guidelines.",
    "A spiculated mass in the left upper lobe is suspicious for malignancy.",
    "Please compare with the prior chest CT from last year.",
    "Clinical question: persistent cough and weight loss in a former smoker.",
    "Bronchiectasis and bronchial wall thickening in both lower lobes.",
    "No pneumothorax and no pulmonary embolism.",
    "Subpleural reticulation and honeycombing suggest pulmonary fibrosis.",
    "A calcified granuloma is seen in the lingula.",
    "Enlarged mediastinal and hilar lymph nodes are noted.",
    "The trachea and main bronchi are patent.",
    "A part-solid nodule in the right lower lobe has grown since the last scan.",
    "Mild paraseptal emphysema at the lung apices.",
    "Please measure the largest nodule and assess for interval growth.",
    "History of breast cancer, looking for pulmonary metastases.",
    "Bilateral pleural effusions, larger on the left.",
    "Interstitial thickening at both lung bases.",
)

# Held out: the prompt, hot words, term correction and decoding options were chosen on the sentences above only, so
# these sentences (the same lexicon terms in other words and other company) show how much of that choice is fitted to
# the sentences it was tuned on. `mmcore eval speech` reports both splits.
HELD_OUT_SENTENCES = (
    "Clinical question: sudden shortness of breath, rule out pulmonary embolism.",
    "There is a nine millimeter part-solid nodule in the left upper lobe.",
    "Small left pleural effusion, no pneumothorax.",
    "Dense consolidation in the right lower lobe, likely pneumonia.",
    "The heart size is normal and there is no pericardial effusion.",
    "A small calcified granuloma in the right middle lobe is benign.",
    "Mediastinal lymphadenopathy with enlarged hilar nodes on the right.",
    "Honeycombing and reticulation in the lower lobes indicate interstitial fibrosis.",
    "A spiculated nodule in the lingula needs follow up under the Fleischner criteria.",
    "Known colon cancer, assess for new metastases or malignancy.",
    "Mild bronchiectasis and atelectasis in the left lower lobe.",
    "Centrilobular emphysema is worse at the apices.",
    "Cardiomegaly with bilateral pleural effusions, likely heart failure.",
    "The trachea and bronchi are clear, the mediastinum is central.",
    "Subpleural ground-glass change in both lower lobes, early fibrosis is possible.",
)

# espeak-ng voices present in every installation: the US English voice and its female variant.
VOICES = ("en-us", "en-us+f2")
SPEEDS_WPM = (140, 170)  # a careful and a brisk dictation pace, words per minute
NOISE_SNR_DB = 20.0
SENTENCES_PER_NOTE = 3  # a voice note of ~10 s: clinical question, history, what to look at


@dataclass(frozen=True)
class Dictation:
    text: str
    voice: str
    speed_wpm: int
    snr_db: float | None  # None: clean
    samples: np.ndarray  # (N,) float32 at 16 kHz
    split: str = "tuning"  # "tuning" (CLINICAL_SENTENCES) or "held-out" (HELD_OUT_SENTENCES)

    @property
    def condition(self) -> str:
        return f"{self.voice}/{self.speed_wpm}wpm/{'clean' if self.snr_db is None else f'{self.snr_db:g}dB'}"

    @property
    def duration_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def espeak_path() -> str | None:
    return shutil.which("espeak-ng")


def synthesize(text: str, voice: str = VOICES[0], speed_wpm: int = 160) -> Audio:
    """Speak `text` with espeak-ng and decode its WAV output like any uploaded recording."""
    exe = espeak_path()
    if exe is None:
        raise EngineError("espeak-ng is not installed (apt-get install espeak-ng); it synthesises the dictations")
    if not text.strip():
        raise ValueError("synthesize: text is empty")
    result = subprocess.run([exe, "-v", voice, "-s", str(int(speed_wpm)), "--stdout", text],
                            capture_output=True, timeout=60)
    if result.returncode != 0 or not result.stdout:
        raise EngineError(f"espeak-ng failed for voice {voice!r}: {result.stderr.decode(errors='replace').strip()}")
    return decode_audio(result.stdout, name=f"espeak-ng:{voice}:{speed_wpm}wpm")


def add_noise(samples: np.ndarray, snr_db: float, seed: int = 0) -> np.ndarray:
    """White Gaussian noise at `snr_db` below the speech power (measured over the non-silent samples)."""
    voiced = samples[np.abs(samples) > 1e-3]
    power = float(np.mean((voiced if voiced.size else samples).astype(np.float64) ** 2))
    noise = np.random.default_rng(seed).normal(0.0, np.sqrt(power / 10 ** (snr_db / 10)), samples.shape)
    return np.clip(samples + noise, -1.0, 1.0).astype(np.float32)


def dictation_set(sentences: tuple[str, ...] | None = None, voices: tuple[str, ...] = VOICES,
                  speeds: tuple[int, ...] = SPEEDS_WPM, snr_db: float = NOISE_SNR_DB,
                  sentences_per_note: int = SENTENCES_PER_NOTE, limit: int | None = None) -> list[Dictation]:
    """Voice notes of `sentences_per_note` consecutive sentences, each in every voice and speed; every other
    recording gets noise at `snr_db`, alternating so each note, voice and speed is heard both clean and noisy.
    `sentences=None` is the evaluation set: the tuning notes, then the held-out ones, each labelled with its split.
    `limit` keeps that many recordings, spread evenly over the plan."""
    if sentences_per_note <= 0:
        raise ValueError(f"dictation_set: sentences_per_note must be positive, found {sentences_per_note}")
    groups = [CLINICAL_SENTENCES, HELD_OUT_SENTENCES] if sentences is None else [tuple(sentences)]
    notes = [group[k: k + sentences_per_note] for group in groups for k in range(0, len(group), sentences_per_note)]
    combos = [(v, w) for v in voices for w in speeds]
    plan = [(note, v, w, snr_db if (i + j) % 2 else None)
            for i, note in enumerate(notes) for j, (v, w) in enumerate(combos)]
    if limit is not None:
        if limit <= 0:
            raise ValueError(f"dictation_set: limit must be positive, found {limit}")
        picks = np.linspace(0, len(plan) - 1, min(limit, len(plan))).round().astype(int)
        plan = [plan[i] for i in sorted(set(picks.tolist()))]
    out = []
    for i, (note, voice, speed, snr) in enumerate(plan):
        text, samples = clinical_note(note, voice, speed)
        split = "held-out" if set(note) <= set(HELD_OUT_SENTENCES) else "tuning"
        out.append(Dictation(text, voice, speed, snr, samples if snr is None else add_noise(samples, snr, seed=i),
                             split))
    return out


def clinical_note(sentences: tuple[str, ...], voice: str = VOICES[0], speed_wpm: int = 160,
                  pause_s: float = 0.4) -> tuple[str, np.ndarray]:
    """Several sentences read as one voice note with short pauses: (reference text, samples)."""
    gap = np.zeros(int(pause_s * SAMPLE_RATE), np.float32)
    parts = []
    for text in sentences:
        parts += [synthesize(text, voice, speed_wpm).samples, gap]
    return " ".join(sentences), np.concatenate(parts[:-1])
