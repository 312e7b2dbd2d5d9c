"""CT studies for the API and the UI: upload -> ingest -> measure -> draft (through the model queues) -> store;
volumes back from the store for the viewer; edits and amendments with re-grounding; exports with an optional
de-identification."""

from __future__ import annotations

import logging
import secrets
import shutil
import tempfile
import threading
import zipfile
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from apps.server.inference import ModelQueue
from apps.server.settings import Settings
from apps.store import (Actor, InvalidTransition, NewSeries, ReportInfo, Store, StudyInfo, add_study, add_voice_note,
                        amend_report, create_draft_report, edit_draft, get_report, get_study, sign_report)
from mmcore.errors import InputError
from pipelines.ct.dicom import ArchiveLimits
from pipelines.ct.report_model import DEFAULT_CHECKPOINT

log = logging.getLogger("mmcore.server")
REPORT_CHECKPOINT = DEFAULT_CHECKPOINT
VOLUME_CACHE = 4  # studies whose volumes stay in memory for the viewer
FORMATS = {  # export name -> (media type, file suffix)
    "json": ("application/json", ".json"),
    "pdf": ("application/pdf", ".pdf"),
    "sr": ("application/dicom", ".dcm"),
    "fhir": ("application/fhir+json", ".fhir.json"),
}


class CTUploadError(InputError):
    """An upload that is not a CT series (names the file and what was found)."""


class ReportGenerator:
    """Drafts the narrative: the report model from `settings.report_checkpoint` (default data/checkpoints/ct-report/)
    when it loads, else the template writer (pipelines.ct.report); the report's `model` field records which one.
    The model is loaded once at start-up and shared by every request (the CT queue bounds concurrency)."""

    def __init__(self, checkpoint: Path | None = None):
        from pipelines.ct.report_model import ReportModel, ReportModelError

        self.checkpoint = Path(checkpoint) if checkpoint else REPORT_CHECKPOINT
        self.writer = None
        if (self.checkpoint / "model.safetensors").is_file():
            try:
                self.writer = ReportModel.load(self.checkpoint, device="cpu")
            except ReportModelError as exc:  # the application still drafts reports; the log says why not with it
                log.warning("report model not loaded, drafting with the template writer: %s", exc)
        else:
            log.warning("%s: no report checkpoint; drafting with the template writer", self.checkpoint)

    @property
    def model_id(self) -> str:
        return self.writer.model_id if self.writer is not None else "template"

    @property
    def checkpoint_sha256(self) -> str:
        return self.writer.sha256 if self.writer is not None else ""

    def draft(self, source, voice, transcriber):
        from pipelines.ct.report import draft_report

        return draft_report(source, voice=voice, transcriber=transcriber, writer=self.writer)


class QueuedTranscriber:
    """Loads the offline speech model on first use and runs every transcription through the speech queue; keeps
    the last transcript so the voice note can be stored with it."""

    def __init__(self, queue: ModelQueue, enabled: bool):
        self.queue, self.enabled = queue, enabled
        self._model = None
        self._lock = threading.Lock()
        self.engine, self.model_id = "faster-whisper", "base"

    def _load(self):
        from pipelines.speech.engines import load_transcriber

        with self._lock:
            if self._model is None:
                self._model = load_transcriber("faster-whisper", device="cpu")
                self.engine, self.model_id = self._model.engine, self._model.model_id
            return self._model

    def for_request(self):
        return None if not self.enabled else _RequestTranscriber(self)


class _RequestTranscriber:
    def __init__(self, owner: QueuedTranscriber):
        self.owner, self.transcript = owner, None

    def transcribe(self, audio):
        model = self.owner.queue.run(self.owner._load, stage="load")
        self.transcript = self.owner.queue.run(lambda: model.transcribe(audio), stage="transcribe")
        return self.transcript


def _apply_edits(report, findings: dict | None, impression: str | None, recommendation: str | None,
                 measurements: dict[str, dict] | None) -> None:
    """Clinician's changes to a CTReport: text sections, and measurements (marked edited, measured values kept);
    then the critical rules and grounding run again on the result."""
    from pipelines.ct.grounding import apply_grounding
    from pipelines.ct.report import DEFAULT_CRITICAL_RULES, Findings, ReportError, critical_results

    if findings is not None:
        if not isinstance(findings, dict):
            raise ReportError("findings: expected an object of section -> text")
        try:
            report.findings = Findings.model_validate({**report.findings.model_dump(), **findings})
        except Exception as exc:  # pydantic ValidationError: name the field
            raise ReportError(f"findings: {exc.errors()[0]['loc'][0] if hasattr(exc, 'errors') else ''} "
                              f"is not a report section or not text") from exc
    if impression is not None:
        report.impression = str(impression)
    if recommendation is not None:
        report.recommendation = str(recommendation)
    for mid, values in (measurements or {}).items():
        if not isinstance(values, dict):
            raise ReportError(f"measurements.{mid}: expected an object of field -> value")
        current = report.measurement(mid)
        changed = {k: v for k, v in values.items() if getattr(current, k, object()) != v}
        if changed:
            try:
                report.edit_measurement(mid, **changed)
            except ValueError as exc:
                raise ReportError(f"measurements.{mid}: {exc}") from exc
    # Edited sizes can cross a critical threshold (e.g. a nodule corrected to >= 30 mm): rules run again too.
    report.critical = critical_results(report.measurements, DEFAULT_CRITICAL_RULES)
    apply_grounding(report)


