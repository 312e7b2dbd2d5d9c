"""`mmcore ct phantom | info | measure | report` and `mmcore eval ct-measure | ct-report`.

Only the standard library is imported here; numpy / pydicom / scipy load inside the handlers so `mmcore --help` and
`mmcore ct info` start fast.
"""

from __future__ import annotations

import argparse
import sys

from apps.commands import add_device_argument


def register(subparsers) -> None:
    p = subparsers.add_parser("ct", help="CT: DICOM ingest, synthetic phantoms, quantitative findings")
    ct = p.add_subparsers(dest="ct_command", metavar="COMMAND", parser_class=type(p))
    ct.required = True

    ph = ct.add_parser("phantom", help="write a synthetic chest CT series with ground_truth.json")
    ph.add_argument("out_dir", metavar="OUT_DIR", help="new or empty folder for the DICOM files")
    ph.add_argument("--seed", type=int, required=True, help="random seed (same seed, same phantom)")
    ph.add_argument("--findings", default=None,
                    help="comma list of nodule, pleural_effusion, pericardial_effusion, emphysema, consolidation, "
                         "cardiomegaly, calcified_granuloma; or none (default: a realistic mix drawn from the seed)")
    ph.add_argument("--slices", type=int, default=128, help="number of slices (default 128)")
    ph.add_argument("--size", type=int, default=512, help="in-plane matrix in pixels (default 512)")
    ph.add_argument("--thickness", type=float, default=2.5, help="slice thickness and spacing in mm (default 2.5)")
    ph.add_argument("--json", action="store_true", help="print the ground truth as JSON")
    ph.set_defaults(handler=cmd_phantom)

    info = ct.add_parser("info", help="list the series in a DICOM folder / files / zip and the one ingest would pick")
    add_series_arguments(info)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(handler=cmd_info)

    me = ct.add_parser("measure", help="ingest a CT series and measure nodules, effusions, emphysema")
    add_series_arguments(me)
    me.add_argument("--json", action="store_true", help="print one JSON object")
    me.add_argument("--png", default=None, metavar="DIR", help="also write one PNG per finding (lung window, box)")
    me.set_defaults(handler=cmd_measure)

    rp = ct.add_parser("report", help="draft a structured report: ingest, measure, report model, grounding, exports")
    add_series_arguments(rp)
    rp.add_argument("--voice", default=None, metavar="AUDIO",
                    help="voice note (wav, mp3, ogg/opus, webm, m4a, flac): transcript and audio tokens")
    writer = rp.add_mutually_exclusive_group()
    writer.add_argument("--model", default=None, metavar="CKPT",
                        help="report checkpoint folder (default: data/checkpoints/ct-report)")
    writer.add_argument("--template", action="store_true",
                        help="draft with the deterministic template writer instead of the report model")
    rp.add_argument("--json", action="store_true", help="print the report as JSON")
    rp.add_argument("--pdf", default=None, metavar="PATH", help="also write the PDF")
    rp.add_argument("--sr", default=None, metavar="PATH", help="also write a DICOM SR (TID 1500)")
    rp.add_argument("--fhir", default=None, metavar="PATH", help="also write a FHIR R4B DiagnosticReport")
    rp.add_argument("--out", default=None, metavar="PATH", help="also write the report JSON to this file")
    rp.add_argument("--deidentify", action="store_true",
                    help="apply the DICOM PS3.15 basic profile to the printed report and every export")
    add_device_argument(rp)
    rp.set_defaults(handler=cmd_report)


def add_series_arguments(parser) -> None:
    """The input every series command takes: a folder, files or a zip, and an optional series override."""
    parser.add_argument("input", metavar="INPUT", nargs="+", help="folder, DICOM file(s) or zip")
    parser.add_argument("--series", default=None, metavar="UID", help="pick this SeriesInstanceUID")


