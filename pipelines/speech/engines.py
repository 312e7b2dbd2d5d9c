"""Transcription engines behind one interface.

`faster-whisper` (CTranslate2; int8 on CPU, float16 on CUDA) is the default; `openai-whisper` (PyTorch) is the second,
for users who hold its `.pt` checkpoints. Both return a `Transcript` and both expose `encode`, the Whisper encoder's
output for a note, which `pipelines.speech.features` turns into the core's audio tokens.
"""

from __future__ import annotations

import math
import os
import pickle
import time
import zlib
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field

import numpy as np

from pipelines.speech.audio import SAMPLE_RATE, Audio
from pipelines.speech.correction import Correction, correct_terms
from pipelines.speech.errors import EngineError
from pipelines.speech.lexicon import CLINICAL_LEXICON, Lexicon
from pipelines.speech.models import ENGINES, ResolvedModel, resolve_model

WINDOW_SAMPLES = 30 * SAMPLE_RATE  # Whisper reads 30 s windows
FRAME_SAMPLES = 320  # one encoder output frame = 20 ms (hop 10 ms, then a stride-2 convolution)
BEAM_SIZE = 5
# Beam search only, no sampling fallback. Whisper re-decodes at rising temperatures when a window looks like a loop
# or is too unlikely; on the noisy dictations that fired on most windows, doubled decoding time, and in every note
# compared still ended on the temperature-0 text (the most likely of all attempts).
TEMPERATURES = (0.0,)
# A note of up to 30 s is decoded from an encoder window cut to its length plus this much trailing silence, rather
# than padded to the 30 s Whisper was trained on: the encoder's cost grows faster than linearly with its input and
# every decoding step attends to every encoder frame, so a 10-13 s note takes about two thirds of the CPU time. With a
# 3 s margin the decoder once said a note's last sentence twice; with 5 s no note of the tuning dictations was cut or
# repeated, and WER / term recall came within 4 words and 1 term of the full window (docs/speech.md).
WINDOW_MARGIN_S = 5.0
# A cut window occasionally sends the decoder into a loop ("... both lung bases. Interstitial thickening at both lung
# bases. ..."); text that gzip compresses more than this (Whisper's own threshold; normal dictation is below 1.8) is
# decoded again from the full 30 s window.
MAX_COMPRESSION_RATIO = 2.4


@dataclass
class Segment:
    start: float  # s
    end: float  # s
    text: str


@dataclass
class Transcript:
    text: str
    language: str
    language_probability: float | None
    segments: list[Segment]
    engine: str
    model: str
    duration_s: float  # audio length
    transcribe_s: float  # wall time of the transcription alone
    biased: bool  # whether the medical lexicon steered decoding and corrected near-miss terms
    corrections: list[Correction] = field(default_factory=list)  # lexicon terms restored after decoding

    @property
    def rtf(self) -> float:
        """Real-time factor: seconds of compute per second of audio."""
        return self.transcribe_s / self.duration_s if self.duration_s else math.nan

    def to_dict(self) -> dict:
        out = asdict(self)
        out["rtf"] = round(self.rtf, 4)
        return out


class Transcriber(ABC):
    engine: str
    model_id: str
    model_source: str
    d_model: int  # width of the encoder output

    @abstractmethod
    def _transcribe(self, samples: np.ndarray, language: str | None, lexicon: Lexicon | None
                    ) -> tuple[str, float | None, list[Segment]]:
        """(language, its probability or None, segments)."""

    @abstractmethod
    def _encode_windows(self, windows: list[np.ndarray]) -> np.ndarray:
        """Up to 30 s of samples each -> (W, 1500, d_model) float32 encoder states (each window padded to 30 s)."""

    def transcribe(self, audio: Audio | np.ndarray, *, language: str | None = None,
                   lexicon: Lexicon | None = CLINICAL_LEXICON) -> Transcript:
        """Transcribe a decoded note; `lexicon=None` turns medical biasing and term correction off."""
        samples = _samples(audio)
        t0 = time.perf_counter()
        lang, prob, segments = self._transcribe(samples, language, lexicon)
        corrections: list[Correction] = []
        if lexicon is not None:
            for seg in segments:
                seg.text, fixed = correct_terms(seg.text, lexicon.terms)
                corrections += fixed
        elapsed = time.perf_counter() - t0
        text = " ".join(s.text.strip() for s in segments if s.text.strip())
        return Transcript(text=text, language=lang, language_probability=prob, segments=segments, engine=self.engine,
                          model=self.model_id, duration_s=round(len(samples) / SAMPLE_RATE, 3),
                          transcribe_s=round(elapsed, 4), biased=lexicon is not None, corrections=corrections)

    def encode(self, audio: Audio | np.ndarray) -> np.ndarray:
        """Encoder output for the whole note: (T, d_model) float32, one row per 20 ms, padding frames dropped."""
        samples = _samples(audio)
        windows = [samples[i: i + WINDOW_SAMPLES] for i in range(0, len(samples), WINDOW_SAMPLES)]
        states = self._encode_windows(windows)  # (W, 1500, d_model)
        keep = max(1, math.ceil(len(samples) / FRAME_SAMPLES))
        return states.reshape(-1, states.shape[-1])[:keep]  # (T, d_model)


