"""Pull mode: find studies with QIDO-RS and fetch them with WADO-RS (dicomweb-client).

For sites where MedSight may not receive pushes (no auto-routing rule on the
PACS), it asks the PACS instead. Retrieved instances are written atomically,
one file per instance named after its SOP Instance UID; ``medsight dicom pull
--queue`` hands each retrieved study to the service exactly as the listener
does (:class:`medsight.gateway.pipeline.ServiceStudyCallback`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import requests
from dicomweb_client.api import DICOMwebClient

from medsight.integration.files import atomic_write_dataset
from medsight.gateway.store import valid_uid
from medsight.errors import DicomGatewayError


@dataclass(frozen=True)
class StudySummary:
    study_instance_uid: str
    modalities: tuple[str, ...]
    n_instances: int | None


def _tag(item: dict, tag: str):
    values = item.get(tag, {}).get("Value") or []
    return values


class DicomWebSource:
    def __init__(self, url: str, session: requests.Session | None = None, timeout: float = 60.0):
        self.url = url.rstrip("/")
        self.client = DICOMwebClient(url=self.url, session=session)
        self.client.set_http_retry_params(retry=True, max_attempts=3, wait_exponential_multiplier=500,
                                          retriable_error_codes=(429, 502, 503, 504))
        self.timeout = timeout

    def search_studies(self, modality: str | None = None, limit: int = 10, **filters: str) -> list[StudySummary]:
        """QIDO-RS /studies with optional ModalitiesInStudy and other attribute filters."""
        search = dict(filters)
        if modality:
            search["ModalitiesInStudy"] = modality
        try:
            found = self.client.search_for_studies(search_filters=search, limit=limit)
        except (requests.RequestException, OSError) as exc:
            raise DicomGatewayError(f"QIDO-RS search at {self.url} failed: {exc}") from exc
        out = []
        for item in found:
            uid = (_tag(item, "0020000D") or [None])[0]
            if not valid_uid(uid):
                continue
            n = _tag(item, "00201208")
            out.append(StudySummary(uid, tuple(_tag(item, "00080061")), int(n[0]) if n else None))
        return out

    def retrieve_study(self, study_instance_uid: str, out_dir: str | Path) -> list[Path]:
        """WADO-RS /studies/{uid}: every instance as a Part 10 file under ``out_dir/<study>/``."""
        if not valid_uid(study_instance_uid):
            raise DicomGatewayError(f"{study_instance_uid!r} is not a valid Study Instance UID")
        try:
            datasets = self.client.retrieve_study(study_instance_uid)
        except (requests.RequestException, OSError) as exc:
            raise DicomGatewayError(f"WADO-RS retrieve of study {study_instance_uid} from {self.url} failed: {exc}") from exc
        paths = []
        for ds in datasets:
            sop = str(ds.get("SOPInstanceUID", ""))
            if not valid_uid(sop):
                continue
            paths.append(atomic_write_dataset(ds, Path(out_dir) / study_instance_uid / f"{sop}.dcm"))
        return paths


__all__ = ["DicomWebSource", "StudySummary"]
