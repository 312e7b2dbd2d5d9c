import numpy as np
import pytest

from pipelines.speech.correction import correct_terms, similarity, sound_key
from pipelines.speech.dictation import CLINICAL_SENTENCES
from pipelines.speech.engines import Segment, Transcriber
from pipelines.speech.lexicon import CHEST_CT_TERMS, normalize_text


def corrected(text: str) -> str:
    return correct_terms(text, CHEST_CT_TERMS)[0]


@pytest.mark.parametrize("heard, expected", [
    ("Right pleural effusion with adjacent atlectasis.", "Right pleural effusion with adjacent atelectasis."),
    ("with a telectasis at both bases", "with atelectasis at both bases"),
    ("Bronchi ectasis and bronchial wall thickening.", "Bronchiectasis and bronchial wall thickening."),
    ("Small right plural effusion.", "Small right pleural effusion."),
    ("in the left low lobe", "in the left lower lobe"),
    ("in keeping with cardio megaly", "in keeping with cardiomegaly"),
    ("Moderate centrilobular emphasema.", "Moderate centrilobular emphysema."),
    ("A groundglass nodule", "A ground-glass nodule"),
])
def test_near_miss_terms_are_restored(heard, expected):
    assert corrected(heard) == expected


def test_corrections_are_reported_with_what_was_heard():
    text, fixes = correct_terms("Plural effusion with a telectasis.", CHEST_CT_TERMS)
    assert text == "Pleural effusion with atelectasis."
    assert [(c.heard, c.term) for c in fixes] == [("Plural effusion", "pleural effusion"),
                                                  ("a telectasis", "atelectasis")]
    assert fixes[1].similarity == 1.0 and 0.84 <= fixes[0].similarity < 1.0


@pytest.mark.parametrize("text", [
    "The plural of this word is that one.",  # an everyday word alone is never turned into a term
    "A software module was updated.",  # close to "nodule" but starts with another sound
    "History of metastasis, now consolidated.",  # other forms of lexicon words
    "Two nodules and small effusions.",
    "Bilateral plural effusions.",  # the term is singular: correcting it would drop the plural
    "The mediastinal nodes and the mediastinum.",  # two lexicon words close to each other
    "Bilateral. Pleural effusion.",
    "Please compare with the prior chest CT from last year.",
    "Clinical question: persistent cough and weight loss in a former smoker.",
    "The patient is anxious about the results, the radiologist said.",
])
def test_ordinary_words_and_correct_terms_are_left_alone(text):
    assert correct_terms(text, CHEST_CT_TERMS) == (text, [])


def test_words_are_never_joined_across_punctuation():
    assert corrected("cardio. Megaly") == "cardio. Megaly"


def test_every_lexicon_term_and_every_dictated_sentence_is_left_as_written():
    text = ", ".join(CHEST_CT_TERMS) + "."
    assert correct_terms(text, CHEST_CT_TERMS) == (text, [])
    for sentence in CLINICAL_SENTENCES:
        assert correct_terms(sentence, CHEST_CT_TERMS) == (sentence, [])


def test_sound_key_and_similarity():
    assert sound_key("plural") == sound_key("pleural")
    assert sound_key("Fleischner") == sound_key("flashner")
    assert sound_key("module")[0] != sound_key("nodule")[0]
    assert similarity("atlectasis", "atelectasis") == pytest.approx(1 - 1 / 11)
    assert similarity("", "") == 1.0 and similarity("abc", "") == 0.0


def test_correction_happens_before_scoring():
    assert normalize_text(corrected("right plural effusion")) == "right pleural effusion"


class ScriptedTranscriber(Transcriber):
    """A decoder that always hears the same words, to test what transcribe() does with them."""

    engine, model_id, model_source, d_model = "scripted", "scripted", "explicit", 4

    def __init__(self, heard: str):
        self.heard = heard

    def _transcribe(self, samples, language, lexicon):
        return "en", 1.0, [Segment(0.0, len(samples) / 16000, self.heard)]

    def _encode_windows(self, windows):
        return np.zeros((len(windows), 1500, self.d_model), np.float32)


def test_transcribe_corrects_terms_only_when_biased():
    samples = np.full(16000, 0.1, np.float32)
    transcriber = ScriptedTranscriber("Small right plural effusion with a telectasis.")
    biased = transcriber.transcribe(samples)
    assert biased.text == "Small right pleural effusion with atelectasis."
    assert biased.segments[0].text == biased.text
    assert [c.term for c in biased.corrections] == ["pleural effusion", "atelectasis"]
    assert biased.to_dict()["corrections"][0] == {"heard": "plural effusion", "term": "pleural effusion",
                                                  "similarity": 0.933}
    unbiased = transcriber.transcribe(samples, lexicon=None)
    assert unbiased.text == "Small right plural effusion with a telectasis." and unbiased.corrections == []