class FasterWhisperTranscriber(Transcriber):
    engine = "faster-whisper"

    def __init__(self, model: ResolvedModel, device: str = "cpu", compute_type: str | None = None,
                 cpu_threads: int | None = None, beam_size: int = BEAM_SIZE):
        try:
            import ctranslate2
            from faster_whisper import WhisperModel
        except ImportError as exc:
            raise EngineError("faster-whisper is not installed: pip install 'mmcore[speech]'") from exc
        self.device = device
        self.compute_type = compute_type or ("float16" if device.startswith("cuda") else "int8")
        self.model_id = model.model_id
        self.model_source = model.source  # explicit, env, cache, offline-package or download
        self.beam_size = beam_size
        index = int(device.split(":")[1]) if ":" in device else 0
        kind = device.split(":")[0]
        try:
            self.model = WhisperModel(model.location, device=kind, device_index=index,
                                      compute_type=self.compute_type, cpu_threads=cpu_threads or _cpu_count())
        except (ValueError, RuntimeError) as exc:  # unsupported compute type, or a folder CTranslate2 cannot read
            supported = ", ".join(sorted(ctranslate2.get_supported_compute_types(kind)))
            raise EngineError(f"{model.location}: faster-whisper cannot load it with compute type "
                              f"{self.compute_type!r} on {device} ({' '.join(str(exc).split())}); this device "
                              f"supports {supported}") from exc
        self._d_model: int | None = None

    @property
    def d_model(self) -> int:
        """CTranslate2 does not expose the encoder width, so it is read off one encoded window of silence."""
        if self._d_model is None:
            self._encode_windows([np.zeros(FRAME_SAMPLES, np.float32)])
        return self._d_model

    def _transcribe(self, samples, language, lexicon):
        if len(samples) > WINDOW_SAMPLES:
            return self._transcribe_windows(samples, language, lexicon)
        from faster_whisper.audio import pad_or_trim
        from faster_whisper.tokenizer import Tokenizer

        features = self.model.feature_extractor(samples)  # (n_mels, frames + 1): the last frame is padding
        frames = features.shape[-1] - 1  # 100 per second
        features = features[:, :frames]
        window = min(self.model.feature_extractor.nb_max_frames, math.ceil(frames + WINDOW_MARGIN_S * 100))
        encoder_output = self.model.encode(pad_or_trim(features, window))  # (1, window / 2, d_model)
        probability = None
        if language is None:
            if not self.model.model.is_multilingual:
                language, probability = "en", 1.0
            else:
                token, probability = self.model.model.detect_language(encoder_output)[0][0]  # most likely first
                language = token[2:-2]  # "<|en|>" -> "en"
        tokenizer = Tokenizer(self.model.hf_tokenizer, self.model.model.is_multilingual, task="transcribe",
                              language=language)
        text = self._decode(encoder_output, tokenizer, lexicon)
        if _compression_ratio(text) > MAX_COMPRESSION_RATIO:  # a loop: decode again from the full 30 s window
            text = self._decode(self.model.encode(pad_or_trim(features)), tokenizer, lexicon)
        segments = [Segment(0.0, round(len(samples) / SAMPLE_RATE, 3), text)] if text else []
        return language, None if probability is None else round(float(probability), 4), segments

    def _decode(self, encoder_output, tokenizer, lexicon) -> str:
        """Beam search at temperature 0 over text tokens only (no timestamps), after the lexicon's hot words and
        prompt, as faster-whisper builds them."""
        from faster_whisper.transcribe import get_suppressed_tokens

        previous = tokenizer.encode(" " + lexicon.initial_prompt.strip()) if lexicon else []
        prompt = self.model.get_prompt(tokenizer, previous, without_timestamps=True,
                                       hotwords=lexicon.hotwords if lexicon else None)
        result = self.model.model.generate(
            encoder_output, [prompt], beam_size=self.beam_size, max_length=self.model.max_length,
            suppress_blank=True, suppress_tokens=list(get_suppressed_tokens(tokenizer, [-1])))[0]
        return tokenizer.decode(result.sequences_ids[0]).strip()

    def _transcribe_windows(self, samples, language, lexicon):
        """Notes over 30 s: faster-whisper's own loop over 30 s windows, each conditioned on the text before it."""
        # Text tokens only, so one segment per 30 s window: timestamp tokens cost decoding steps, and without them
        # the noisy dictations came out with fewer errors (measured together with the hot words; docs/speech.md).
        segments, info = self.model.transcribe(
            samples, language=language, beam_size=self.beam_size, temperature=list(TEMPERATURES),
            without_timestamps=True, vad_filter=False,
            initial_prompt=lexicon.initial_prompt if lexicon else None,
            hotwords=lexicon.hotwords if lexicon else None)
        out = [Segment(round(s.start, 3), round(s.end, 3), s.text.strip()) for s in segments]  # decoding happens here
        return info.language, round(float(info.language_probability), 4), out

    def _encode_windows(self, windows):
        import ctranslate2
        from faster_whisper.audio import pad_or_trim

        # log-mel of the real samples, then padded to 3000 frames: the same input faster-whisper's decoder sees
        mels = np.stack([pad_or_trim(self.model.feature_extractor(w)) for w in windows])  # (W, n_mels, 3000)
        storage = ctranslate2.StorageView.from_array(np.ascontiguousarray(mels, dtype=np.float32))
        states = np.asarray(self.model.model.encode(storage, to_cpu=True), dtype=np.float32)  # (W, 1500, d_model)
        self._d_model = states.shape[-1]
        return states


