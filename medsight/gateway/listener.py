"""DICOM Storage SCP: receive studies from modalities or a PACS and hand complete studies to a callback.

The listener does no analysis itself. When a study has had no new instance
for ``idle_timeout`` seconds it calls ``on_study_complete(ReceivedStudy)`` on
a worker thread; the default callback (:mod:`medsight.gateway.pipeline`) runs
the Predictor and sends SR + Secondary Capture back, and the service (issue
5) can pass its own callback that enqueues a job instead.

Security defaults: bound to 127.0.0.1; only listed calling AE titles may
associate (others get an A-ASSOCIATE-RJ, "calling AE title not recognised"),
and only requests addressed to our AE title ("called AE title not recognised"
otherwise). Connections that send nothing or garbage cannot hold the listener:
:mod:`medsight.gateway.admission` closes them after ``acse_timeout`` seconds,
or sooner when newer connections are waiting, and limits associations in all
and per peer address.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from pynetdicom import AE, evt, sop_class
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    RLELossless,
)

from medsight.gateway.admission import ConnectionGate, GatedAssociationServer
from medsight.gateway.store import InstanceStore, StoreResult

log = logging.getLogger("medsight.gateway.listener")

TRANSFER_SYNTAXES = [
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian,
    JPEGBaseline8Bit, JPEGExtended12Bit, JPEGLossless, JPEGLosslessSV1, JPEGLSLossless, JPEGLSNearLossless,
    JPEG2000Lossless, JPEG2000, RLELossless,
]

# The image storage classes a classification model can read (2-D projection,
# cross-sectional slices, ultrasound, photographs, secondary captures).
IMAGE_STORAGE_CLASSES = [
    sop_class.ComputedRadiographyImageStorage,
    sop_class.DigitalXRayImageStorageForPresentation, sop_class.DigitalXRayImageStorageForProcessing,
    sop_class.DigitalMammographyXRayImageStorageForPresentation, sop_class.DigitalMammographyXRayImageStorageForProcessing,
    sop_class.CTImageStorage, sop_class.EnhancedCTImageStorage,
    sop_class.MRImageStorage, sop_class.EnhancedMRImageStorage,
    sop_class.UltrasoundImageStorage, sop_class.UltrasoundMultiFrameImageStorage,
    sop_class.SecondaryCaptureImageStorage, sop_class.MultiFrameTrueColorSecondaryCaptureImageStorage,
    sop_class.MultiFrameGrayscaleByteSecondaryCaptureImageStorage, sop_class.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    sop_class.NuclearMedicineImageStorage, sop_class.PositronEmissionTomographyImageStorage,
    sop_class.XRayAngiographicImageStorage, sop_class.XRayRadiofluoroscopicImageStorage,
    sop_class.VLPhotographicImageStorage, sop_class.VLEndoscopicImageStorage, sop_class.VLMicroscopicImageStorage,
    sop_class.OphthalmicPhotography8BitImageStorage, sop_class.DigitalIntraOralXRayImageStorageForPresentation,
    sop_class.BreastTomosynthesisImageStorage,
]


@dataclass(frozen=True)
class ListenerConfig:
    ae_title: str = "MEDSIGHT"
    host: str = "127.0.0.1"
    port: int = 11112
    data_dir: Path = Path("medsight-dicom")
    allowed_calling_aets: tuple[str, ...] = ()
    allow_any_ae: bool = False
    idle_timeout: float = 30.0
    deid: object | None = None  # medsight.integration.deid.DeidConfig: de-identify on arrival
    workers: int = 1  # study-complete callbacks run one at a time by default (CPU-bound inference)
    #: Keep the inbox copy of a study after the callback handed it off (the service then holds its own
    #: copy). Off by default so a busy PACS feed does not fill the disk with a second copy of every study.
    keep_received: bool = False
    #: DICOM over TLS (:mod:`medsight.integration.tls`); with ``tls.ca_file`` clients must present a certificate.
    tls: object | None = None  # medsight.integration.tls.TlsSettings
    #: Seconds a connection may take for its TLS handshake and A-ASSOCIATE-RQ (and, later, an A-RELEASE).
    acse_timeout: float = 5.0
    #: Associations at once, in all and from one IP address; as many connections that have not
    #: associated yet are kept besides (the oldest is closed when a new one comes).
    max_associations: int = 32
    max_per_peer: int = 8
    #: Seconds an established association may stay silent (and a DIMSE reply may take).
    network_timeout: float = 60.0
    #: Reject requests addressed to another AE title (off only for senders that cannot be configured).
    require_called_aet: bool = True

    def __post_init__(self) -> None:
        if not self.allow_any_ae and not self.allowed_calling_aets:
            raise ValueError("configure allowed_calling_aets, or set allow_any_ae=True explicitly")
        if not 0 < len(self.ae_title.strip()) <= 16:
            raise ValueError("AE title must be 1-16 characters")
        if min(self.acse_timeout, self.network_timeout) <= 0 or min(self.max_associations, self.max_per_peer) < 1:
            raise ValueError("timeouts must be positive, max_associations and max_per_peer at least 1")


@dataclass
class ReceivedStudy:
    """What a study-complete callback gets: the study and the stored files of all its instances."""

    study_instance_uid: str
    files: list[Path]
    calling_aets: set[str] = field(default_factory=set)
    data_dir: Path = Path(".")


@dataclass(frozen=True)
class StudyOutcome:
    """What a study-complete callback reports.

    ``handed_off``: the study's files are now held durably by someone else (the service stored its
    own copies in the same transaction as the queued job), so the listener may delete its inbox copy.
    A callback that returns anything else (or a refusal) leaves the inbox copy in place.
    """

    message: str
    handed_off: bool = False

    def __str__(self) -> str:
        return self.message


StudyCallback = Callable[[ReceivedStudy], object]


class StorageSCP:
    """A running (or startable) listener. ``start()`` returns at once; ``stop()`` shuts it down."""

    def __init__(self, config: ListenerConfig, on_study_complete: StudyCallback | None = None,
                 store: InstanceStore | None = None):
        self.config = config
        self.store = store or InstanceStore(config.data_dir, deid=config.deid)
        self.on_study_complete = on_study_complete
        self._server = None
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=config.workers, thread_name_prefix="medsight-study")
        self.completed: list[str] = []  # study UIDs whose callback finished (for monitoring and tests)

    # -- lifecycle ----------------------------------------------------------
    def start(self) -> "StorageSCP":
        cfg = self.config
        ae = AE(ae_title=cfg.ae_title)
        # pynetdicom counts every connection's thread, associated or not; the gate enforces the
        # limits, this is only a backstop above what the gate lets in
        ae.maximum_associations = 4 * cfg.max_associations
        ae.network_timeout = ae.dimse_timeout = cfg.network_timeout
        ae.acse_timeout = cfg.acse_timeout  # also pynetdicom's ARTIM timer: a silent connection is closed after it
        ae.require_called_aet = cfg.require_called_aet
        if not cfg.allow_any_ae:
            ae.require_calling_aet = list(cfg.allowed_calling_aets)
        ae.add_supported_context(sop_class.Verification)
        for cls in IMAGE_STORAGE_CLASSES:
            ae.add_supported_context(cls, TRANSFER_SYNTAXES)
        self._gate = ConnectionGate(cfg.max_associations, cfg.max_per_peer, cfg.acse_timeout, cfg.network_timeout)
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_C_ECHO, self._on_echo),
                    (evt.EVT_REJECTED, self._on_rejected), (evt.EVT_ACCEPTED, self._on_accepted), *self._gate.handlers()]
        ssl_context = cfg.tls.server_context() if cfg.tls is not None else None  # fails before binding
        server = ae.make_server((cfg.host, cfg.port), evt_handlers=handlers, ssl_context=ssl_context,
                                server_class=GatedAssociationServer, gate=self._gate)
        threading.Thread(target=server.serve_forever, name="medsight-dicom-accept", daemon=True).start()
        self._server = server
        self._watcher = threading.Thread(target=self._watch, name="medsight-study-watcher", daemon=True)
        self._watcher.start()
        log.info("listening as %s on %s:%s%s", self.config.ae_title, self.config.host, self.port,
                 " (TLS)" if self.config.tls is not None else "")
        return self

    @property
    def port(self) -> int:
        """The bound port (useful when configured with port 0)."""
        return self._server.server_address[1] if self._server else self.config.port

    def stop(self) -> None:
        self._stop.set()
        if self._server is not None:
            self._server.shutdown()
            self._server = None
        self._pool.shutdown(wait=True)

    def wait(self) -> None:
        while not self._stop.wait(1.0):
            pass

    def __enter__(self) -> "StorageSCP":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # -- DIMSE handlers -----------------------------------------------------
    def _on_echo(self, event) -> int:
        log.info("C-ECHO from %s", event.assoc.requestor.ae_title)
        return 0x0000

    def _on_accepted(self, event) -> None:
        log.info("association accepted from %s (%s)", event.assoc.requestor.ae_title, event.assoc.requestor.address)

    def _on_rejected(self, event) -> None:
        rj = event.assoc.acceptor.primitive  # the A-ASSOCIATE-RJ pynetdicom sent
        rq = event.assoc.requestor
        log.warning("association rejected (%s): calling AE %r, called AE %r, from %s",
                    rj.reason_str if rj is not None else "no reason given", rq.ae_title, rq.primitive.called_ae_title,
                    rq.address)

    def _on_store(self, event) -> int:
        req = event.request
        raw = req.DataSet.getvalue() if req.DataSet is not None else b""
        result: StoreResult = self.store.ingest(
            raw, str(event.context.transfer_syntax), str(req.AffectedSOPClassUID), str(req.AffectedSOPInstanceUID),
            calling_aet=str(event.assoc.requestor.ae_title))
        # UIDs only: never log patient attributes
        if result.ok:
            log.info("C-STORE %s instance %s of study %s from %s", "duplicate" if result.duplicate else "stored",
                     result.sop_instance_uid, result.study_uid, event.assoc.requestor.ae_title)
        else:
            log.warning("C-STORE refused with status 0x%04X (%s): instance %s from %s", result.status, result.reason,
                        req.AffectedSOPInstanceUID, event.assoc.requestor.ae_title)
        return result.status

    # -- study completion ---------------------------------------------------
    def _watch(self) -> None:
        period = max(0.05, min(1.0, self.config.idle_timeout / 4))
        while not self._stop.wait(period):
            self._gate.sweep()
            for st in self.store.due_studies(self.config.idle_timeout):
                study = ReceivedStudy(st.uid, sorted(st.instances.values()), st.calling_aets, self.config.data_dir)
                self._pool.submit(self._complete, study)

    def _complete(self, study: ReceivedStudy) -> None:
        log.info("study %s complete (%d instances)", study.study_instance_uid, len(study.files))
        outcome = None
        if self.on_study_complete is not None:
            try:
                outcome = self.on_study_complete(study)
            except Exception:  # a failing callback must not stop the listener
                log.exception("study-complete callback failed for study %s", study.study_instance_uid)
                return
        self.store.mark_complete(study.study_instance_uid, {"instances": len(study.files), "outcome": str(outcome)[:500]})
        if isinstance(outcome, StudyOutcome) and outcome.handed_off and not self.config.keep_received:
            removed = self.store.release(study.study_instance_uid, study.files)
            log.info("study %s: %d inbox files removed (the service holds its copy)", study.study_instance_uid, removed)
        self.completed.append(study.study_instance_uid)


__all__ = ["StorageSCP", "ListenerConfig", "ReceivedStudy", "StudyCallback", "StudyOutcome", "IMAGE_STORAGE_CLASSES", "TRANSFER_SYNTAXES"]
