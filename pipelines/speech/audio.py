"""Voice-note decoding: whatever a browser or phone recorded -> 16 kHz mono float32 samples in [-1, 1].

PyAV carries its own FFmpeg, so wav, mp3, ogg/opus, webm, m4a (AAC) and flac all decode without a system ffmpeg.
Every way a recording can be unusable raises its own `AudioError` subclass whose message names the file and says
what was expected and what was found: empty file, undecodable bytes, a container without samples, silence, or a
recording over the length or size limit.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Union

import numpy as np

from pipelines.speech.errors import (AudioError, AudioTooLargeError, AudioTooLongError, EmptyAudioError,
                                     SilentAudioError, UndecodableAudioError, ZeroLengthAudioError)

SAMPLE_RATE = 16000  # Hz, what every Whisper model was trained on
SILENCE_WINDOW = 320  # samples: 20 ms windows for the loudness check

AudioSource = Union[str, os.PathLike, bytes, bytearray, BinaryIO]


@dataclass(frozen=True)
class AudioLimits:
    max_seconds: float = 300.0  # a voice note is a few minutes at most
    max_bytes: int = 100 * 2**20  # 5 min of 48 kHz stereo 24-bit wav is ~86 MB
    silence_dbfs: float = -50.0  # loudest 20 ms window below this (dB full scale) counts as silence

    def __post_init__(self):
        if not self.max_seconds > 0:
            raise ValueError(f"AudioLimits.max_seconds: expected > 0, found {self.max_seconds!r}")
        if not self.max_bytes > 0:
            raise ValueError(f"AudioLimits.max_bytes: expected > 0, found {self.max_bytes!r}")
        if not self.silence_dbfs < 0:
            raise ValueError(f"AudioLimits.silence_dbfs: expected a negative dBFS level, found {self.silence_dbfs!r}")


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray  # (N,) float32 mono at SAMPLE_RATE
    source: str  # file name (or "<bytes>") for messages and provenance
    codec: str  # codec of the original stream, e.g. "opus"
    original_rate: int  # Hz
    original_channels: int
    peak_dbfs: float  # loudness of the loudest 20 ms window

    sample_rate = SAMPLE_RATE

    @property
    def duration_s(self) -> float:
        return len(self.samples) / SAMPLE_RATE


def decode_audio(source: AudioSource, *, limits: AudioLimits = AudioLimits(), name: str | None = None) -> Audio:
    """Decode a recording (path, bytes or binary file object) to 16 kHz mono float32, enforcing `limits`."""
    import av

    name = name or _source_name(source)
    size, opened = _open_source(source, name)
    if size == 0:
        raise EmptyAudioError(f"{name}: the file is empty (0 bytes); expected an audio recording")
    if size > limits.max_bytes:
        raise AudioTooLargeError(f"{name}: {_size(size)} is over the {_size(limits.max_bytes)} limit for a voice note")
    try:
        container = av.open(opened, mode="r")
    except (av.FFmpegError, ValueError, EOFError, UnicodeDecodeError) as exc:
        raise UndecodableAudioError(f"{name}: not a recording any decoder knows ({_reason(exc)}); expected wav, mp3, "
                                    "ogg/opus, webm, m4a or flac") from exc
    with container:
        stream = next((s for s in container.streams if s.type == "audio"), None)
        if stream is None:
            found = ", ".join(s.type for s in container.streams) or "no streams"
            raise UndecodableAudioError(f"{name}: the {container.format.name} container has no audio stream "
                                        f"(found: {found})")
        declared = _declared_seconds(container, stream)
        if declared is not None and declared > limits.max_seconds + 0.5:  # headers may round up a little
            raise AudioTooLongError(f"{name}: {declared:.1f} s is over the {limits.max_seconds:.0f} s limit "
                                    "for a voice note")
        samples = _decode_stream(container, stream, name, limits)
        codec = stream.codec_context.codec.canonical_name  # "mp3", not the decoder name "mp3float"
        rate = stream.codec_context.sample_rate or 0
        channels = stream.codec_context.channels or 0
    if samples.size == 0:
        raise ZeroLengthAudioError(f"{name}: the {codec} stream holds no samples (0 s of audio)")
    peak = loudest_window_dbfs(samples)
    if peak < limits.silence_dbfs:
        raise SilentAudioError(f"{name}: {len(samples) / SAMPLE_RATE:.1f} s of silence (loudest 20 ms at "
                               f"{peak:.0f} dBFS, below the {limits.silence_dbfs:.0f} dBFS threshold); "
                               "expected speech")
    return Audio(samples=samples, source=name, codec=codec, original_rate=rate, original_channels=channels,
                 peak_dbfs=peak)


def loudest_window_dbfs(samples: np.ndarray, window: int = SILENCE_WINDOW) -> float:
    """RMS level (dB full scale) of the loudest `window`-sample stretch; -inf for digital silence."""
    if len(samples) < window:
        frames = samples[None, :]
    else:
        frames = samples[: len(samples) // window * window].reshape(-1, window)  # (n_windows, window)
    rms = float(np.sqrt(np.max(np.mean(frames.astype(np.float64) ** 2, axis=1))))
    return 20 * math.log10(rms) if rms > 0 else -math.inf


def _decode_stream(container, stream, name: str, limits: AudioLimits) -> np.ndarray:
    import av

    max_samples = int(limits.max_seconds * SAMPLE_RATE)
    resampler = av.AudioResampler(format="flt", layout="mono", rate=SAMPLE_RATE)
    chunks: list[np.ndarray] = []
    total = 0
    try:
        for frame in container.decode(stream):
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
                total += chunks[-1].size
            if total > max_samples:
                raise AudioTooLongError(f"{name}: {total / SAMPLE_RATE:.1f} s decoded so far, over the "
                                        f"{limits.max_seconds:.0f} s limit for a voice note")
        for out in resampler.resample(None):  # flush the resampler's delay line
            chunks.append(out.to_ndarray().reshape(-1))
    except (av.FFmpegError, ValueError, EOFError) as exc:
        raise UndecodableAudioError(f"{name}: the {stream.codec_context.name} stream is broken after "
                                    f"{total / SAMPLE_RATE:.1f} s ({_reason(exc)})") from exc
    samples = np.concatenate(chunks).astype(np.float32, copy=False) if chunks else np.zeros(0, np.float32)
    if samples.size > max_samples:
        raise AudioTooLongError(f"{name}: {samples.size / SAMPLE_RATE:.1f} s is over the {limits.max_seconds:.0f} s "
                                "limit for a voice note")
    return np.clip(samples, -1.0, 1.0)


def _declared_seconds(container, stream) -> float | None:
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    if container.duration is not None:
        return container.duration / 1_000_000  # AV_TIME_BASE: microseconds
    return None


def _open_source(source: AudioSource, name: str) -> tuple[int, object]:
    """(size in bytes, something av.open accepts)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return len(source), io.BytesIO(bytes(source))
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise AudioError(f"{name}: no such file" if not path.exists() else f"{name}: not a file")
        return path.stat().st_size, str(path)
    if hasattr(source, "read") and hasattr(source, "seek"):
        start = source.tell()
        size = source.seek(0, io.SEEK_END) - start
        source.seek(start)
        return size, source
    raise TypeError(f"decode_audio: expected a path, bytes or a binary file object, found {type(source).__name__}")


def _source_name(source: AudioSource) -> str:
    if isinstance(source, (str, os.PathLike)):
        return str(source)
    return getattr(source, "name", None) or "<bytes>"


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**20:.1f} MiB" if n_bytes >= 2**20 else f"{n_bytes} bytes"


def _reason(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__
