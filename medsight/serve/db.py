"""SQLAlchemy 2 models: the service's durable state.

Times are naive UTC ``datetime`` values written by the application (not the
database clock), so SQLite and PostgreSQL behave the same. ``received_epoch``
duplicates ``received_at`` as seconds so the worklist can rank by waiting time
with plain arithmetic that both databases evaluate identically in SQL.

The schema is created by the Alembic migrations in ``migrations/``; a test
checks that the migrations and these models agree.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

ROLES = ("admin", "radiologist", "technologist", "auditor")
#: "not_analysed": stored and on the worklist, but no model applies to it (``not_analysed_reason`` says why; no job)
STUDY_STATUSES = ("queued", "analysing", "analysed", "not_analysed", "failed", "reviewed")
JOB_STATUSES = ("queued", "running", "done", "failed")


def utcnow() -> datetime:
    return datetime.now(timezone.utc).replace(tzinfo=None)


class Base(DeclarativeBase):
    type_annotation_map = {dict[str, Any]: JSON, list[Any]: JSON}


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[str] = mapped_column(String(20))
    full_name: Mapped[str] = mapped_column(String(128), default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    #: consecutive wrong passwords and the lock they earned (medsight.serve.throttle); a success clears both
    failed_logins: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    locked_until: Mapped[datetime | None] = mapped_column(DateTime)


class ApiToken(Base):
    """A bearer token or web session; only its SHA-256 is stored, so a database dump grants nothing."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    token_sha256: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    expires_at: Mapped[datetime] = mapped_column(DateTime)
    revoked: Mapped[bool] = mapped_column(Boolean, default=False)
    user: Mapped[User] = relationship()


class Study(Base):
    __tablename__ = "studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(128), unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(64))
    description: Mapped[str | None] = mapped_column(String(256))
    modality: Mapped[str] = mapped_column(String(16))
    model: Mapped[str] = mapped_column(String(128))
    requested_priority: Mapped[str] = mapped_column(String(10), default="routine")
    source_format: Mapped[str] = mapped_column(String(16))
    status: Mapped[str] = mapped_column(String(16), default="queued")
    uploaded_by: Mapped[int | None] = mapped_column(ForeignKey("users.id"))
    received_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    received_epoch: Mapped[float] = mapped_column(Float)
    analysed_at: Mapped[datetime | None] = mapped_column(DateTime)
    # Triage: filled in when analysis completes.
    critical_probability: Mapped[float | None] = mapped_column(Float)
    refer: Mapped[bool] = mapped_column(Boolean, default=False)
    critical: Mapped[bool] = mapped_column(Boolean, default=False)
    finding: Mapped[str | None] = mapped_column(String(64))
    priority_base: Mapped[float] = mapped_column(Float, default=0.0)
    error: Mapped[str | None] = mapped_column(Text)
    #: routing's "not analysed: no model applies (SHOULDER MR): ..." where no model was run on the study
    not_analysed_reason: Mapped[str | None] = mapped_column(Text)
    instances: Mapped[list["Instance"]] = relationship(back_populates="study", order_by="Instance.id")
    __table_args__ = (Index("ix_studies_status_priority", "status", "priority_base"), Index("ix_studies_modality", "modality"))


class Instance(Base):
    """One image file of a study; the file itself lives in content-addressed storage."""

    __tablename__ = "instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    sop_instance_uid: Mapped[str | None] = mapped_column(String(128))
    file_sha256: Mapped[str] = mapped_column(String(64))
    file_size: Mapped[int] = mapped_column(BigInteger)
    original_name: Mapped[str] = mapped_column(String(256))
    format: Mapped[str] = mapped_column(String(16))
    rows: Mapped[int] = mapped_column(Integer)
    columns: Mapped[int] = mapped_column(Integer)
    patient_sex: Mapped[str | None] = mapped_column(String(4))
    patient_age: Mapped[int | None] = mapped_column(Integer)
    study: Mapped[Study] = relationship(back_populates="instances")
    __table_args__ = (UniqueConstraint("study_id", "file_sha256", name="uq_instances_study_file"),)


