"""Tables of the store (SQLAlchemy 2 typed ORM). The Alembic migrations in `migrations/versions` create them;
`tests/apps/store/test_migrations.py` checks the two agree.

Every timestamp is UTC and comes back timezone-aware on SQLite and PostgreSQL alike (`UTCDateTime`).
"""

from __future__ import annotations

import datetime as dt

from sqlalchemy import (JSON, BigInteger, Boolean, CheckConstraint, DateTime, Float, ForeignKey, Index, Integer,
                        MetaData, String, Text, TypeDecorator, UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ROLES = ("clinician", "engineer", "admin")
REPORT_STATUSES = ("draft", "final", "amended")
SCORE_STATUSES = ("ok", "error")
AUDIT_OUTCOMES = ("ok", "denied", "failed")

# Named constraints: Alembic batch mode (SQLite) can only drop or alter what has a name.
NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

# 64-bit keys for the tables that grow without bound; SQLite needs INTEGER for its rowid alias.
BigId = BigInteger().with_variant(Integer(), "sqlite")


def utcnow() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


class UTCDateTime(TypeDecorator):
    """Aware UTC datetimes in, aware UTC datetimes out. SQLite keeps no zone, so it stores naive UTC."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value, dialect):
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError(f"naive datetime {value!r}: the store keeps aware UTC times only")
        value = value.astimezone(dt.timezone.utc)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value, dialect):
        if value is None:
            return None
        return value.replace(tzinfo=dt.timezone.utc) if value.tzinfo is None else value.astimezone(dt.timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)
    type_annotation_map = {dt.datetime: UTCDateTime(), dict: JSON(), list: JSON()}


class User(Base):
    __tablename__ = "users"
    __table_args__ = (CheckConstraint(f"role IN {ROLES}", name="role"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))  # argon2id encoded hash, never the password
    role: Mapped[str] = mapped_column(String(16))
    site: Mapped[str] = mapped_column(String(64))
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # Set for the first-start admin (whose password was printed once): nothing else works until it is changed.
    must_change_password: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    # Lockout bookkeeping: failures counted since `first_failed_at` (one policy window).
    failed_logins: Mapped[int] = mapped_column(Integer, default=0)
    first_failed_at: Mapped[dt.datetime | None]
    locked_until: Mapped[dt.datetime | None]


class AuthSession(Base):
    """A web log-in. Only the sha256 of the cookie token is kept."""

    __tablename__ = "auth_sessions"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]
    revoked_at: Mapped[dt.datetime | None]
    client: Mapped[str | None] = mapped_column(String(64))

    user: Mapped[User] = relationship()


class ApiToken(Base):
    """A bearer token for the REST API and scripts. Only its sha256 and a short display prefix are kept."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    label: Mapped[str] = mapped_column(String(128), default="")
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[dt.datetime]
    revoked_at: Mapped[dt.datetime | None]
    last_used_at: Mapped[dt.datetime | None]

    user: Mapped[User] = relationship()


class Study(Base):
    __tablename__ = "studies"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)  # DICOM StudyInstanceUID
    description: Mapped[str] = mapped_column(String(255), default="")
    patient_pseudonym: Mapped[str | None] = mapped_column(String(64))
    study_date: Mapped[str | None] = mapped_column(String(8))  # DICOM DA, YYYYMMDD
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"), index=True)
    site: Mapped[str] = mapped_column(String(64), index=True)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    owner: Mapped[User] = relationship()
    series: Mapped[list[Series]] = relationship(back_populates="study", order_by="Series.id")


