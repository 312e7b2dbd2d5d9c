"""Real-time factor of Whisper base on clinical voice notes of 10-20 s: faster-whisper int8 vs float32, and
openai-whisper when its base checkpoint is on this machine (it is never downloaded here).

RTF = transcription wall time / audio duration (lower is faster; 0.15 means a 20 s note takes 3 s). The notes are
espeak-ng dictations of the evaluation sentences, transcribed as the app does (medical biasing and term correction
on); timings are medians of interleaved repeats with the model loaded once. Wall time depends on whatever else the
machine runs, so the process CPU time per audio second and the load average before and after are reported too.
"""

from __future__ import annotations

import os
import statistics
import time

GOALS = {"rtf_int8": ("<=", 0.15)}
LIBRARIES = ("faster-whisper", "ctranslate2", "openai-whisper", "torch", "av")
NOTE_SECONDS = (10.0, 20.0)


def add_arguments(parser) -> None:
    parser.add_argument("--notes", type=int, default=3, help="voice notes of 10-20 s each (default: 3)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per engine (default: 3)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all available)")


def build_notes(n: int) -> list[tuple[str, "object"]]:
    """`n` notes, each 10-20 s: consecutive evaluation sentences read by alternating voices."""
    from pipelines.speech.audio import SAMPLE_RATE
    from pipelines.speech.dictation import CLINICAL_SENTENCES, VOICES, clinical_note

    notes, start = [], 0
    for i in range(n):
        count = 1
        while True:  # add sentences (3-5 s each) until the note reaches 10 s; it stays well under 20 s
            sentences = tuple(CLINICAL_SENTENCES[(start + k) % len(CLINICAL_SENTENCES)] for k in range(count))
            text, samples = clinical_note(sentences, voice=VOICES[i % len(VOICES)], speed_wpm=160)
            if len(samples) / SAMPLE_RATE >= NOTE_SECONDS[0]:
                break
            count += 1
        if len(samples) / SAMPLE_RATE > NOTE_SECONDS[1]:
            raise RuntimeError(f"benchmark speech: note {i} is {len(samples) / SAMPLE_RATE:.1f} s, over 20 s")
        notes.append((text, samples))
        start += count
    return notes


def run(args) -> dict:
    from benchmarks.harness import time_interleaved
    from pipelines.speech.dictation import espeak_path
    from pipelines.speech.engines import FasterWhisperTranscriber, OpenAIWhisperTranscriber
    from pipelines.speech.errors import ModelNotFoundError, SpeechError
    from pipelines.speech.evaluate import wer
    from pipelines.speech.models import resolve_model

    if espeak_path() is None:
        raise SystemExit("benchmark speech: espeak-ng is not installed (apt-get install espeak-ng)")
    threads = args.threads or len(os.sched_getaffinity(0))
    notes = build_notes(args.notes)
    audio_s = sum(len(s) for _, s in notes) / 16000
    base = resolve_model("faster-whisper", "base")
    engines = {"int8": FasterWhisperTranscriber(base, "cpu", "int8", threads),
               "float32": FasterWhisperTranscriber(base, "cpu", "float32", threads)}
    openai_note = None
    try:
        local = resolve_model("openai-whisper", "base", allow_download=False)
        import torch

        torch.set_num_threads(threads)
        engines["openai_whisper"] = OpenAIWhisperTranscriber(local, "cpu")
    except ModelNotFoundError:
        openai_note = "not measured: no local openai-whisper base checkpoint (base.pt in the mmcore or whisper cache)"
    except (SpeechError, ImportError) as exc:
        openai_note = f"not measured: {exc}"

    texts: dict[str, list[str]] = {}
    cpu_s: dict[str, list[float]] = {name: [] for name in engines}  # process CPU time per pass: immune to other load

    def transcribe_all(name):
        def fn():
            t0 = time.process_time()
            texts[name] = [engines[name].transcribe(samples, language="en").text for _, samples in notes]
            cpu_s[name].append(time.process_time() - t0)
        return fn

    load_before = os.getloadavg()[0]
    times = time_interleaved({name: transcribe_all(name) for name in engines}, repeats=args.repeats, warmup=1)
    load_after = os.getloadavg()[0]
    refs = [t for t, _ in notes]
    metrics = {
        "rtf_int8": round(times["int8"] / audio_s, 4),
        "rtf_float32": round(times["float32"] / audio_s, 4),
        "int8_speedup": round(times["float32"] / times["int8"], 3),
        # CPU seconds per audio second over all threads; divided by the thread count it is the RTF an idle machine
        # would show, which the wall-clock RTF only matches when nothing else runs
        "cpu_rtf_int8": round(statistics.median(cpu_s["int8"]) / audio_s / threads, 4),
        "cpu_rtf_float32": round(statistics.median(cpu_s["float32"]) / audio_s / threads, 4),
        "rtf_openai_whisper": round(times["openai_whisper"] / audio_s, 4) if "openai_whisper" in times else None,
        "openai_whisper": openai_note or f"base checkpoint {engines['openai_whisper'].model_id}",
        "wer_int8": round(wer(refs, texts["int8"]), 4),
        "wer_float32": round(wer(refs, texts["float32"]), 4),
        "notes": len(notes),
        "note_seconds": [round(len(s) / 16000, 1) for _, s in notes],
        "threads": threads,
        # 1-minute load average (runnable processes) on this machine; above `threads` the wall-clock RTFs are
        # inflated by other work, and the CPU-time RTFs are the ones to compare
        "load_avg_before": round(load_before, 2),
        "load_avg_after": round(load_after, 2),
        "model": f"whisper base ({base.source})",
    }
    if "openai_whisper" in texts:
        metrics["wer_openai_whisper"] = round(wer(refs, texts["openai_whisper"]), 4)
    return metrics