class OpenAIWhisperTranscriber(Transcriber):
    engine = "openai-whisper"

    def __init__(self, model: ResolvedModel, device: str = "cpu", beam_size: int = BEAM_SIZE,
                 temperature: tuple[float, ...] = TEMPERATURES):
        try:
            import whisper
        except ImportError as exc:
            raise EngineError("openai-whisper is not installed: pip install 'mmcore[whisper-openai]'") from exc
        self.device = device
        self.model_id = model.model_id
        self.model_source = model.source  # explicit, env, cache, offline-package or download
        self.beam_size = beam_size
        self.temperature = temperature
        try:
            self.model = whisper.load_model(model.location, device=device)
        except (RuntimeError, KeyError, TypeError, ValueError, EOFError, pickle.UnpicklingError) as exc:
            raise EngineError(f"{model.location}: not a loadable openai-whisper checkpoint ({exc})") from exc
        self.d_model = self.model.dims.n_audio_state

    def _transcribe(self, samples, language, lexicon):
        prompt = lexicon.initial_prompt if lexicon else None  # this engine has no hot words; the prompt carries the terms
        result = self.model.transcribe(samples, language=language, initial_prompt=prompt, beam_size=self.beam_size,
                                       temperature=self.temperature, fp16=self.device.startswith("cuda"),
                                       verbose=None)
        out = [Segment(round(float(s["start"]), 3), round(float(s["end"]), 3), s["text"].strip())
               for s in result["segments"]]
        return result["language"], None, out

    def _encode_windows(self, windows):
        import torch
        import whisper

        with torch.inference_mode():
            mels = torch.stack([whisper.log_mel_spectrogram(whisper.pad_or_trim(torch.from_numpy(w)),
                                                            n_mels=self.model.dims.n_mels)
                                for w in windows]).to(self.model.device)  # (W, n_mels, 3000)
            states = self.model.embed_audio(mels.to(next(self.model.parameters()).dtype))
        return states.float().cpu().numpy()


def load_transcriber(engine: str = "faster-whisper", model: str | None = None, device: str = "auto",
                     compute_type: str | None = None, cpu_threads: int | None = None) -> Transcriber:
    """Resolve the model (see `pipelines.speech.models`) and load it on `device` (auto/cpu/cuda/cuda:N)."""
    if engine not in ENGINES:
        raise EngineError(f"--engine: expected one of {', '.join(ENGINES)}, found {engine!r}")
    from mmcore.device import resolve_device

    device_name = str(resolve_device(device))
    resolved = resolve_model(engine, model)
    if engine == "faster-whisper":
        return FasterWhisperTranscriber(resolved, device_name, compute_type, cpu_threads)
    if compute_type is not None:
        raise EngineError("--compute-type applies to faster-whisper only")
    return OpenAIWhisperTranscriber(resolved, device_name)


def _samples(audio: Audio | np.ndarray) -> np.ndarray:
    samples = audio.samples if isinstance(audio, Audio) else np.asarray(audio, dtype=np.float32)
    if samples.ndim != 1 or samples.size == 0:
        raise ValueError(f"audio: expected a non-empty 1-D array of 16 kHz samples, found shape {samples.shape}")
    return samples.astype(np.float32, copy=False)


def _compression_ratio(text: str) -> float:
    """Bytes of text / bytes gzipped: repeated phrases compress well, so a decoding loop shows a high ratio."""
    raw = text.encode("utf-8")
    return len(raw) / len(zlib.compress(raw)) if raw else 0.0


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1
