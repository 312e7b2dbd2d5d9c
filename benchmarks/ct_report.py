"""End to end draft report: a 128-slice 512 x 512 phantom series (DICOM files) to a finished, grounded draft.

Stages (seconds, medians over the repeats): ingest, measure, encode (volume to the model's grid), generate (the
report model's narrative), ground (report assembly, critical rules, grounding) and voice (decode + transcription +
Whisper features of a ~15 s espeak-ng dictation, run on a second thread while ingest and measurement go on).
Models are loaded once before timing (warm). The peer is the same pipeline with the template writer instead of the
report model, measured in the same run: model_vs_template_time_ratio says what the model costs end to end.
"""

from __future__ import annotations

import statistics
import tempfile
import time
import wave
from pathlib import Path

GOALS = {
    "median_s": ("<=", 2.0),
    "median_with_voice_s": ("<=", 4.0),
}
LIBRARIES = ("torch", "numpy", "pydicom", "scipy", "faster_whisper", "ctranslate2")
VOICE_SECONDS = 15.0


def add_arguments(parser) -> None:
    parser.add_argument("--slices", type=int, default=128)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--seed", type=int, default=4242)
    parser.add_argument("--checkpoint", default=None, help="report checkpoint (default data/checkpoints/ct-report)")


def _voice_note(path: Path) -> float | None:
    """Write a ~15 s dictation as 16-bit wav; its length in seconds, or None without espeak-ng."""
    import numpy as np

    from pipelines.speech.dictation import CLINICAL_SENTENCES, clinical_note, espeak_path

    if espeak_path() is None:
        return None
    sentences: list[str] = []
    samples = np.zeros(0, np.float32)
    for sentence in CLINICAL_SENTENCES:
        sentences.append(sentence)
        _, samples = clinical_note(tuple(sentences), speed_wpm=150)
        if len(samples) >= VOICE_SECONDS * 16000:
            break
    pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2")
    with wave.open(str(path), "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(16000)
        out.writeframes(pcm.tobytes())
    return len(samples) / 16000


def run(args) -> dict:
    from pipelines.ct.phantom import PhantomConfig, make_phantom, write_series
    from pipelines.ct.report import draft_report
    from pipelines.ct.report_model import DEFAULT_CHECKPOINT, ReportModel

    writer = ReportModel.load(args.checkpoint or DEFAULT_CHECKPOINT)
    phantom = make_phantom(args.seed, ["nodule", "pleural_effusion", "emphysema"],
                           PhantomConfig(size=args.size, slices=args.slices, thickness_mm=2.5))
    with tempfile.TemporaryDirectory(prefix="mmcore-bench-ct-report-") as tmp:
        series = Path(tmp) / "series"
        write_series(phantom.volume, series)
        del phantom
        note = Path(tmp) / "note.wav"
        voice_s = _voice_note(note)
        transcriber = None
        if voice_s is not None:
            from pipelines.speech.engines import load_transcriber

            transcriber = load_transcriber("faster-whisper", device="cpu")

        def once(with_writer: bool, voice: bool) -> tuple[float, dict]:
            stages: dict = {}
            t0 = time.perf_counter()
            report, _ = draft_report(series, writer=writer if with_writer else None,
                                     voice=note if voice else None, transcriber=transcriber if voice else None,
                                     stages=stages)
            elapsed = time.perf_counter() - t0
            if with_writer and report.model.id != writer.model_id:
                raise RuntimeError(f"the draft was not written by the report model: {report.flags}")
            return elapsed, stages

        once(True, voice_s is not None)  # warm-up: first-call allocations, thread pools, page cache
        runs = {"model": [], "template": [], "voice": []}
        for _ in range(args.repeats):  # interleaved so drift in machine load hits every variant alike
            runs["model"].append(once(True, False))
            runs["template"].append(once(False, False))
            if voice_s is not None:
                runs["voice"].append(once(True, True))

    def median(rows, key=None):
        values = [r[0] if key is None else r[1].get(key, 0.0) for r in rows]
        return round(statistics.median(values), 4) if values else None

    stage_names = ("ingest", "measure", "encode", "generate", "ground")
    median_s = median(runs["model"])
    template_s = median(runs["template"])
    return {
        "median_s": median_s,
        "median_with_voice_s": median(runs["voice"]),
        "stages": {name: median(runs["model"], name) for name in stage_names},
        "stages_with_voice": {name: median(runs["voice"], name) for name in (*stage_names, "voice")}
        if runs["voice"] else None,
        "template_median_s": template_s,
        "model_vs_template_time_ratio": round(median_s / template_s, 3) if template_s else None,
        "voice_note_s": round(voice_s, 1) if voice_s else None,
        "series": f"{args.slices} x {args.size} x {args.size}",
        "model": writer.model_id,
        "repeats": args.repeats,
    }
