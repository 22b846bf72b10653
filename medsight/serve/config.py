"""Typed settings of the service: one object, built once, handed to everything.

Defaults make the service self-contained: a SQLite database and a files folder
inside ``data_dir``. ``MEDSIGHT_DATABASE_URL`` (or ``database_url``) switches
the database to PostgreSQL (``postgresql+psycopg://user@host:5432/db``).
``MEDSIGHT_SETTINGS`` names a JSON file with any of the fields below.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from medsight.integration.delivery import OutputSettings
from medsight.io.budget import DEFAULT_MAX_PIXELS, ENV_VAR as MAX_PIXELS_ENV
from medsight.models.applicability import RoutingRule

#: Modality codes (DICOM (0008,0060)) a radiology department can declare for PNG/JPEG uploads.
KNOWN_MODALITIES = ("CR", "DX", "CT", "MR", "US", "MG", "XC", "OT", "PX", "NM", "PT", "XA", "RF")

PRIORITIES = ("routine", "urgent", "stat")


class TriageWeights(BaseModel):
    """How a study's worklist priority is computed (see :mod:`medsight.serve.triage`).

    ``score = critical * P(critical finding) + requested[priority] + refer * [referred]
    + waiting * min(minutes waiting / waiting_cap_minutes, 1)``. Higher scores are read first.
    The defaults put a clinician's STAT request first, then a likely critical finding,
    so a STAT study is never buried under confident model findings, and waiting time
    breaks ties and keeps routine studies from starving.
    """

    model_config = ConfigDict(extra="forbid")
    critical: float = Field(default=0.40, ge=0)
    requested: dict[str, float] = {"stat": 0.50, "urgent": 0.25, "routine": 0.0}
    refer: float = Field(default=0.10, ge=0)
    waiting: float = Field(default=0.10, ge=0)
    waiting_cap_minutes: float = Field(default=240.0, gt=0)
    #: Score bands for the worklist colours (red >= high, amber >= medium).
    high: float = 0.45
    medium: float = 0.20


class WebhookSettings(BaseModel):
    """Where a critical result is announced. Deliveries are durable jobs with retry."""

    model_config = ConfigDict(extra="forbid")
    url: str | None = None
    timeout_s: float = Field(default=5.0, gt=0)
    max_attempts: int = Field(default=6, ge=1)
    backoff_base_s: float = Field(default=2.0, ge=0)
    backoff_max_s: float = Field(default=300.0, ge=0)


_OUTPUT_ENV = {"dicom_destination": "MEDSIGHT_DICOM_DEST", "fhir_url": "MEDSIGHT_FHIR_URL", "hl7_destination": "MEDSIGHT_HL7_DEST"}


class ServiceSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    data_dir: Path = Path("medsight-data")
    database_url: str | None = Field(default=None, description="SQLAlchemy URL; default: SQLite in data_dir")
    model_paths: list[Path] = Field(default_factory=list, description="extra model package folders searched before the zoo")
    use_zoo: bool = Field(default=True, description="also offer the shipped zoo and $MEDSIGHT_MODEL_PATH packages")
    #: Preferred model per DICOM modality when several apply to a study (used only if that model applies).
    default_models: dict[str, str] = {
        "CR": "pneumonia-cxr", "DX": "pneumonia-cxr", "US": "breast-us-busi", "MR": "brain-tumor-mri", "XC": "skin-lesion-ham",
    }
    #: The site's own words for body parts, e.g. ``{"keyword": "NEURO ROUTINE", "body_part": "HEAD",
    #: "fields": ["ProtocolName"]}``: checked before the built-in keyword table (docs/routing.md);
    #: a malformed rule stops the service at start-up.
    routing_rules: list[RoutingRule] = []
    #: How every model runs (``medsight.predict.backends``): ``auto`` takes the backend that
    #: ``medsight runtime tune`` recorded in the card (the fastest one that kept the test AUC within
    #: 0.005 of PyTorch); ``torch`` forces eager PyTorch, e.g. to compare against a research setup.
    inference_backend: Literal["auto", "torch", "onnx", "onnx-int8"] = "auto"
    #: Threads one forward pass may use; default: every core this process may run on.
    inference_threads: int | None = Field(default=None, ge=1)
    max_upload_bytes: int = Field(default=256 * 1024 * 1024, gt=0)
    max_files_per_upload: int = Field(default=500, gt=0)
    #: The pixel budget (:mod:`medsight.io.budget`; docs/security.md, "Limits"): the most samples (Rows x Columns
    #: x Samples per Pixel) one decoded frame or slice may have; deflated or gzip-compressed data may inflate to
    #: 16 bytes per sample of it. Checked from headers, before decoding, wherever an image enters (413 / 0xA700).
    max_pixels: int = Field(default=DEFAULT_MAX_PIXELS, gt=0)
    lease_seconds: float = Field(default=60.0, gt=0, description="a job whose worker stops heartbeating is reclaimed after this")
    heartbeat_seconds: float | None = Field(default=None, description="default: a third of the lease")
    max_attempts: int = Field(default=3, ge=1, description="claims of one analysis job before it is marked failed")
    poll_seconds: float = Field(default=0.5, gt=0)
    #: ``/health`` answers 503 "degraded" when no worker has beaten for this long, or when the
    #: oldest queued job has waited longer than ``queue_max_age_s`` (nobody is taking jobs).
    worker_stale_s: float = Field(default=60.0, gt=0)
    queue_max_age_s: float = Field(default=900.0, gt=0)
    #: ``medsight serve`` restarts a dead worker after 1, 2, 4 ... seconds, at most this long.
    worker_restart_max_backoff_s: float = Field(default=60.0, gt=0)
    token_hours: float = Field(default=12.0, gt=0)
    #: Login protection (:mod:`medsight.serve.throttle`, docs/security.md "Accounts"): an account's first
    #: ``login_free_failures`` consecutive wrong passwords are free; each further one locks it for
    #: ``login_lock_base_s``, twice that ... at most ``login_lock_max_s`` (a right password is refused meanwhile).
    login_free_failures: int = Field(default=5, ge=1)
    login_lock_base_s: float = Field(default=2.0, gt=0)
    login_lock_max_s: float = Field(default=900.0, gt=0)
    #: The same per client address (in memory, per web process): free failures, then waits up to the cap.
    client_free_failures: int = Field(default=10, ge=1)
    client_backoff_max_s: float = Field(default=300.0, gt=0)
    #: Password verifications (argon2, CPU-heavy) at once; a login waiting longer than ``hash_wait_s`` gets 503.
    hash_slots: int = Field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 2), ge=1)
    hash_wait_s: float = Field(default=2.0, gt=0)
    #: Reverse proxies (addresses or CIDR networks) whose ``X-Forwarded-For`` names the client; nobody else's is read.
    trusted_proxies: list[str] = []
    #: The audit chain's HMAC key (created 0600 on first start; default: ``<data_dir>.audit-key`` beside the data dir).
    audit_key_file: Path | None = None
    #: A session's repeated identical worklist read (the page's auto-refresh, a polling client) is audited once per this.
    audit_repeat_read_s: float = Field(default=300.0, ge=0)
    cookie_secure: bool = False
    public_url: str = "http://127.0.0.1:8000"
    triage: TriageWeights = TriageWeights()
    webhook: WebhookSettings = WebhookSettings()
    #: Results out: SR + overlays to a PACS, FHIR DiagnosticReport, HL7 ORU (durable ``deliver`` jobs).
    outputs: OutputSettings = OutputSettings()
    #: A study no model applies to gets a "not analysed" SR on the DICOM channel (no finding in it), so the
    #: PACS shows why no AI result will come; False: such a study is only on the worklist (docs/pacs-integration.md).
    not_analysed_notice: bool = True
    #: De-identify every DICOM file on arrival (web upload and DICOM listener) with this site key
    #: (PS3.15 Basic Profile + options, :mod:`medsight.integration.deid`). Results sent back then carry
    #: the de-identified UIDs, so a PACS holding the originals will not file them in its study.
    deid_key_file: Path | None = None
    #: Fault injection for crash-recovery tests only: the worker sleeps this long after
    #: claiming a job (heartbeating), so a test can kill it while it holds a lease.
    fault_claim_delay_s: float = Field(default=0.0, ge=0)

    @classmethod
    def from_env(cls, settings_file: Path | None = None, **overrides: object) -> "ServiceSettings":
        """Settings from ``settings_file`` (default ``$MEDSIGHT_SETTINGS``), ``MEDSIGHT_*`` variables, then overrides."""
        env: dict[str, object] = {}
        settings_file = settings_file or (Path(os.environ["MEDSIGHT_SETTINGS"]) if os.environ.get("MEDSIGHT_SETTINGS") else None)
        if settings_file is not None:
            env.update(json.loads(Path(settings_file).read_text()))
        if os.environ.get("MEDSIGHT_DATA_DIR"):
            env["data_dir"] = Path(os.environ["MEDSIGHT_DATA_DIR"])
        if os.environ.get("MEDSIGHT_DATABASE_URL"):
            env["database_url"] = os.environ["MEDSIGHT_DATABASE_URL"]
        if os.environ.get("MEDSIGHT_WEBHOOK_URL"):
            env["webhook"] = WebhookSettings(url=os.environ["MEDSIGHT_WEBHOOK_URL"])
        outputs = {key: os.environ[var] for key, var in _OUTPUT_ENV.items() if os.environ.get(var)}
        if outputs:
            env["outputs"] = OutputSettings.model_validate({**dict(env.get("outputs") or {}), **outputs})
        if os.environ.get("MEDSIGHT_DEID_ON_ARRIVAL"):
            env["deid_key_file"] = Path(os.environ["MEDSIGHT_DEID_ON_ARRIVAL"])
        if os.environ.get("MEDSIGHT_BACKEND"):
            env["inference_backend"] = os.environ["MEDSIGHT_BACKEND"]
        if os.environ.get("MEDSIGHT_PUBLIC_URL"):
            env["public_url"] = os.environ["MEDSIGHT_PUBLIC_URL"]
        if os.environ.get(MAX_PIXELS_ENV):
            env["max_pixels"] = int(os.environ[MAX_PIXELS_ENV])
        env.update({k: v for k, v in overrides.items() if v is not None})
        return cls.model_validate(env)

    @property
    def db_url(self) -> str:
        return self.database_url or f"sqlite:///{(self.data_dir / 'medsight.db').resolve()}"

    @property
    def files_dir(self) -> Path:
        return self.data_dir / "files"

    @property
    def audit_key_path(self) -> Path:
        return self.audit_key_file or self.data_dir.resolve().parent / f"{self.data_dir.resolve().name}.audit-key"

    @property
    def heartbeat_interval(self) -> float:
        return self.heartbeat_seconds or self.lease_seconds / 3.0

    def write_json(self, path: Path) -> Path:
        """Save these settings so another process (``medsight worker --settings``) runs the same service."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # it may name key files and a database URL
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(self.model_dump_json(indent=2))
        return path
