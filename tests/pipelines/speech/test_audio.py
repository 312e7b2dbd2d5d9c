import io
import math

import numpy as np
import pytest

from mmcore.errors import InputError
from pipelines.speech.audio import SAMPLE_RATE, AudioLimits, decode_audio, loudest_window_dbfs
from pipelines.speech.errors import (AudioError, AudioTooLargeError, AudioTooLongError, EmptyAudioError,
                                     SilentAudioError, UndecodableAudioError, ZeroLengthAudioError)

EXPECTED_CODEC = {"wav": "pcm_s16le", "mp3": "mp3", "ogg": "opus", "webm": "opus", "m4a": "aac", "flac": "flac"}


def dominant_hz(samples: np.ndarray) -> float:
    spectrum = np.abs(np.fft.rfft(samples * np.hanning(len(samples))))
    return float(np.fft.rfftfreq(len(samples), 1 / SAMPLE_RATE)[np.argmax(spectrum)])


@pytest.mark.parametrize("fmt", ["wav", "mp3", "ogg", "webm", "m4a", "flac"])
def test_every_upload_format_decodes_to_16k_mono_float32(fmt, audio_kit, tmp_path):
    data = audio_kit.encode(audio_kit.tone(1.5, 440.0, rate=44100), 44100, fmt, channels=2)
    path = tmp_path / f"note{audio_kit.formats[fmt][2]}"
    path.write_bytes(data)
    audio = decode_audio(path)
    assert audio.samples.dtype == np.float32 and audio.samples.ndim == 1
    assert audio.sample_rate == SAMPLE_RATE
    assert audio.codec == EXPECTED_CODEC[fmt]
    assert audio.original_channels == 2
    assert abs(audio.duration_s - 1.5) < 0.12  # mp3/aac/opus add encoder priming of a few tens of ms
    assert abs(dominant_hz(audio.samples) - 440.0) < 3.0
    assert -14 < audio.peak_dbfs < -9  # a 0.3-amplitude sine has RMS -13.5 dBFS; lossy codecs shift it slightly


def test_bytes_and_file_objects_decode_like_paths(audio_kit):
    data = audio_kit.encode(audio_kit.tone(1.0, 300.0), SAMPLE_RATE, "flac", channels=1)
    from_bytes = decode_audio(data)
    from_file = decode_audio(io.BytesIO(data), name="upload.flac")
    assert from_bytes.source == "<bytes>" and from_file.source == "upload.flac"
    np.testing.assert_array_equal(from_bytes.samples, from_file.samples)
    assert len(from_bytes.samples) == SAMPLE_RATE


def test_empty_file(tmp_path):
    path = tmp_path / "note.wav"
    path.write_bytes(b"")
    with pytest.raises(EmptyAudioError, match=r"note\.wav: the file is empty \(0 bytes\)"):
        decode_audio(path)


def test_text_renamed_wav_is_undecodable(tmp_path):
    path = tmp_path / "notes.wav"
    path.write_text("Patient has a nodule in the right upper lobe.\n" * 20)
    with pytest.raises(UndecodableAudioError, match=r"notes\.wav: .*expected wav, mp3, ogg/opus, webm, m4a or flac"):
        decode_audio(path)


def test_zero_length_recording(audio_kit, tmp_path):
    path = tmp_path / "zero.wav"
    path.write_bytes(audio_kit.empty_wav())
    assert path.stat().st_size > 0  # a header, no samples
    with pytest.raises(ZeroLengthAudioError, match=r"zero\.wav: the pcm_s16le stream holds no samples"):
        decode_audio(path)


def test_ten_seconds_of_silence(audio_kit, tmp_path):
    path = tmp_path / "silence.wav"
    path.write_bytes(audio_kit.encode(np.zeros(10 * SAMPLE_RATE, np.float32), SAMPLE_RATE, "wav", channels=1))
    with pytest.raises(SilentAudioError, match=r"silence\.wav: 10\.0 s of silence .*expected speech"):
        decode_audio(path)


def test_faint_hiss_is_silence_but_quiet_speech_level_is_not(audio_kit):
    rng = np.random.default_rng(0)
    hiss = (rng.normal(0, 10 ** (-70 / 20), 2 * SAMPLE_RATE)).astype(np.float32)  # -70 dBFS noise floor
    with pytest.raises(SilentAudioError):
        decode_audio(audio_kit.encode(hiss, SAMPLE_RATE, "flac", channels=1))
    quiet = audio_kit.tone(1.0, 200.0, amplitude=0.01)  # -43 dBFS RMS: a distant speaker, still audio
    assert decode_audio(audio_kit.encode(quiet, SAMPLE_RATE, "flac", channels=1)).peak_dbfs == pytest.approx(-43, abs=1)


def test_over_the_length_limit(audio_kit, tmp_path):
    path = tmp_path / "long.ogg"
    path.write_bytes(audio_kit.encode(audio_kit.tone(4.0), SAMPLE_RATE, "ogg", channels=1))
    with pytest.raises(AudioTooLongError, match=r"long\.ogg: .*over the 3 s limit"):
        decode_audio(path, limits=AudioLimits(max_seconds=3))
    assert decode_audio(path, limits=AudioLimits(max_seconds=5)).duration_s == pytest.approx(4.0, abs=0.05)


def test_default_limit_is_five_minutes(audio_kit):
    data = audio_kit.encode(audio_kit.tone(301.0, 200.0, rate=8000), 8000, "flac", channels=1)
    with pytest.raises(AudioTooLongError, match=r"over the 300 s limit"):
        decode_audio(data)


def test_over_the_size_limit(audio_kit):
    data = audio_kit.encode(audio_kit.tone(1.0), SAMPLE_RATE, "wav", channels=1)
    with pytest.raises(AudioTooLargeError, match=r"<bytes>: \d+ bytes is over the 1000 bytes limit"):
        decode_audio(data, limits=AudioLimits(max_bytes=1000))


def test_missing_file_and_the_error_hierarchy(tmp_path):
    with pytest.raises(AudioError, match="no such file"):
        decode_audio(tmp_path / "absent.webm")
    for cls in (EmptyAudioError, UndecodableAudioError, ZeroLengthAudioError, SilentAudioError, AudioTooLongError,
                AudioTooLargeError):
        assert issubclass(cls, AudioError) and issubclass(cls, InputError)


def test_limits_validate_their_fields():
    with pytest.raises(ValueError, match="AudioLimits.max_seconds"):
        AudioLimits(max_seconds=0)
    with pytest.raises(ValueError, match="AudioLimits.silence_dbfs"):
        AudioLimits(silence_dbfs=3)


def test_loudest_window_level():
    assert loudest_window_dbfs(np.zeros(1000, np.float32)) == -math.inf
    x = np.zeros(16000, np.float32)
    x[8000:8320] = 0.5  # one 20 ms window at constant 0.5 -> -6.02 dBFS
    assert loudest_window_dbfs(x) == pytest.approx(-6.02, abs=0.01)
