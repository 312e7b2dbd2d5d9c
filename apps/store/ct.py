"""CT studies, voice notes and the report life cycle, with ownership, sharing and audit.

Visibility: a clinician sees the studies they own or that were shared with them or with their site; an admin sees
every study; an engineer none. Reports: draft -> final (signed by any clinician who can see the study; immutable)
-> amended (a new version pointing at the one it corrects, open for edits by its author until it is signed, then
immutable too). Only the author of an open version (a draft or an unsigned amendment) may edit it.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import re

from sqlalchemy import exists, or_, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, selectinload

from apps.store.accounts import check_site
from apps.store.audit import act, record, require_role
from apps.store.core import Actor, Store
from apps.store.errors import ConflictError, InvalidTransition, NotFoundError, PermissionDenied, StoreError
from apps.store.models import Report, Series, Study, StudyShare, User, VoiceNote, utcnow

DICOM_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")  # PS3.5 9.1: digits and dots, no leading zeros
DICOM_DATE = re.compile(r"^\d{8}$")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
CLINICAL = ("clinician", "admin")


@dataclasses.dataclass(frozen=True)
class NewSeries:
    series_uid: str
    slice_count: int
    blobs: list[str] = dataclasses.field(default_factory=list)  # sha256 of each stored file, from store.put_blob
    description: str = ""
    modality: str = "CT"


@dataclasses.dataclass(frozen=True)
class SeriesInfo:
    id: int
    series_uid: str
    description: str
    modality: str
    slice_count: int
    blobs: list[str]


@dataclasses.dataclass(frozen=True)
class StudyInfo:
    id: int
    study_uid: str
    description: str
    patient_pseudonym: str | None
    study_date: str | None
    owner: str
    site: str
    created_at: dt.datetime
    series: list[SeriesInfo]


@dataclasses.dataclass(frozen=True)
class VoiceNoteInfo:
    id: int
    study_id: int
    owner: str
    site: str
    audio_sha256: str
    transcript: dict
    engine: str
    model_id: str
    language: str | None
    duration_s: float | None
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class ReportInfo:
    id: int
    study_id: int
    site: str
    version: int
    status: str
    content: dict
    model_draft: dict | None
    model_id: str | None
    checkpoint_sha256: str | None
    author: str
    signer: str | None
    signed_at: dt.datetime | None
    amends_id: int | None
    amend_reason: str | None
    created_at: dt.datetime
    updated_at: dt.datetime

    @property
    def is_open(self) -> bool:
        """Still changing: a draft, or an amendment not signed yet (its author may edit it; a clinician signs it)."""
        return self.status == "draft" or (self.status == "amended" and self.signer is None)


# --- validation and access -------------------------------------------------------------------------------------


def check_uid(value, field: str) -> str:
    if not isinstance(value, str) or len(value) > 64 or not DICOM_UID.match(value):
        raise StoreError(f"{field}: expected a DICOM UID (digits and dots, at most 64 characters), found {value!r}")
    return value


def check_text(value, field: str, max_len: int, allow_empty: bool = True) -> str:
    if not isinstance(value, str) or len(value) > max_len or (not allow_empty and not value.strip()):
        raise StoreError(f"{field}: expected {'' if allow_empty else 'non-empty '}text of at most {max_len} "
                         f"characters, found {value!r:.80}")
    return value


def check_json(value, field: str) -> dict:
    """A JSON object, deep-copied; NaN and infinities are refused (PostgreSQL's json type has no such values)."""
    if not isinstance(value, dict):
        raise StoreError(f"{field}: expected a JSON object (dict), found {type(value).__name__}")
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{field}: expected JSON-serialisable content, {exc}") from None


def check_blob(store: Store, sha: str, field: str) -> str:
    if not isinstance(sha, str) or not SHA256_HEX.match(sha):
        raise StoreError(f"{field}: expected a sha256 from store.put_blob (64 lowercase hex digits), found {sha!r}")
    if not store.has_blob(sha):
        raise NotFoundError(f"{field}: blob {sha} is not in the store; add it with store.put_blob first")
    return sha


def visible(me: Actor):
    """SQL condition: the studies `me` may see."""
    if me.role == "admin":
        return True
    if me.role != "clinician":
        return False
    shared = exists().where(StudyShare.study_id == Study.id,
                            or_(StudyShare.user_id == me.user_id, StudyShare.site == me.site))
    return or_(Study.owner_id == me.user_id, shared)


def study_for(session: Session, actor: Actor, study_id: int, action: str, roles=CLINICAL) -> tuple[Actor, Study]:
    me = require_role(session, actor, roles, action, "study", study_id)
    if not isinstance(study_id, int) or isinstance(study_id, bool):
        raise StoreError(f"study id: expected an integer, found {study_id!r}")
    study = session.get(Study, study_id)
    if study is None:
        raise NotFoundError(f"study {study_id}: no such study")
    if not session.scalar(select(exists().where(Study.id == study_id, visible(me)))):
        raise PermissionDenied(f"{me.username} is not allowed {action} on study {study_id}: it is neither theirs "
                               "nor shared with them or their site", action, "study", study_id)
    return me, study


def report_for(session: Session, actor: Actor, report_id: int, action: str, roles=CLINICAL) -> tuple[Actor, Report]:
    if not isinstance(report_id, int) or isinstance(report_id, bool):
        raise StoreError(f"report id: expected an integer, found {report_id!r}")
    report = session.get(Report, report_id)
    if report is None:
        require_role(session, actor, roles, action, "report", report_id)
        raise NotFoundError(f"report {report_id}: no such report")
    try:
        me, _ = study_for(session, actor, report.study_id, action, roles)
    except PermissionDenied as exc:
        exc.object_type, exc.object_id = "report", str(report_id)
        raise
    return me, report


def _username(session: Session, user_id: int | None) -> str | None:
    return None if user_id is None else session.get(User, user_id).username


def study_info(session: Session, study: Study) -> StudyInfo:
    return StudyInfo(study.id, study.study_uid, study.description, study.patient_pseudonym, study.study_date,
                     study.owner.username, study.site, study.created_at,
                     [SeriesInfo(s.id, s.series_uid, s.description, s.modality, s.slice_count, list(s.blobs))
                      for s in study.series])


def report_info(session: Session, r: Report) -> ReportInfo:
    return ReportInfo(r.id, r.study_id, r.site, r.version, r.status, r.content, r.model_draft, r.model_id,
                      r.checkpoint_sha256, _username(session, r.author_id), _username(session, r.signer_id),
                      r.signed_at, r.amends_id, r.amend_reason, r.created_at, r.updated_at)


def voice_note_info(session: Session, v: VoiceNote) -> VoiceNoteInfo:
    return VoiceNoteInfo(v.id, v.study_id, _username(session, v.owner_id), v.site, v.audio_sha256, v.transcript,
                         v.engine, v.model_id, v.language, v.duration_s, v.created_at)


# --- studies ---------------------------------------------------------------------------------------------------


def add_study(store: Store, actor: Actor, study_uid: str, series: list[NewSeries], *, description: str = "",
              patient_pseudonym: str | None = None, study_date: str | None = None,
              client: str | None = None) -> StudyInfo:
    check_uid(study_uid, "study_uid")
    check_text(description, "description", 255)
    if patient_pseudonym is not None:
        check_text(patient_pseudonym, "patient_pseudonym", 64, allow_empty=False)
    if study_date is not None and (not isinstance(study_date, str) or not DICOM_DATE.match(study_date)):
        raise StoreError(f"study_date: expected a DICOM date YYYYMMDD, found {study_date!r}")
    if not isinstance(series, (list, tuple)) or not series or not all(isinstance(s, NewSeries) for s in series):
        raise StoreError("series: expected a non-empty list of apps.store.NewSeries")
    seen: set[str] = set()
    for i, s in enumerate(series):
        check_uid(s.series_uid, f"series[{i}].series_uid")
        if s.series_uid in seen:
            raise StoreError(f"series[{i}].series_uid: {s.series_uid} appears twice in this study")
        seen.add(s.series_uid)
        if not isinstance(s.slice_count, int) or isinstance(s.slice_count, bool) or s.slice_count < 0:
            raise StoreError(f"series[{i}].slice_count: expected a whole number >= 0, found {s.slice_count!r}")
        check_text(s.description, f"series[{i}].description", 255)
        check_text(s.modality, f"series[{i}].modality", 16, allow_empty=False)
        for j, sha in enumerate(s.blobs):
            check_blob(store, sha, f"series[{i}].blobs[{j}]")

    def run(session: Session) -> StudyInfo:
        me = require_role(session, actor, ("clinician",), "study.add", "study", study_uid)
        if session.scalar(select(exists().where(Study.study_uid == study_uid))):
            raise ConflictError(f"study_uid {study_uid}: a study with this StudyInstanceUID is already stored")
        taken = session.scalars(select(Series.series_uid).where(Series.series_uid.in_(seen))).first()
        if taken is not None:
            raise ConflictError(f"series_uid {taken}: a series with this SeriesInstanceUID is already stored")
        study = Study(study_uid=study_uid, description=description, patient_pseudonym=patient_pseudonym,
                      study_date=study_date, owner_id=me.user_id, site=me.site)
        study.series = [Series(series_uid=s.series_uid, description=s.description, modality=s.modality,
                               slice_count=s.slice_count, blobs=list(s.blobs)) for s in series]
        session.add(study)
        session.flush()
        record(session, me, "study.add", "study", study.id, client=client,
               details={"study_uid": study_uid, "series": len(series),
                        "slices": sum(s.slice_count for s in series)})
        return study_info(session, study)

    try:
        return act(store, actor, client, run)
    except IntegrityError:
        raise ConflictError(f"study_uid {study_uid}: stored concurrently by another request") from None


def get_study(store: Store, actor: Actor, study: int | str, *, client: str | None = None) -> StudyInfo:
    """A study by id, or by StudyInstanceUID when given a string."""
    def run(session: Session) -> StudyInfo:
        study_id = study
        if isinstance(study, str):
            require_role(session, actor, CLINICAL, "study.view", "study", study)
            study_id = session.scalar(select(Study.id).where(Study.study_uid == study))
            if study_id is None:
                raise NotFoundError(f"study {study}: no study with this StudyInstanceUID")
        me, row = study_for(session, actor, study_id, "study.view")
        record(session, me, "study.view", "study", row.id, client=client)
        return study_info(session, row)

    return act(store, actor, client, run)


def list_studies(store: Store, actor: Actor, *, limit: int = 100, offset: int = 0,
                 client: str | None = None) -> list[StudyInfo]:
    if not isinstance(limit, int) or not 1 <= limit <= 10_000 or not isinstance(offset, int) or offset < 0:
        raise StoreError(f"limit/offset: expected 1 <= limit <= 10000 and offset >= 0, found {limit!r}/{offset!r}")

    def run(session: Session) -> list[StudyInfo]:
        me = require_role(session, actor, CLINICAL, "study.list")
        rows = session.scalars(select(Study).where(visible(me)).options(selectinload(Study.series),
                                                                         selectinload(Study.owner))
                               .order_by(Study.id.desc()).limit(limit).offset(offset)).all()
        record(session, me, "study.list", client=client, details={"study_ids": [r.id for r in rows]})
        return [study_info(session, r) for r in rows]

    return act(store, actor, client, run)


def share_study(store: Store, actor: Actor, study_id: int, *, username: str | None = None, site: str | None = None,
                client: str | None = None) -> None:
    if (username is None) == (site is None):
        raise StoreError("share_study: give exactly one of username= or site=")
    if site is not None:
        check_site(site)

    def run(session: Session) -> None:
        me, study = study_for(session, actor, study_id, "study.share")
        if me.role != "admin" and study.owner_id != me.user_id:
            raise PermissionDenied(f"{me.username} may not share study {study_id}: only its owner or an admin can",
                                   "study.share", "study", study_id)
        target_id = None
        if username is not None:
            target = session.scalars(select(User).where(User.username == username)).one_or_none()
            if target is None:
                raise NotFoundError(f"user {username!r}: no such user")
            if target.role != "clinician":
                raise StoreError(f"user {username!r} is {'an' if target.role[0] in 'aeiou' else 'a'} {target.role}; "
                                 "studies are shared with clinicians only")
            target_id = target.id
        already = session.scalar(select(exists().where(
            StudyShare.study_id == study_id,
            StudyShare.user_id == target_id if target_id is not None else StudyShare.site == site)))
        if not already:
            session.add(StudyShare(study_id=study_id, user_id=target_id, site=site, granted_by_id=me.user_id))
        record(session, me, "study.share", "study", study_id, client=client,
               details={"user": username} if username else {"site": site})

    act(store, actor, client, run)


# --- voice notes -----------------------------------------------------------------------------------------------


def add_voice_note(store: Store, actor: Actor, study_id: int, audio_sha256: str, transcript: dict, engine: str,
                   model_id: str, *, language: str | None = None, duration_s: float | None = None,
                   client: str | None = None) -> VoiceNoteInfo:
    check_blob(store, audio_sha256, "audio_sha256")
    transcript = check_json(transcript, "transcript")
    check_text(engine, "engine", 32, allow_empty=False)
    check_text(model_id, "model_id", 128, allow_empty=False)
    if language is not None:
        check_text(language, "language", 16, allow_empty=False)
    if duration_s is not None and (not isinstance(duration_s, (int, float)) or not 0 <= duration_s < 86400):
        raise StoreError(f"duration_s: expected seconds in 0..86400, found {duration_s!r}")

    def run(session: Session) -> VoiceNoteInfo:
        me, study = study_for(session, actor, study_id, "voice_note.add", roles=("clinician",))
        note = VoiceNote(study_id=study.id, owner_id=me.user_id, site=me.site, audio_sha256=audio_sha256,
                         transcript=transcript, engine=engine, model_id=model_id, language=language,
                         duration_s=None if duration_s is None else float(duration_s))
        session.add(note)
        session.flush()
        record(session, me, "voice_note.add", "voice_note", note.id, client=client,
               details={"study_id": study.id, "engine": engine, "model_id": model_id})
        return voice_note_info(session, note)

    return act(store, actor, client, run)


def list_voice_notes(store: Store, actor: Actor, study_id: int, *, client: str | None = None) -> list[VoiceNoteInfo]:
    def run(session: Session) -> list[VoiceNoteInfo]:
        me, study = study_for(session, actor, study_id, "voice_note.list")
        notes = session.scalars(select(VoiceNote).where(VoiceNote.study_id == study.id).order_by(VoiceNote.id))
        out = [voice_note_info(session, n) for n in notes]
        record(session, me, "voice_note.list", "study", study.id, client=client,
               details={"voice_note_ids": [n.id for n in out]})
        return out

    return act(store, actor, client, run)


# --- reports ---------------------------------------------------------------------------------------------------


def is_open(report: Report) -> bool:
    """A version that can still change: a draft, or an amendment not signed yet."""
    return report.status == "draft" or (report.status == "amended" and report.signer_id is None)


def _latest(session: Session, study_id: int) -> Report | None:
    return session.scalars(select(Report).where(Report.study_id == study_id)
                           .order_by(Report.version.desc()).limit(1)).first()


def create_draft_report(store: Store, actor: Actor, study_id: int, content: dict, *, model_id: str | None,
                        checkpoint_sha256: str | None, client: str | None = None) -> ReportInfo:
    content = check_json(content, "content")
    if model_id is not None:
        check_text(model_id, "model_id", 128, allow_empty=False)
    if checkpoint_sha256 is not None and (not isinstance(checkpoint_sha256, str)
                                          or not SHA256_HEX.match(checkpoint_sha256)):
        raise StoreError(f"checkpoint_sha256: expected 64 lowercase hex digits, found {checkpoint_sha256!r}")

    def run(session: Session) -> ReportInfo:
        me, study = study_for(session, actor, study_id, "report.draft", roles=("clinician",))
        latest = _latest(session, study.id)
        if latest is not None and is_open(latest):
            raise InvalidTransition(f"study {study.id} already has an open {latest.status} (report {latest.id}, "
                                    f"version {latest.version}); edit or sign it")
        if latest is not None:
            raise InvalidTransition(f"study {study.id} already has a signed report (report {latest.id}, "
                                    f"{latest.status}); amend it instead of drafting anew")
        now = utcnow()
        report = Report(study_id=study.id, site=study.site, version=1, status="draft", content=content,
                        model_draft=content, model_id=model_id, checkpoint_sha256=checkpoint_sha256,
                        author_id=me.user_id, created_at=now, updated_at=now)
        session.add(report)
        session.flush()
        record(session, me, "report.draft", "report", report.id, client=client,
               details={"study_id": study.id, "model_id": model_id, "checkpoint_sha256": checkpoint_sha256})
        return report_info(session, report)

    try:
        return act(store, actor, client, run)
    except IntegrityError:
        raise InvalidTransition(f"study {study_id}: another draft was created at the same time") from None


def edit_draft(store: Store, actor: Actor, report_id: int, content: dict, *,
               client: str | None = None) -> ReportInfo:
    content = check_json(content, "content")

    def run(session: Session) -> ReportInfo:
        me, report = report_for(session, actor, report_id, "report.edit", roles=("clinician",))
        if not is_open(report):
            raise InvalidTransition(f"report {report_id} is {report.status} and signed: a signed report is "
                                    "immutable; amend it instead")
        if report.author_id != me.user_id:
            raise PermissionDenied(f"{me.username} may not edit report {report_id}: only its author "
                                   f"{_username(session, report.author_id)} can", "report.edit", "report", report_id)
        changed = sorted(k for k in set(content) | set(report.content) if content.get(k) != report.content.get(k))
        report.content = content
        report.updated_at = utcnow()
        record(session, me, "report.edit", "report", report_id, client=client, details={"changed_fields": changed})
        return report_info(session, report)

    return act(store, actor, client, run)


def sign_report(store: Store, actor: Actor, report_id: int, *, client: str | None = None) -> ReportInfo:
    def run(session: Session) -> ReportInfo:
        me, report = report_for(session, actor, report_id, "report.sign", roles=("clinician",))
        if not is_open(report):
            raise InvalidTransition(f"report {report_id} is already {report.status} and signed; only a draft or an "
                                    "unsigned amendment can be signed")
        now = utcnow()
        if report.status == "draft":
            report.status = "final"  # an amendment keeps its status: a signed amendment
        report.signer_id, report.signed_at, report.updated_at = me.user_id, now, now
        record(session, me, "report.sign", "report", report_id, client=client,
               details={"study_id": report.study_id, "version": report.version, "status": report.status})
        return report_info(session, report)

    return act(store, actor, client, run)


def amend_report(store: Store, actor: Actor, report_id: int, content: dict, *, reason: str,
                 client: str | None = None) -> ReportInfo:
    content = check_json(content, "content")
    check_text(reason, "reason", 2000, allow_empty=False)

    def run(session: Session) -> ReportInfo:
        me, report = report_for(session, actor, report_id, "report.amend", roles=("clinician",))
        if is_open(report):
            kind = "a draft" if report.status == "draft" else "an unsigned amendment"
            raise InvalidTransition(f"report {report_id} is {kind}; edit or sign it, amendments apply to signed "
                                    "reports")
        latest = _latest(session, report.study_id)
        if latest.id != report.id:
            raise InvalidTransition(f"report {report_id} (version {report.version}) was already amended by report "
                                    f"{latest.id} (version {latest.version}); amend the newest version")
        now = utcnow()
        # The new version stays open (its author may edit it) until a clinician signs it with sign_report.
        amended = Report(study_id=report.study_id, site=report.site, version=report.version + 1, status="amended",
                         content=content, model_draft=report.model_draft, model_id=report.model_id,
                         checkpoint_sha256=report.checkpoint_sha256, author_id=me.user_id, signer_id=None,
                         signed_at=None, amends_id=report.id, amend_reason=reason, created_at=now, updated_at=now)
        session.add(amended)
        session.flush()
        record(session, me, "report.amend", "report", amended.id, client=client,
               details={"amends_id": report.id, "version": amended.version, "reason": reason})
        return report_info(session, amended)

    try:
        return act(store, actor, client, run)
    except IntegrityError:
        raise InvalidTransition(f"report {report_id} was amended at the same time by another request") from None


def get_report(store: Store, actor: Actor, report_id: int, *, client: str | None = None) -> ReportInfo:
    def run(session: Session) -> ReportInfo:
        me, report = report_for(session, actor, report_id, "report.view")
        record(session, me, "report.view", "report", report_id, client=client)
        return report_info(session, report)

    return act(store, actor, client, run)


def list_reports(store: Store, actor: Actor, study_id: int, *, client: str | None = None) -> list[ReportInfo]:
    def run(session: Session) -> list[ReportInfo]:
        me, study = study_for(session, actor, study_id, "report.list")
        rows = session.scalars(select(Report).where(Report.study_id == study.id).order_by(Report.version))
        out = [report_info(session, r) for r in rows]
        record(session, me, "report.list", "study", study.id, client=client,
               details={"report_ids": [r.id for r in out]})
        return out

    return act(store, actor, client, run)