def register_eval(subparsers) -> None:
    ev = subparsers.add_parser("ct-measure", help="measurement accuracy on held-out synthetic phantoms")
    ev.add_argument("--n", type=int, default=30, help="number of phantoms (default 30)")
    ev.add_argument("--size", type=int, default=256, help="in-plane matrix (default 256)")
    ev.add_argument("--slices", type=int, default=96, help="slices per phantom (default 96)")
    ev.add_argument("--thickness", type=float, default=2.5, help="slice thickness in mm (default 2.5)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(handler=cmd_eval)

    er = subparsers.add_parser("ct-report", help="report model on held-out phantoms: finding F1, ablations, BLEU")
    er.add_argument("checkpoint", metavar="CKPT", help="report checkpoint folder (e.g. data/checkpoints/ct-report)")
    er.add_argument("--n", type=int, default=100, help="number of phantoms (default 100)")
    er.add_argument("--size", type=int, default=256, help="in-plane matrix (default 256)")
    er.add_argument("--slices", type=int, default=96, help="slices per phantom (default 96)")
    er.add_argument("--thickness", type=float, default=2.5, help="slice thickness in mm (default 2.5)")
    er.add_argument("--json", action="store_true", help="print one JSON object")
    add_device_argument(er)
    er.set_defaults(handler=cmd_eval_report)


def _source(inputs: list[str]):
    return inputs[0] if len(inputs) == 1 else inputs


def cmd_phantom(args: argparse.Namespace) -> int:
    from apps.commands import print_json
    from pipelines.ct.phantom import PhantomConfig, make_phantom, parse_findings, write_phantom

    cfg = PhantomConfig(size=args.size, slices=args.slices, thickness_mm=args.thickness)
    try:
        cfg.validate()
    except ValueError as exc:
        from pipelines.ct.errors import PhantomError

        raise PhantomError(f"--{str(exc).split(':')[0].replace('_mm', '')}: {str(exc).split(':', 1)[1].strip()}") from exc
    phantom = make_phantom(args.seed, parse_findings(args.findings), cfg)
    out = write_phantom(phantom, args.out_dir)
    if args.json:
        print_json(phantom.ground_truth)
    else:
        kinds = ", ".join(f["type"] for f in phantom.ground_truth["findings"]) or "none (normal chest)"
        print(f"wrote {cfg.slices} slices ({cfg.size} x {cfg.size}, {cfg.thickness_mm:g} mm) to {out}; findings: {kinds}")
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    from apps.commands import print_json
    from pipelines.ct.dicom import scan

    result = scan(_source(args.input), series_uid=args.series).to_dict()
    if args.json:
        print_json(result)
        return 0
    picked = result["picked"]
    for s in result["series"]:
        mark = "*" if s["series_uid"] == picked["series_uid"] else " "
        print(f"{mark} {s['modality'] or '?':4} {s['n_files']:5d} files  {s['series_uid']}  {s['description']}")
    print(f"picked: shape {picked['shape']} (z, y, x), spacing {picked['spacing_mm']} mm")
    for w in result["warnings"]:
        print(f"warning: {w}")
    if result["skipped"]:
        print(f"skipped {len(result['skipped'])} file(s), e.g. {result['skipped'][0]['path']}: "
              f"{result['skipped'][0]['reason']}")
    return 0


def cmd_measure(args: argparse.Namespace) -> int:
    from apps.commands import print_json
    from pipelines.ct.dicom import ingest
    from pipelines.ct.measure import measure

    loaded = ingest(_source(args.input), series_uid=args.series)
    findings = measure(loaded.volume)
    result = findings.to_dict()
    result["warnings"] = loaded.warnings
    if args.png:
        from pathlib import Path

        from pipelines.ct.render import render_slice_png

        out = Path(args.png)
        out.mkdir(parents=True, exist_ok=True)
        for i, f in enumerate(findings.findings):
            if f.center_voxel is None:
                continue
            z0, y0, x0, z1, y1, x1 = f.bbox_zyx
            render_slice_png(loaded.volume, f.center_voxel[0], out / f"finding{i:02d}_{f.type}.png",
                             window="lung" if f.type in ("nodule", "calcified_granuloma") else "soft_tissue",
                             boxes=[(y0 - 2, x0 - 2, y1 + 1, x1 + 1)])
    if args.json:
        print_json(result)
        return 0
    lungs = result["lungs"]
    print(f"lungs: right {lungs['right_volume_ml']:.0f} mL, left {lungs['left_volume_ml']:.0f} mL, "
          f"LAA-950 {lungs['laa950_percent']:.1f}%")
    for f in result["findings"]:
        size = f" {f['diameter_mm']:.1f} mm" if "diameter_mm" in f else ""
        vol = f" {f['volume_ml']:.1f} mL" if "volume_ml" in f and "diameter_mm" not in f else ""
        where = " ".join(str(f[k]) for k in ("side", "lobe") if f.get(k))
        print(f"- {f['type']}{size}{vol} {where} {f.get('composition', '')}".rstrip())
    for w in loaded.warnings:
        print(f"warning: {w}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from apps.commands.eval import report_metrics
    from pipelines.ct.evaluate import evaluate

    if args.n < 1:
        from mmcore.errors import InputError

        raise InputError(f"--n: expected at least 1 phantom, found {args.n}")

    def progress(i, n, case):
        print(f"phantom {i}/{n} (seed {case.seed}) {case.seconds:.1f} s", file=sys.stderr, flush=True)

    metrics = evaluate(args.n, args.size, args.slices, args.thickness, progress=progress)
    report_metrics(metrics, args.json, f"ct-measure on {metrics['n_phantoms']} held-out phantoms ({metrics['phantom']})")
    return 0


def load_writer(checkpoint: str | None, template: bool, device: str):
    """The report model to draft with, or None for the template writer (forced, or no checkpoint shipped)."""
    from pipelines.ct.report_model import DEFAULT_CHECKPOINT, ReportModel

    if template:
        return None
    if checkpoint is None:
        if not (DEFAULT_CHECKPOINT / "model.safetensors").is_file():
            print(f"note: no report model at {DEFAULT_CHECKPOINT}; drafting with the template writer",
                  file=sys.stderr)
            return None
        checkpoint = DEFAULT_CHECKPOINT
    return ReportModel.load(checkpoint, device=device)


def load_speech(device: str):
    """The offline speech model, or None (the report then carries a voice_note flag saying so)."""
    from pipelines.speech.engines import load_transcriber
    from pipelines.speech.errors import SpeechError

    try:
        return load_transcriber("faster-whisper", device=device)
    except SpeechError as exc:
        print(f"note: voice note not transcribed: {exc}", file=sys.stderr)
        return None


def cmd_report(args: argparse.Namespace) -> int:
    from pathlib import Path

    from apps.commands import print_json
    from pipelines.ct import exports
    from pipelines.ct.report import draft_report

    if args.voice is not None and not Path(args.voice).is_file():
        from mmcore.errors import InputError

        raise InputError(f"--voice: {args.voice}: no such file")
    writer = load_writer(args.model, args.template, args.device)
    transcriber = load_speech(args.device) if args.voice else None
    report, ingested = draft_report(_source(args.input), series_uid=args.series, voice=args.voice,
                                    transcriber=transcriber, writer=writer)
    deidentifier = None
    evidence = [i.header for i in ingested.scan.picked.instances]
    shown = report
    if args.deidentify:
        from pipelines.ct.deid import Deidentifier

        # One key for the printed report and every export, so their UIDs and pseudonyms agree; the exports get the
        # original report and de-identify it (and the SR's evidence) themselves.
        deidentifier = Deidentifier()
        shown = deidentifier.deidentify_report(report, evidence[0] if evidence else None)
    written = exports.export_all(report, json_path=args.out, pdf_path=args.pdf, sr_path=args.sr,
                                 fhir_path=args.fhir, volume=ingested.volume, evidence=evidence,
                                 deidentifier=deidentifier)
    if args.json:
        print_json(shown.model_dump(mode="json"))
    else:
        print(report_summary(shown))
    for kind, path in written.items():
        print(f"wrote {kind}: {path}", file=sys.stderr)
    return 0


def report_summary(report) -> str:
    """The draft as a clinician reads it: critical results first, then flags, findings and impression."""
    lines = [f"CT report ({report.status}, {report.model.id}) for {report.patient.name or report.patient.id or '?'}"]
    lines += [f"CRITICAL: {c.message}" for c in report.critical]
    lines += [f"check: [{f.kind}] {f.message}" for f in report.flags]
    if report.indication.text:
        lines.append(f"Indication: {report.indication.text}")
    lines.append(report.findings.text())
    lines.append(f"Impression: {report.impression}")
    if report.recommendation:
        lines.append(f"Recommendation: {report.recommendation}")
    for m in report.measurements:
        lines.append(f"  {m.label()}")
    return "\n".join(lines)


def cmd_eval_report(args: argparse.Namespace) -> int:
    from apps.commands.eval import report_metrics
    from mmcore.errors import InputError
    from pipelines.ct.report_eval import evaluate

    if args.n < 1:
        raise InputError(f"--n: expected at least 1 phantom, found {args.n}")

    def progress(i, n, seed, seconds):
        print(f"phantom {i}/{n} (seed {seed}) {seconds:.1f} s", file=sys.stderr, flush=True)

    metrics = evaluate(args.checkpoint, args.n, args.size, args.slices, args.thickness, device=args.device,
                       progress=progress)
    report_metrics(metrics, args.json, f"ct-report on {metrics['n_phantoms']} held-out phantoms ({metrics['phantom']})")
    return 0
