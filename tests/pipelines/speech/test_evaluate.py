import numpy as np
import pytest

from pipelines.speech.dictation import (CLINICAL_SENTENCES, HELD_OUT_SENTENCES, NOISE_SNR_DB, SENTENCES_PER_NOTE,
                                        SPEEDS_WPM, VOICES, Dictation, add_noise, dictation_set)
from pipelines.speech.evaluate import _split_metrics, term_recall, wer, word_errors
from pipelines.speech.lexicon import CHEST_CT_TERMS, CLINICAL_LEXICON, Lexicon, normalize_text, number_words


def test_normalisation_makes_spoken_and_written_forms_agree():
    assert normalize_text("A 6mm Ground-glass nodule, 4.5 cm.") == "a six millimeter ground glass nodule four point five centimeter"
    assert normalize_text("six millimeters") == normalize_text("6 mm")
    assert number_words("23") == "twenty three" and number_words("120") == "one hundred twenty"
    assert number_words("2017") == "two thousand seventeen"


def test_word_errors_count_substitutions_insertions_and_deletions():
    assert word_errors("the nodule is small", "the nodule is small") == (0, 4)
    assert word_errors("the nodule is small", "the module is small") == (1, 4)
    assert word_errors("the nodule is small", "the nodule small") == (1, 4)
    assert word_errors("the nodule is small", "so the nodule is very small") == (2, 4)
    assert word_errors("pleural effusion", "") == (2, 2)
    assert wer(["a b c d", "e f"], ["a x c d", "e f g h"]) == pytest.approx(3 / 6)
    with pytest.raises(ValueError, match="2 references but 1 hypotheses"):
        wer(["a", "b"], ["a"])


def test_term_recall_counts_every_occurrence():
    refs = ["Nodule in the right upper lobe. Second nodule nearby.", "Small pleural effusion."]
    hyps = ["Module in the right upper lobe. Second nodule nearby.", "Small plural effusion."]
    recall, per_term = term_recall(refs, hyps, ("nodule", "right upper lobe", "pleural effusion"))
    assert per_term == {"nodule": (1, 2), "right upper lobe": (1, 1), "pleural effusion": (0, 1)}
    assert recall == pytest.approx(2 / 4)


def test_the_lexicon_prompt_carries_every_term_within_whisper_budget():
    prompt = normalize_text(CLINICAL_LEXICON.initial_prompt)
    missing = [t for t in CHEST_CT_TERMS if normalize_text(t) not in prompt and normalize_text(t)[:-1] not in prompt]
    assert missing == []
    assert len(CLINICAL_LEXICON.initial_prompt.split()) < 150  # ~214 Whisper tokens; test_transcribe counts them
    for required in ("nodule", "ground-glass", "pleural effusion", "emphysema", "consolidation", "cardiomegaly",
                     "pericardial", "Fleischner", "mediastinum", "right upper lobe", "left lower lobe"):
        assert required in CHEST_CT_TERMS
    with pytest.raises(ValueError, match="Lexicon.terms"):
        Lexicon(terms=("",), prompt="x")


def test_the_sentences_use_the_lexicon():
    assert len(CLINICAL_SENTENCES) >= 20
    used = term_recall(list(CLINICAL_SENTENCES), list(CLINICAL_SENTENCES), CHEST_CT_TERMS)[1]
    assert len(used) >= 30 and all(heard == said for heard, said in used.values())


def test_the_held_out_sentences_are_new_and_use_the_lexicon():
    assert not set(HELD_OUT_SENTENCES) & set(CLINICAL_SENTENCES)
    assert len(HELD_OUT_SENTENCES) % SENTENCES_PER_NOTE == 0
    used = term_recall(list(HELD_OUT_SENTENCES), list(HELD_OUT_SENTENCES), CHEST_CT_TERMS)[1]
    assert len(used) >= 30


def test_metrics_are_reported_per_split():
    silent = np.zeros(16, np.float32)
    dictations = [Dictation("small pleural effusion", "en-us", 140, None, silent, "tuning"),
                  Dictation("a nodule in the lingula", "en-us", 140, None, silent, "held-out"),
                  Dictation("no pneumothorax", "en-us", 170, 20.0, silent, "held-out")]
    hyps = {"biased": ["small pleural effusion", "a nodule in the lingula", "no pneumothorax"],
            "unbiased": ["small plural effusion", "a module in the lingula", "no pneumothorax"]}
    metrics = _split_metrics([d.text for d in dictations], hyps, dictations, CLINICAL_LEXICON)
    assert metrics["wer_tuning"] == 0.0 and metrics["term_recall_tuning"] == 1.0
    assert metrics["wer_tuning_unbiased"] == pytest.approx(1 / 3, abs=1e-4)
    assert metrics["term_recall_tuning_unbiased"] == 0.0
    assert metrics["wer_held_out_unbiased"] == pytest.approx(1 / 7, abs=1e-4)
    assert metrics["term_recall_held_out_unbiased"] == pytest.approx(2 / 3, abs=1e-4)
    assert (metrics["n_dictations_tuning"], metrics["n_dictations_held_out"]) == (1, 2)


def test_noise_is_added_at_the_requested_snr():
    rng = np.random.default_rng(1)
    speech = (0.2 * rng.standard_normal(32000)).astype(np.float32)
    noisy = add_noise(speech, 20.0, seed=3)
    snr = 10 * np.log10(np.mean(speech.astype(np.float64) ** 2) / np.mean((noisy - speech).astype(np.float64) ** 2))
    assert snr == pytest.approx(20.0, abs=0.3)
    np.testing.assert_array_equal(noisy, add_noise(speech, 20.0, seed=3))  # reproducible


def test_dictation_set_covers_voices_speeds_and_noise(espeak):
    subset = dictation_set(limit=8)
    assert len(subset) == 8
    assert {d.voice for d in subset} == set(VOICES) and {d.speed_wpm for d in subset} == set(SPEEDS_WPM)
    assert {d.snr_db for d in subset} == {None, NOISE_SNR_DB}
    assert {d.split for d in subset} == {"tuning", "held-out"}
    for d in subset:
        assert d.samples.dtype == np.float32 and 7.0 < d.duration_s < 20.0  # three sentences: a ~10 s voice note
        assert len([c for c in d.text if c in ".?!"]) == SENTENCES_PER_NOTE
    one = CLINICAL_SENTENCES[:1]
    slow = dictation_set(one, voices=("en-us",), speeds=(140,), sentences_per_note=1)[0]
    fast = dictation_set(one, voices=("en-us",), speeds=(170,), sentences_per_note=1)[0]
    assert slow.text == fast.text == one[0] and slow.duration_s > fast.duration_s * 1.1
    assert slow.split == "tuning"
    assert len(CLINICAL_SENTENCES) // SENTENCES_PER_NOTE * len(VOICES) * len(SPEEDS_WPM) == 32
    assert len(HELD_OUT_SENTENCES) // SENTENCES_PER_NOTE * len(VOICES) * len(SPEEDS_WPM) == 20