class Series(Base):
    __tablename__ = "series"
    __table_args__ = (CheckConstraint("slice_count >= 0", name="slice_count"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)  # DICOM SeriesInstanceUID
    description: Mapped[str] = mapped_column(String(255), default="")
    modality: Mapped[str] = mapped_column(String(16), default="CT")
    slice_count: Mapped[int] = mapped_column(Integer)
    blobs: Mapped[list] = mapped_column(default=list)  # sha256 of each stored DICOM file, in instance order

    study: Mapped[Study] = relationship(back_populates="series")


class StudyShare(Base):
    """A study made visible to one user or to every clinician of a site."""

    __tablename__ = "study_shares"
    __table_args__ = (CheckConstraint("(user_id IS NULL) <> (site IS NULL)", name="one_target"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"), index=True)
    site: Mapped[str | None] = mapped_column(String(64), index=True)
    granted_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class VoiceNote(Base):
    __tablename__ = "voice_notes"

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    owner_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    site: Mapped[str] = mapped_column(String(64))
    audio_sha256: Mapped[str] = mapped_column(String(64))
    transcript: Mapped[dict] = mapped_column(default=dict)
    engine: Mapped[str] = mapped_column(String(32))
    model_id: Mapped[str] = mapped_column(String(128))
    language: Mapped[str | None] = mapped_column(String(16))
    duration_s: Mapped[float | None] = mapped_column(Float)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    owner: Mapped[User] = relationship()


class Report(Base):
    """One version of a study's report. Versions of a study form a chain: v1 draft -> final, v2 amends v1, ..."""

    __tablename__ = "reports"
    __table_args__ = (
        UniqueConstraint("study_id", "version"),
        CheckConstraint(f"status IN {REPORT_STATUSES}", name="status"),
        CheckConstraint("version >= 1", name="version"),
    )

    id: Mapped[int] = mapped_column(primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"))
    site: Mapped[str] = mapped_column(String(64))  # the study's site, kept on each version for site-level queries
    version: Mapped[int] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    content: Mapped[dict]
    model_draft: Mapped[dict | None]  # the model's original text, kept beside the clinician's edits
    model_id: Mapped[str | None] = mapped_column(String(128))
    checkpoint_sha256: Mapped[str | None] = mapped_column(String(64))
    author_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    signer_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    signed_at: Mapped[dt.datetime | None]
    amends_id: Mapped[int | None] = mapped_column(ForeignKey("reports.id"))
    amend_reason: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[dt.datetime] = mapped_column(default=utcnow)

    author: Mapped[User] = relationship(foreign_keys=[author_id])
    signer: Mapped[User | None] = relationship(foreign_keys=[signer_id])


class WaferLot(Base):
    __tablename__ = "wafer_lots"

    id: Mapped[int] = mapped_column(primary_key=True)
    lot_id: Mapped[str] = mapped_column(String(64), unique=True)
    product: Mapped[str] = mapped_column(String(64), default="")
    site: Mapped[str] = mapped_column(String(64), index=True)
    created_by_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class Wafer(Base):
    __tablename__ = "wafers"
    __table_args__ = (UniqueConstraint("lot_pk", "source", "wafer_id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    lot_pk: Mapped[int] = mapped_column(ForeignKey("wafer_lots.id"))
    wafer_id: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(512), default="")  # file (and member / row) the map came from
    slot: Mapped[int | None] = mapped_column(Integer)
    map_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class WaferScore(Base):
    __tablename__ = "wafer_scores"
    __table_args__ = (
        CheckConstraint(f"status IN {SCORE_STATUSES}", name="status"),
        Index("ix_wafer_scores_wafer_pk_id", "wafer_pk", "id"),  # newest score of each wafer
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    wafer_pk: Mapped[int] = mapped_column(BigId, ForeignKey("wafers.id"))
    model_id: Mapped[str] = mapped_column(String(128))
    probabilities: Mapped[dict] = mapped_column(default=dict)  # class name -> probability
    predicted_class: Mapped[str | None] = mapped_column(String(64))
    defect_score: Mapped[float | None] = mapped_column(Float)
    anomaly_score: Mapped[float | None] = mapped_column(Float)
    status: Mapped[str] = mapped_column(String(8), default="ok")
    error: Mapped[str | None] = mapped_column(Text)
    scored_at: Mapped[dt.datetime] = mapped_column(default=utcnow)


class AuditEvent(Base):
    """Append-only trail (the migrations add triggers refusing UPDATE and DELETE)."""

    __tablename__ = "audit_events"
    __table_args__ = (
        CheckConstraint(f"outcome IN {AUDIT_OUTCOMES}", name="outcome"),
        Index("ix_audit_events_object", "object_type", "object_id"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True)
    at: Mapped[dt.datetime] = mapped_column(default=utcnow, index=True)
    user_id: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    username: Mapped[str] = mapped_column(String(64), index=True)  # kept as text: the trail outlives renames
    role: Mapped[str | None] = mapped_column(String(16))
    action: Mapped[str] = mapped_column(String(64), index=True)
    object_type: Mapped[str | None] = mapped_column(String(32))
    object_id: Mapped[str | None] = mapped_column(String(128))
    client: Mapped[str | None] = mapped_column(String(64))
    outcome: Mapped[str] = mapped_column(String(8), default="ok")
    details: Mapped[dict] = mapped_column(default=dict)
