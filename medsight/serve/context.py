"""The service's collaborators, built once from settings and passed explicitly (no globals)."""

from __future__ import annotations

from dataclasses import dataclass

from medsight.io.budget import set_max_pixels
from medsight.predict.settings import RuntimeSettings
from medsight.serve.audit import KEY_INFO, UNKEYED_THROUGH_INFO
from medsight.serve.audit_key import load_or_create_audit_key
from medsight.serve.catalog import ModelCatalog
from medsight.serve.config import ServiceSettings
from medsight.serve.database import Database, last_audit_id, open_database
from medsight.serve.jobs import JobQueue
from medsight.serve.storage import FileStore


@dataclass
class ServiceContext:
    settings: ServiceSettings
    db: Database
    store: FileStore
    catalog: ModelCatalog
    queue: JobQueue

    @classmethod
    def build(cls, settings: ServiceSettings, migrate: bool = True) -> "ServiceContext":
        settings.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        set_max_pixels(settings.max_pixels)  # the readers' budget is per process: every entry point reads through them
        db = open_database(settings.db_url, migrate=migrate)
        key = load_or_create_audit_key(settings.audit_key_path, last_audit_id(db))
        db.sessions.configure(info={KEY_INFO: key.key, UNKEYED_THROUGH_INFO: key.unkeyed_through})
        runtime = RuntimeSettings(intra_op_threads=settings.inference_threads) if settings.inference_threads else None
        return cls(
            settings=settings, db=db, store=FileStore(settings.files_dir),
            catalog=ModelCatalog(settings.model_paths, settings.default_models, use_zoo=settings.use_zoo,
                                 backend=settings.inference_backend, runtime=runtime,
                                 routing_rules=settings.routing_rules),
            queue=JobQueue(db, settings.lease_seconds),
        )

    def close(self) -> None:
        self.db.dispose()