class Job(Base):
    """A durable unit of background work (``analyse`` a study, ``notify`` a webhook).

    A worker owns a running job only while ``lease_expires_at`` is in the future and
    it holds ``lease_token``; completion is conditional on both, which is what makes a
    job whose worker died finish exactly once.
    """

    __tablename__ = "jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    kind: Mapped[str] = mapped_column(String(16))
    study_id: Mapped[int | None] = mapped_column(ForeignKey("studies.id"), index=True)
    payload: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    status: Mapped[str] = mapped_column(String(10), default="queued")
    priority: Mapped[int] = mapped_column(Integer, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    max_attempts: Mapped[int] = mapped_column(Integer, default=3)
    run_after: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    lease_owner: Mapped[str | None] = mapped_column(String(128))
    lease_token: Mapped[str | None] = mapped_column(String(64))
    lease_expires_at: Mapped[datetime | None] = mapped_column(DateTime)
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    started_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_at: Mapped[datetime | None] = mapped_column(DateTime)
    finished_by: Mapped[str | None] = mapped_column(String(128))
    last_error: Mapped[str | None] = mapped_column(Text)
    __table_args__ = (Index("ix_jobs_claim", "status", "run_after"),)


class Result(Base):
    """The model's output for one instance. (job_id, instance_id) is unique: a job's results are written once."""

    __tablename__ = "results"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instances.id"))
    job_id: Mapped[int] = mapped_column(ForeignKey("jobs.id"))
    model: Mapped[str] = mapped_column(String(128))
    label: Mapped[str] = mapped_column(String(64))
    labels: Mapped[list[Any]] = mapped_column(JSON)
    task: Mapped[str] = mapped_column(String(16))
    findings: Mapped[list[Any]] = mapped_column(JSON, doc="labels that count as findings for review and agreement")
    probabilities: Mapped[dict[str, Any]] = mapped_column(JSON)
    confidence: Mapped[float] = mapped_column(Float)
    refer: Mapped[bool] = mapped_column(Boolean)
    statement: Mapped[str] = mapped_column(Text)
    critical_probability: Mapped[float] = mapped_column(Float)
    critical: Mapped[bool] = mapped_column(Boolean)
    heatmap_label: Mapped[str | None] = mapped_column(String(64))
    display_sha256: Mapped[str] = mapped_column(String(64))
    overlay_sha256: Mapped[str | None] = mapped_column(String(64))
    heatmap_sha256: Mapped[str | None] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    created_by: Mapped[str] = mapped_column(String(128))
    __table_args__ = (UniqueConstraint("job_id", "instance_id", name="uq_results_job_instance"),)


class Review(Base):
    """A radiologist's verdict on one result. Reviews are never updated: a second one is a new row."""

    __tablename__ = "reviews"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("studies.id"), index=True)
    result_id: Mapped[int] = mapped_column(ForeignKey("results.id"), index=True)
    reviewer_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    label: Mapped[str] = mapped_column(String(64))
    action: Mapped[str] = mapped_column(String(10), doc="confirm | correct | exclude (the image is not for this model)")
    note: Mapped[str] = mapped_column(Text, default="")
    created_at: Mapped[datetime] = mapped_column(DateTime, default=utcnow)
    findings: Mapped[list["ReviewFinding"]] = relationship(order_by="ReviewFinding.id")
    reviewer: Mapped[User] = relationship()


class ReviewFinding(Base):
    __tablename__ = "review_findings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    review_id: Mapped[int] = mapped_column(ForeignKey("reviews.id"), index=True)
    finding: Mapped[str] = mapped_column(String(64))
    model_present: Mapped[bool] = mapped_column(Boolean)
    reviewer_present: Mapped[bool] = mapped_column(Boolean)
    action: Mapped[str] = mapped_column(String(10))


class AuditEvent(Base):
    """Append-only, hash-chained: ``hash = HMAC-SHA256(key, prev_hash + canonical row)`` (``scheme``
    "hmac-sha256"), or ``sha256(prev_hash + canonical row)`` for events written before the key (``scheme`` NULL).

    ``prev_hash`` is unique, so two writers can never both extend the same head
    (the chain cannot fork); database triggers refuse UPDATE and DELETE.
    """

    __tablename__ = "audit_events"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    ts: Mapped[datetime] = mapped_column(DateTime)
    actor: Mapped[str] = mapped_column(String(128))
    role: Mapped[str | None] = mapped_column(String(20))
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str] = mapped_column(String(32))
    object_id: Mapped[str | None] = mapped_column(String(128))
    client_ip: Mapped[str | None] = mapped_column(String(64))
    detail: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    prev_hash: Mapped[str] = mapped_column(String(64), unique=True)
    hash: Mapped[str] = mapped_column(String(64))
    scheme: Mapped[str | None] = mapped_column(String(16))


class WorkerBeat(Base):
    """One row per worker process, refreshed while it runs: the service's evidence that someone
    is taking jobs (``/health`` reports degraded when no row is fresh). Job leases alone cannot
    say this: an idle worker holds none."""

    __tablename__ = "worker_beats"
    name: Mapped[str] = mapped_column(String(200), primary_key=True)
    pid: Mapped[int] = mapped_column(Integer)
    host: Mapped[str] = mapped_column(String(255))
    started_at: Mapped[datetime] = mapped_column(DateTime)
    last_seen: Mapped[datetime] = mapped_column(DateTime, index=True)
    jobs_done: Mapped[int] = mapped_column(Integer, default=0)
