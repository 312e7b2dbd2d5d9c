"""The speech pipeline's errors: one hierarchy under `mmcore.errors.InputError`.

Callers catch `SpeechError` for everything this pipeline rejects, `AudioError` for a bad recording (the web app
shows its message and stores nothing) or one of the precise classes below when they care which.
"""

from __future__ import annotations

from mmcore.errors import InputError


class SpeechError(InputError):
    """Anything the speech pipeline refuses: a recording, a model reference, an engine option."""


class AudioError(SpeechError):
    """A recording that cannot be used as a voice note."""


class EmptyAudioError(AudioError):
    """The file has no bytes at all."""


class UndecodableAudioError(AudioError):
    """The bytes are not audio any decoder knows (e.g. a text file renamed .wav) or the stream is broken."""


class ZeroLengthAudioError(AudioError):
    """A valid container that holds no audio samples."""


class SilentAudioError(AudioError):
    """Audio that decodes but never rises above the silence threshold: nothing to transcribe."""


class AudioTooLongError(AudioError):
    """Longer than the configured limit (seconds)."""


class AudioTooLargeError(AudioError):
    """Bigger than the configured limit (bytes)."""


class ModelNotFoundError(SpeechError):
    """No Whisper model could be found locally or fetched; the message lists every way to provide one."""


class ModelIntegrityError(SpeechError):
    """Model files whose checksum is not the expected one; they are refused, never used."""


class EngineError(SpeechError):
    """An unknown engine name, or an engine whose library is not installed."""
