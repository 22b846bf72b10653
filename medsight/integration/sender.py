"""Deliver results to a PACS by C-STORE (pynetdicom) or STOW-RS (dicomweb-client), through an outbox.

Nothing is ever dropped: every object is first written to ``outbox/pending``
(atomically), and only a confirmed success removes it. Transient failures
(network down, association rejected or aborted, out-of-resources status)
leave it pending for the next retry; a permanent refusal by the receiver
(e.g. 0xA900 "does not match SOP class") moves it to ``outbox/rejected`` with
the reason next to it, so an administrator can look at it; it is not deleted.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset

from medsight.integration.files import atomic_write_bytes, encode_part10
from medsight.integration.tls import TlsSettings
from medsight.errors import DicomSendError

log = logging.getLogger("medsight.integration.sender")


@dataclass(frozen=True)
class DimseDestination:
    ae_title: str
    host: str
    port: int
    tls: TlsSettings | None = None  # DICOM over TLS (the receiver's certificate is verified)

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}" + (" (TLS)" if self.tls is not None else "")

    def tls_args(self):  # noqa: ANN201 - pynetdicom's (SSLContext, server hostname) or None
        """``AE.associate(tls_args=...)`` for this destination; bad certificate files raise TlsConfigError."""
        return (self.tls.client_context(), self.host) if self.tls is not None else None


@dataclass(frozen=True)
class StowDestination:
    url: str

    def __str__(self) -> str:
        return self.url


Destination = DimseDestination | StowDestination


def parse_destination(text: str, tls: TlsSettings | None = None) -> Destination:
    """``AE@host:port`` for C-STORE (over TLS when ``tls`` is given), ``http(s)://.../dicom-web`` for STOW-RS."""
    if re.match(r"^https?://", text):
        return StowDestination(text.rstrip("/"))
    m = re.fullmatch(r"([^@\s]{1,16})@([^:\s]+):(\d{1,5})", text.strip())
    if not m or not 0 < int(m.group(3)) < 65536:
        raise DicomSendError(f"destination {text!r} is neither AE@host:port nor an http(s) DICOMweb URL")
    return DimseDestination(m.group(1), m.group(2), int(m.group(3)), tls)


@dataclass
class SendOutcome:
    ok: bool
    permanent: bool = False  # the receiver refused the object itself; retrying will not help
    detail: str = ""


# C-STORE statuses after which the same object will be refused again (PS3.4 B.2.3).
def _is_permanent(status: int) -> bool:
    return (status & 0xFF00) in (0xA900, 0xC000) or status in (0x0111, 0x0122, 0x0124)