@dataclass
class UploadedFile:
    name: str  # the client's file name (for messages only; never used as a path)
    path: Path


class CTService:
    def __init__(self, store: Store, settings: Settings, ct_queue: ModelQueue, speech_queue: ModelQueue):
        self.store, self.settings = store, settings
        self.queue = ct_queue
        self.generator = ReportGenerator(settings.report_checkpoint)
        self.transcriber = QueuedTranscriber(speech_queue, settings.load_speech)
        self.limits = ArchiveLimits(max_total_bytes=min(4 * 1024**3, 8 * settings.max_request_bytes))
        self._volumes: OrderedDict[int, object] = OrderedDict()
        self._volume_lock = threading.Lock()
        self.deid_key = self._deid_key()

    def _deid_key(self) -> bytes:
        """A per-installation key: de-identified exports of one patient stay linkable across downloads."""
        path = self.settings.data_dir / "deid.key"
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp")
            tmp.write_bytes(secrets.token_bytes(32))
            tmp.chmod(0o600)
            tmp.replace(path)
        return path.read_bytes()

    # ------------------------------------------------------------------------------------------------ upload

    def scratch(self) -> Path:
        self.settings.upload_dir.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(prefix="ct-", dir=self.settings.upload_dir))

    def _expand(self, files: list[UploadedFile], work: Path) -> list[Path]:
        from pipelines.ct.dicom import extract_zip

        sources: list[Path] = []
        for i, f in enumerate(files):
            if zipfile.is_zipfile(f.path):
                dest = work / f"zip{i}"
                dest.mkdir()
                try:
                    extract_zip(f.path, dest, self.limits)
                except InputError as exc:
                    raise type(exc)(str(exc).replace(str(f.path), f.name)) from exc
                sources.append(dest)
            else:
                sources.append(f.path)
        return sources

    def upload(self, actor: Actor, files: list[UploadedFile], voice: UploadedFile | None = None, *,
               client: str | None = None, progress=None) -> tuple[StudyInfo, ReportInfo]:
        """Ingest, measure and draft first; only a complete draft is written to the store (nothing partial)."""
        from apps.server.auth import require_role

        require_role(actor, "clinician")
        if not files:
            raise CTUploadError("files: expected DICOM files or a zip of them, found none")
        work = self.scratch()
        try:
            step = progress or (lambda fraction, text: None)
            step(0.05, "unpacking")
            sources = self._expand(files, work)
            transcriber = self.transcriber.for_request()
            step(0.2, "reading the series, measuring and drafting")
            report, ingested = self.queue.run(
                lambda: self.generator.draft(sources, voice.path if voice else None, transcriber), stage="draft")
            step(0.8, "storing")
            return self._store(actor, report, ingested, voice, transcriber, client)
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def _store(self, actor, report, ingested, voice, transcriber, client) -> tuple[StudyInfo, ReportInfo]:
        from pipelines.ct.deid import Deidentifier

        plan = ingested.scan.picked
        meta = ingested.volume.metadata
        paths = list(dict.fromkeys(i.path for i in plan.instances))
        blobs = [self.store.put_blob(Path(p)) for p in paths]
        study_uid = meta.study_uid or plan.instances[0].study_uid
        pseudonym = Deidentifier(key=self.deid_key).pseudonym(meta.patient_id) if meta.patient_id else None
        study_date = meta.study_date if len(meta.study_date or "") == 8 and meta.study_date.isdigit() else None
        study = add_study(self.store, actor, study_uid,
                          [NewSeries(plan.series_uid, slice_count=len(plan.instances), blobs=blobs,
                                     description=(meta.series_description or "")[:255])],
                          description=(meta.study_description or "")[:255], patient_pseudonym=pseudonym,
                          study_date=study_date, client=client)
        if voice is not None:
            sha = self.store.put_blob(voice.path)
            t = getattr(transcriber, "transcript", None)
            add_voice_note(self.store, actor, study.id, sha,
                           t.to_dict() if t is not None else {"text": "", "note": "not transcribed"},
                           t.engine if t else self.transcriber.engine, t.model if t else self.transcriber.model_id,
                           language=t.language if t else None, duration_s=t.duration_s if t else None, client=client)
        content = report.model_dump(mode="json")
        info = create_draft_report(self.store, actor, study.id, content, model_id=self.generator.model_id,
                                   checkpoint_sha256=self.generator.checkpoint_sha256 or None, client=client)
        with self._volume_lock:
            self._volumes[study.id] = ingested
            while len(self._volumes) > VOLUME_CACHE:
                self._volumes.popitem(last=False)
        return study, info

    # ------------------------------------------------------------------------------------------------ reading

    def ingested(self, actor: Actor, study_id: int, *, client: str | None = None):
        """The study's series as an IngestResult (volume + headers), from memory or re-read from the store."""
        from pipelines.ct.dicom import ingest

        study = get_study(self.store, actor, study_id, client=client)  # permission check and audit
        with self._volume_lock:
            if study.id in self._volumes:
                self._volumes.move_to_end(study.id)
                return self._volumes[study.id]
        paths = [self.store.blob_path(sha) for s in study.series for sha in s.blobs]
        result = self.queue.run(lambda: ingest(paths), stage="ingest")
        with self._volume_lock:
            self._volumes[study.id] = result
            while len(self._volumes) > VOLUME_CACHE:
                self._volumes.popitem(last=False)
        return result

    def report(self, actor: Actor, report_id: int, *, client: str | None = None):
        """(ReportInfo, CTReport) with the store's status and signature applied to the report content."""
        from pipelines.ct.report import CTReport

        info = get_report(self.store, actor, report_id, client=client)
        report = CTReport.model_validate(info.content)
        if info.signer and report.signature is None:
            # The store holds the signature (a draft becomes final, an amendment stays amended); exports show it.
            report.sign(info.signer, when=info.signed_at)
        return info, report

    # ------------------------------------------------------------------------------------------------ changing

    def edit(self, actor: Actor, report_id: int, *, findings: dict | None = None, impression: str | None = None,
             recommendation: str | None = None, measurements: dict[str, dict] | None = None,
             client: str | None = None) -> ReportInfo:
        """Apply a clinician's edits to an open version (a draft or an unsigned amendment), mark edited
        measurements, ground again, and save it."""
        info, report = self.report(actor, report_id, client=client)
        if not info.is_open:
            raise InvalidTransition(f"report {report_id} is {info.status} and signed; only a draft or an unsigned "
                                    "amendment can be edited (amend a signed report)")
        _apply_edits(report, findings, impression, recommendation, measurements)
        return edit_draft(self.store, actor, report_id, report.model_dump(mode="json"), client=client)

    def amend(self, actor: Actor, report_id: int, *, reason: str, findings: dict | None = None,
              impression: str | None = None, recommendation: str | None = None,
              measurements: dict[str, dict] | None = None, client: str | None = None) -> ReportInfo:
        """A new version of a signed report with these changes (status amended, unsigned until a clinician signs
        it), grounded again; the signed version stays as it was."""
        from pipelines.ct.report import ReportError

        info, report = self.report(actor, report_id, client=client)
        if info.is_open:
            kind = "a draft" if info.status == "draft" else "an unsigned amendment"
            raise InvalidTransition(f"report {report_id} is {kind}: edit it and sign it; amendments apply to signed "
                                    "reports")
        if not isinstance(reason, str) or not reason.strip():
            raise ReportError("reason: expected why the signed report is amended, found nothing")
        report.amend()  # reopens it: status amended, signature cleared
        _apply_edits(report, findings, impression, recommendation, measurements)
        return amend_report(self.store, actor, report_id, report.model_dump(mode="json"), reason=reason.strip(),
                            client=client)

    def sign(self, actor: Actor, report_id: int, *, client: str | None = None) -> ReportInfo:
        return sign_report(self.store, actor, report_id, client=client)

    # ------------------------------------------------------------------------------------------------ exports

    def export(self, actor: Actor, report_id: int, fmt: str, *, deidentify: bool = False,
               client: str | None = None) -> tuple[bytes, str, str]:
        """(bytes, media type, file name) of the report as json / pdf / sr / fhir."""
        from pipelines.ct import exports
        from pipelines.ct.deid import Deidentifier

        if fmt not in FORMATS:
            raise InputError(f"format: expected one of {', '.join(FORMATS)}, found {fmt!r}")
        info, report = self.report(actor, report_id, client=client)
        deid = Deidentifier(key=self.deid_key) if deidentify else None
        media, suffix = FORMATS[fmt]
        name = f"report-{report_id}-v{info.version}{'-deid' if deidentify else ''}{suffix}"
        if fmt == "json":
            shown = exports._prepare(report, deid)
            return shown.to_json().encode(), media, name
        ingested = self.ingested(actor, info.study_id, client=client)
        header = ingested.scan.picked.instances[0].header
        with tempfile.TemporaryDirectory(dir=self.settings.upload_dir) as tmp:
            out = Path(tmp) / name
            if fmt == "pdf":
                data = exports.render_pdf(report, volume=ingested.volume, deidentifier=deid, header=header)
                return data, media, name
            if fmt == "sr":
                evidence = [i.header for i in ingested.scan.picked.instances]
                exports.write_sr(report, out, evidence, deidentifier=deid)
            else:
                exports.write_fhir(report, out, deidentifier=deid, header=header)
            return out.read_bytes(), media, name

