"""Pull mode over classic DICOM: find studies with C-FIND and fetch them with C-GET (pynetdicom).

Many installed PACS have no DICOMweb; every one answers Query/Retrieve. C-GET
is used rather than C-MOVE because it brings the instances back on the same
association: the PACS needs no route back to MedSight (no destination AE,
port or firewall opening), which is what a pull-only site wants. The
interface is :class:`medsight.gateway.dicomweb.DicomWebSource`'s, so ``medsight
dicom pull --queue`` treats both sources alike.

Each instance the PACS sends is decoded and checked like one the listener
receives (:func:`medsight.gateway.store.decode_dataset`, valid UIDs, pixel data
not truncated) and written atomically as ``out_dir/<study>/<sop>.dcm``; a bad
one is answered with a failure status, logged, and the rest of the study still
arrives.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pydicom.dataset import Dataset
from pydicom.uid import BasicTextSRStorage, ComprehensiveSRStorage, EnhancedSRStorage
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind, StudyRootQueryRetrieveInformationModelGet

from medsight.gateway.dicomweb import StudySummary
from medsight.integration.files import atomic_write_dataset
from medsight.gateway.listener import IMAGE_STORAGE_CLASSES, TRANSFER_SYNTAXES
from medsight.integration.sender import DimseDestination
from medsight.gateway.store import CANNOT_UNDERSTAND, DOES_NOT_MATCH_SOP_CLASS, SUCCESS, check_pixel_data, decode_dataset, valid_uid
from medsight.errors import DicomGatewayError

log = logging.getLogger("medsight.gateway.qr")

# What a C-GET may bring back: the images we analyse, and SRs (ours or others', skipped later by the pipeline).
RETRIEVE_CLASSES = [*IMAGE_STORAGE_CLASSES, BasicTextSRStorage, EnhancedSRStorage, ComprehensiveSRStorage]
_PENDING = (0xFF00, 0xFF01)
_GET_OK = (0x0000, 0xB000)  # success, or warning: some sub-operations failed (reported per instance)


class DimseSource:
    """Query/Retrieve SCU for one PACS (``AE@host:port``, optionally over TLS)."""

    def __init__(self, dest: DimseDestination, calling_aet: str = "MEDSIGHT", timeout: float = 60.0):
        self.dest = dest
        self.calling_aet = calling_aet
        self.timeout = timeout

    def _ae(self) -> AE:
        ae = AE(ae_title=self.calling_aet)
        ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = self.timeout
        return ae

    def _associate(self, ae: AE, what: str, **kwargs):  # noqa: ANN202 - pynetdicom Association
        tls_args = self.dest.tls_args()
        try:
            assoc = ae.associate(self.dest.host, self.dest.port, ae_title=self.dest.ae_title, tls_args=tls_args, **kwargs)
        except Exception as exc:
            raise DicomGatewayError(f"{what}: cannot connect to {self.dest}: {exc}") from exc
        if not assoc.is_established:
            why = "rejected the association" if assoc.is_rejected else "did not answer or aborted"
            raise DicomGatewayError(f"{what}: {self.dest} {why} (is our AE title {self.calling_aet!r} known to it?)")
        return assoc

    def search_studies(self, modality: str | None = None, limit: int = 10, **filters: str) -> list[StudySummary]:
        """C-FIND at STUDY level with optional Modalities in Study and other attribute filters (keywords)."""
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = ""
        query.ModalitiesInStudy = modality or ""
        query.NumberOfStudyRelatedInstances = ""
        for keyword, value in filters.items():
            setattr(query, keyword, value)
        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
        assoc = self._associate(ae, "C-FIND")
        found: list[StudySummary] = []
        final = None
        try:
            for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
                if not status:
                    raise DicomGatewayError(f"C-FIND at {self.dest}: connection lost or timed out")
                if status.Status in _PENDING:
                    uid = str(identifier.get("StudyInstanceUID", "")) if identifier is not None else ""
                    if valid_uid(uid) and len(found) < limit:
                        n = identifier.get("NumberOfStudyRelatedInstances")
                        mods = identifier.get("ModalitiesInStudy") or []
                        mods = [mods] if isinstance(mods, str) else list(mods)
                        found.append(StudySummary(uid, tuple(str(m) for m in mods), int(n) if n not in (None, "") else None))
                else:
                    final = status.Status
        finally:
            assoc.release()
        if final not in (0x0000, None):
            raise DicomGatewayError(f"C-FIND at {self.dest} failed with status 0x{final:04X}")
        return found

    def retrieve_study(self, study_instance_uid: str, out_dir: str | Path) -> list[Path]:
        """C-GET of a whole study; every instance as a Part 10 file under ``out_dir/<study>/``."""
        if not valid_uid(study_instance_uid):
            raise DicomGatewayError(f"{study_instance_uid!r} is not a valid Study Instance UID")
        folder = Path(out_dir) / study_instance_uid
        paths: list[Path] = []
        refused: list[str] = []

        def on_store(event) -> int:  # noqa: ANN001 - pynetdicom event
            try:
                ds = decode_dataset(event.request.DataSet.getvalue(), str(event.context.transfer_syntax))
            except Exception as exc:  # untrusted bytes: answer, log, go on with the rest of the study
                refused.append(f"undecodable instance: {type(exc).__name__}")
                return CANNOT_UNDERSTAND
            sop = str(ds.get("SOPInstanceUID", ""))
            if not valid_uid(sop) or str(ds.get("StudyInstanceUID", "")) != study_instance_uid:
                refused.append(f"{sop or '?'}: missing UIDs or another study")
                return DOES_NOT_MATCH_SOP_CLASS
            problem = check_pixel_data(ds) if "PixelData" in ds else None
            if problem:
                refused.append(f"{sop}: {problem}")
                return DOES_NOT_MATCH_SOP_CLASS
            ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            paths.append(atomic_write_dataset(ds, folder / f"{sop}.dcm"))
            return SUCCESS

        ae = self._ae()
        ae.add_requested_context(StudyRootQueryRetrieveInformationModelGet)
        for uid in RETRIEVE_CLASSES:  # 1 + 28 contexts, well under the 128 an association may propose
            ae.add_requested_context(uid, TRANSFER_SYNTAXES)
        roles = [build_role(uid, scp_role=True) for uid in RETRIEVE_CLASSES]
        query = Dataset()
        query.QueryRetrieveLevel = "STUDY"
        query.StudyInstanceUID = study_instance_uid
        assoc = self._associate(ae, "C-GET", ext_neg=roles, evt_handlers=[(evt.EVT_C_STORE, on_store)])
        final = None
        try:
            for status, _ in assoc.send_c_get(query, StudyRootQueryRetrieveInformationModelGet):
                if not status:
                    raise DicomGatewayError(f"C-GET at {self.dest}: connection lost or timed out")
                if status.Status not in _PENDING:
                    final = status
        finally:
            assoc.release()
        for reason in refused:
            log.warning("C-GET of study %s: refused %s", study_instance_uid, reason)
        if final is None or final.Status not in _GET_OK:
            code = f"0x{final.Status:04X}" if final is not None else "none"
            raise DicomGatewayError(f"C-GET of study {study_instance_uid} from {self.dest} failed (status {code}); "
                                    f"{len(paths)} instances arrived")
        if final.Status == 0xB000:
            failed = int(final.get("NumberOfFailedSubOperations", 0) or 0)
            log.warning("C-GET of study %s: %d instances arrived, %d failed", study_instance_uid, len(paths), failed)
        return paths


__all__ = ["DimseSource", "RETRIEVE_CLASSES"]