def send_dimse(paths: list[Path], dest: DimseDestination, calling_aet: str = "MEDSIGHT", timeout: float = 30.0) -> dict[Path, SendOutcome]:
    """C-STORE each file over one association; per-file outcome (association failures mark all as transient)."""
    from pynetdicom import AE
    from pynetdicom.presentation import build_context
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

    datasets: dict[Path, Dataset] = {}
    results: dict[Path, SendOutcome] = {}
    for p in paths:
        try:
            datasets[p] = pydicom.dcmread(p)
        except Exception as exc:
            results[p] = SendOutcome(False, True, f"unreadable: {type(exc).__name__}: {exc}")
    contexts = {}
    for ds in datasets.values():
        ts = ds.file_meta.TransferSyntaxUID
        key = (str(ds.SOPClassUID), str(ts))
        contexts[key] = build_context(ds.SOPClassUID, [ts] + ([ExplicitVRLittleEndian, ImplicitVRLittleEndian] if not ts.is_compressed else []))
    ae = AE(ae_title=calling_aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    for cx in list(contexts.values())[:128]:
        ae.add_requested_context(cx.abstract_syntax, cx.transfer_syntax)
    if not datasets:
        return results
    tls_args = dest.tls_args()
    try:
        assoc = ae.associate(dest.host, dest.port, ae_title=dest.ae_title, tls_args=tls_args)
    except Exception as exc:
        return {**results, **{p: SendOutcome(False, False, f"cannot connect: {exc}") for p in datasets}}
    if not assoc.is_established:
        why = "association rejected" if assoc.is_rejected else "association aborted or no answer"
        return {**results, **{p: SendOutcome(False, False, f"{why} by {dest}") for p in datasets}}
    try:
        for p, ds in datasets.items():
            try:
                status = assoc.send_c_store(ds)
            except Exception as exc:  # e.g. no accepted presentation context for this SOP class
                results[p] = SendOutcome(False, True, f"not sent: {type(exc).__name__}: {exc}")
                continue
            if not status or "Status" not in status:
                results[p] = SendOutcome(False, False, "no C-STORE response (connection lost or timed out)")
            elif status.Status in (0x0000, 0xB000, 0xB006, 0xB007):
                results[p] = SendOutcome(True, detail=f"status 0x{status.Status:04X}")
            else:
                results[p] = SendOutcome(False, _is_permanent(status.Status), f"C-STORE status 0x{status.Status:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return results


def send_stow(paths: list[Path], dest: StowDestination, timeout: float = 30.0, session=None) -> dict[Path, SendOutcome]:
    """STOW-RS all files in one request (a multipart/related POST to .../studies)."""
    import requests
    from dicomweb_client.api import DICOMwebClient

    datasets = {p: pydicom.dcmread(p) for p in paths}
    client = DICOMwebClient(url=dest.url, session=session)
    client.set_http_retry_params(retry=False)
    try:
        response = client.store_instances(list(datasets.values()))
    except requests.HTTPError as exc:
        code = exc.response.status_code if exc.response is not None else 0
        permanent = 400 <= code < 500 and code not in (408, 429)
        return {p: SendOutcome(False, permanent, f"STOW-RS HTTP {code}") for p in paths}
    except (requests.RequestException, OSError) as exc:
        return {p: SendOutcome(False, False, f"STOW-RS unreachable: {exc}") for p in paths}
    failed = {str(item.ReferencedSOPInstanceUID) for item in (response.get("FailedSOPSequence") or [])}
    return {p: SendOutcome(str(ds.SOPInstanceUID) not in failed, str(ds.SOPInstanceUID) in failed,
                           "stored" if str(ds.SOPInstanceUID) not in failed else "refused by STOW-RS server")
            for p, ds in datasets.items()}


@dataclass
class FlushReport:
    sent: int = 0
    pending: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)


class Outbox:
    """Folder-backed queue of DICOM objects for one destination."""

    def __init__(self, folder: str | Path, destination: Destination, calling_aet: str = "MEDSIGHT",
                 attempts: int = 3, backoff: float = 0.5, timeout: float = 30.0):
        self.folder = Path(folder)
        self.pending_dir = self.folder / "pending"
        self.rejected_dir = self.folder / "rejected"
        self.destination = destination
        self.calling_aet = calling_aet
        self.attempts, self.backoff, self.timeout = attempts, backoff, timeout
        self._lock = threading.Lock()

    def put(self, ds: Dataset) -> Path:
        data = encode_part10(ds)
        return atomic_write_bytes(data, self.pending_dir / f"{hashlib.sha256(data).hexdigest()}.dcm")

    def put_file(self, path: str | Path) -> Path:
        data = Path(path).read_bytes()
        return atomic_write_bytes(data, self.pending_dir / f"{hashlib.sha256(data).hexdigest()}.dcm")

    def pending(self) -> list[Path]:
        return sorted(self.pending_dir.glob("*.dcm")) if self.pending_dir.is_dir() else []

    def flush(self) -> FlushReport:
        """Try to deliver everything pending, ``attempts`` times with exponential backoff."""
        with self._lock:
            report = FlushReport()
            todo = self.pending()
            for attempt in range(self.attempts):
                if not todo:
                    break
                if attempt:
                    time.sleep(self.backoff * 2 ** (attempt - 1))
                outcomes = self._send(todo)
                retry = []
                for path, outcome in outcomes.items():
                    if outcome.ok:
                        path.unlink(missing_ok=True)
                        report.sent += 1
                        log.info("sent %s to %s (%s)", path.name, self.destination, outcome.detail)
                    elif outcome.permanent:
                        self._reject(path, outcome.detail)
                        report.rejected += 1
                        report.errors.append(outcome.detail)
                    else:
                        retry.append(path)
                        self._note(path, outcome.detail)
                todo = retry
            report.pending = len(self.pending())
            for path in todo:
                report.errors.append(f"{path.name}: still pending")
                log.warning("could not send %s to %s yet; kept in %s", path.name, self.destination, self.pending_dir)
            return report

    def _send(self, paths: list[Path]) -> dict[Path, SendOutcome]:
        if isinstance(self.destination, StowDestination):
            return send_stow(paths, self.destination, self.timeout)
        return send_dimse(paths, self.destination, self.calling_aet, self.timeout)

    def _note(self, path: Path, detail: str) -> None:
        meta = path.with_suffix(".json")
        try:
            info = json.loads(meta.read_text()) if meta.exists() else {"attempts": 0}
        except (OSError, ValueError):
            info = {"attempts": 0}
        info.update(attempts=info.get("attempts", 0) + 1, last_error=detail, last_attempt=time.time())
        atomic_write_bytes(json.dumps(info).encode(), meta)

    def _reject(self, path: Path, detail: str) -> None:
        self.rejected_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(json.dumps({"reason": detail, "time": time.time()}).encode(), self.rejected_dir / f"{path.stem}.json")
        path.replace(self.rejected_dir / path.name)
        path.with_suffix(".json").unlink(missing_ok=True)
        log.error("destination %s refused %s permanently: %s (kept in %s)", self.destination, path.name, detail, self.rejected_dir)


class OutboxRetrier:
    """Background thread that flushes an outbox every ``interval`` seconds until stopped."""

    def __init__(self, outbox: Outbox, interval: float = 60.0):
        self.outbox, self.interval = outbox, interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="medsight-outbox", daemon=True)

    def start(self) -> "OutboxRetrier":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            if self.outbox.pending():
                try:
                    self.outbox.flush()
                except Exception:
                    log.exception("outbox retry failed")


__all__ = ["Outbox", "OutboxRetrier", "FlushReport", "SendOutcome", "DimseDestination", "StowDestination",
           "parse_destination", "send_dimse", "send_stow"]
