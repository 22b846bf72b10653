"""Request bodies and typed responses of the JSON API: what ``/openapi.json`` documents.

The read models in :mod:`medsight.serve.views` (and ``worklist``, ``reviews``) build
the dictionaries; these classes are the contract they are checked against on the way
out. Timestamps are ISO 8601 strings in UTC, as the dictionaries write them.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field


# --------------------------------------------------------------------------- request bodies
class LoginBody(BaseModel):
    username: str
    password: str


class UserBody(BaseModel):
    username: str
    password: str = Field(min_length=1)
    role: str
    full_name: str = ""


class UserPatch(BaseModel):
    active: bool | None = None
    role: str | None = None


class ReviewBody(BaseModel):
    label: str | None = Field(default=None, description="the reviewer's label for the image (single-label models)")
    findings: dict[str, bool] | None = Field(default=None, description="per finding: present? (multilabel models)")
    note: str = ""
    result_id: int | None = Field(default=None, ge=1, le=2**63 - 1,
                                  description="which image's result; default: the study's key image")


class PasswordChange(BaseModel):
    old_password: str
    new_password: str


class PasswordReset(BaseModel):
    password: str


# --------------------------------------------------------------------------- service
class JobCounts(BaseModel):
    queued: int
    running: int
    done: int
    failed: int


class Health(BaseModel):
    status: str = Field(description="ok | degraded")
    version: str
    database: str = Field(description="sqlite | postgresql")
    jobs: JobCounts
    reasons: list[str] = Field(default_factory=list, description="why the service is degraded")
    workers_alive: int = 0
    oldest_queued_s: float | None = Field(default=None, description="age of the oldest due queued job")


class Job(BaseModel):
    id: int
    kind: str
    study_id: int | None
    status: str
    attempts: int
    channel: str | None = Field(description="the delivery channel of a deliver job")
    owner: str | None
    finished_by: str | None
    last_error: str | None
    created_at: str


class JobRetried(BaseModel):
    id: int
    kind: str
    status: str
    attempts: int
    max_attempts: int


class ModelInfo(BaseModel):
    name: str
    version: str
    modality: str
    modalities: list[str] = Field(description="DICOM modality codes the model reads")
    task: str
    labels: list[str]
    findings: list[str] = Field(description="labels a reviewer confirms or corrects")
    critical_findings: list[str]
    body_part: str


# --------------------------------------------------------------------------- auth and users
class User(BaseModel):
    id: int
    username: str
    role: str
    full_name: str
    active: bool
    created_at: str


class Login(BaseModel):
    token: str
    token_type: str
    expires_in_s: int
    user: User


class Me(BaseModel):
    id: int
    username: str
    role: str


class Status(BaseModel):
    status: str


# --------------------------------------------------------------------------- studies
class StudyRow(BaseModel):
    id: int
    study_uid: str
    accession_number: str | None
    description: str | None
    modality: str
    model: str
    requested_priority: str
    status: str = Field(description="queued | analysing | analysed | not_analysed | failed | reviewed")
    finding: str | None = Field(description="the reported finding; null when the model refers the study to a human, "
                                            "reports no finding, or no model applies (not_analysed)")
    critical_probability: float | None
    critical: bool
    refer: bool
    received_at: str
    waiting_minutes: float
    score: float = Field(description="triage priority score (higher: more urgent)")
    urgency: str = Field(description="high | medium | low")
    error: str | None
    not_analysed_reason: str | None = Field(description='why no model was run, e.g. "not analysed: no model applies (SHOULDER MR): ..."')


class WorklistFilters(BaseModel):
    modality: str | None
    status: str


class Worklist(BaseModel):
    items: list[StudyRow]
    total: int
    page: int
    page_size: int
    pages: int
    filters: WorklistFilters


class Instance(BaseModel):
    id: int
    original_name: str
    format: str
    rows: int
    columns: int
    sop_instance_uid: str | None
    patient_sex: str | None
    patient_age: int | None
    image_url: str


class Result(BaseModel):
    id: int
    instance_id: int
    model: str
    task: str
    labels: list[str]
    findings: list[str]
    label: str = Field(description="the model's decided class, kept for the record; not a finding unless reported_finding names it")
    reported_finding: str | None = Field(description="what the result states; null when referred or no finding")
    probabilities: dict[str, float]
    confidence: float
    refer: bool
    statement: str
    critical_probability: float
    critical: bool
    heatmap_label: str | None
    created_at: str
    image_url: str
    overlay_url: str | None
    heatmap_url: str | None


class StudyJob(BaseModel):
    id: int
    status: str
    attempts: int
    last_error: str | None


class ReviewFinding(BaseModel):
    finding: str
    model_present: bool
    reviewer_present: bool
    action: str = Field(description="confirm | correct")


class Review(BaseModel):
    id: int
    study_id: int
    result_id: int
    reviewer: str
    reviewer_name: str
    label: str
    action: str = Field(description="confirm | correct | exclude (not applicable, wrong body part, poor quality)")
    note: str
    created_at: str
    findings: list[ReviewFinding]


class StudyDetail(StudyRow):
    instances: list[Instance]
    results: list[Result]
    key_result_id: int | None
    job: StudyJob | None
    reviews: list[Review] | None = Field(default=None, description="absent for technologists and in the upload answer")


# --------------------------------------------------------------------------- agreement
class Proportion(BaseModel):
    value: float | None
    ci: list[float] | None = Field(description="95% Wilson interval")
    n: int


class Rates(BaseModel):
    tp: int
    fn: int
    tn: int
    fp: int
    n: int
    sensitivity: Proportion
    specificity: Proportion
    agreement: Proportion


class PeriodRates(Rates):
    period: str


class FindingAgreement(BaseModel):
    overall: Rates
    over_time: list[PeriodRates]


class Agreement(BaseModel):
    period: str
    reference: str
    models: dict[str, dict[str, FindingAgreement]] = Field(description="model name -> finding -> rates")


# --------------------------------------------------------------------------- audit
class AuditEvent(BaseModel):
    id: int
    ts: str
    actor: str
    role: str | None
    action: str
    object_type: str
    object_id: str | None
    client_ip: str | None
    detail: dict[str, Any]
    hash: str


class AuditPage(BaseModel):
    items: list[AuditEvent]
    total: int
    page: int
    page_size: int


class AuditVerify(BaseModel):
    ok: bool
    checked: int
    head: str
    problems: list[str]


class Problem(BaseModel):
    """Every refusal's body: ``detail`` says why (FastAPI's request validation: a list of the bad fields)."""

    model_config = {"extra": "allow"}
    detail: str | list[dict[str, Any]]
    error: str | None = Field(default=None, description="the error's class name, where the service refused on purpose")


def problem(description: str) -> dict[str, Any]:
    return {"model": Problem, "description": description}


#: refusals the gate and the error mapping answer, by status (listed on each route where they happen)
REFUSALS = {
    401: problem("not authenticated"),
    403: problem("the caller's role may not do this, or a cookie request lacks its CSRF token"),
    404: problem("no such object"),
    409: problem("conflicts with the current state (a duplicate study, the last active admin)"),
    413: problem("the upload or an image in it is too large"),
    422: problem("invalid input (request validation, or a value the service refuses)"),
    429: problem("too many failed logins: wait the Retry-After seconds"),
    503: problem("busy: retry after the Retry-After seconds"),
}

#: a PNG answer, for the OpenAPI entry of the image routes
PNG = {200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}, "description": "the image"}}
