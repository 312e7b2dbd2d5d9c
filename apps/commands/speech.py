"""`mmcore transcribe AUDIO` and `mmcore eval speech`: voice notes through Whisper.

Only the standard library is imported here; PyAV, CTranslate2 and torch load inside the handlers.
"""

from __future__ import annotations

import logging
import time

from apps.commands import add_device_argument, print_json

ENGINE_CHOICES = ("faster-whisper", "openai-whisper")
MODEL_HELP = ("CTranslate2 folder, openai-whisper .pt file or model name (default: $MMCORE_WHISPER_MODEL, then the "
              "local cache, then the offline base model, then a download by name when online)")

log = logging.getLogger("mmcore.speech")


def register(subparsers) -> None:
    p = subparsers.add_parser("transcribe", help="transcribe a voice note (wav, mp3, ogg/opus, webm, m4a, flac)")
    p.add_argument("audio", metavar="AUDIO", help="the recording")
    _add_engine_arguments(p)
    p.add_argument("--language", default=None, help="ISO code such as en (default: detected)")
    p.add_argument("--no-bias", action="store_true", help="do not steer decoding with the medical lexicon")
    p.add_argument("--max-seconds", type=float, default=300.0, help="longest recording accepted (default: 300)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_transcribe)


def register_eval(evals) -> None:
    p = evals.add_parser("speech", help="WER and medical-term recall on synthesised clinical dictations")
    _add_engine_arguments(p)
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="evaluate N dictations spread over all conditions (default: all)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(handler=cmd_eval_speech)


def _add_engine_arguments(p) -> None:
    p.add_argument("--engine", choices=ENGINE_CHOICES, default="faster-whisper",
                   help="transcription engine (default: faster-whisper)")
    p.add_argument("--model", default=None, help=MODEL_HELP)
    p.add_argument("--compute-type", default=None,
                   help="faster-whisper precision: int8, int8_float32, float16, float32 (default: int8 on CPU, "
                        "float16 on CUDA)")
    add_device_argument(p)


def cmd_transcribe(args) -> int:
    from mmcore.errors import InputError
    from pipelines.speech.audio import AudioLimits, decode_audio
    from pipelines.speech.engines import load_transcriber
    from pipelines.speech.lexicon import CLINICAL_LEXICON

    if not args.max_seconds > 0:
        raise InputError(f"--max-seconds: expected a positive number of seconds, found {args.max_seconds}")
    t0 = time.perf_counter()
    audio = decode_audio(args.audio, limits=AudioLimits(max_seconds=args.max_seconds))  # bad audio fails before loading
    decode_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    transcriber = load_transcriber(args.engine, args.model, args.device, args.compute_type)
    load_s = time.perf_counter() - t0
    transcript = transcriber.transcribe(audio, language=args.language,
                                        lexicon=None if args.no_bias else CLINICAL_LEXICON)
    out = transcript.to_dict()
    out["model_source"] = transcriber.model_source
    out["audio"] = {"source": audio.source, "codec": audio.codec, "duration_s": round(audio.duration_s, 3),
                    "original_rate": audio.original_rate, "original_channels": audio.original_channels}
    out["timing"] = {"decode_s": round(decode_s, 4), "load_s": round(load_s, 3),
                     "transcribe_s": transcript.transcribe_s, "rtf": out["rtf"]}
    if args.json:
        print_json(out)
        return 0
    print(f"# {audio.source}: {audio.duration_s:.1f} s, {transcript.language}, {transcript.engine} "
          f"{transcript.model}, {transcript.transcribe_s:.1f} s")
    for seg in transcript.segments:
        print(f"[{seg.start:7.2f} -> {seg.end:7.2f}] {seg.text}")
    return 0


def cmd_eval_speech(args) -> int:
    from apps.commands.eval import report_metrics
    from mmcore.errors import InputError
    from pipelines.speech.dictation import dictation_set
    from pipelines.speech.engines import load_transcriber
    from pipelines.speech.evaluate import evaluate_dictations

    if args.limit is not None and args.limit <= 0:
        raise InputError(f"--limit: expected a positive number of dictations, found {args.limit}")
    transcriber = load_transcriber(args.engine, args.model, args.device, args.compute_type)
    dictations = dictation_set(limit=args.limit)

    def progress(done: int, total: int) -> None:
        log.info("eval speech: %d/%d dictations", done, total)

    metrics = evaluate_dictations(transcriber, dictations, progress=progress)
    report_metrics(metrics, args.json, f"speech evaluation ({metrics['n_dictations']} dictations)")
    return 0
