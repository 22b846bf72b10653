"""Sending DICOM: C-STORE through the outbox, retry after an outage, permanent refusals kept, never dropped.

(The listener -> service -> SR/SC delivery path is tested in test_pipeline.py.)"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage

from medsight.dicom.listener import ListenerConfig, StorageSCP
from medsight.dicom.sender import DimseDestination, Outbox, StowDestination, parse_destination
from medsight.errors import DicomSendError

from .conftest import CT_STUDY, DATA, read
from .test_listener import wait_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MiniPacs:
    """A stand-in PACS: a pynetdicom Storage SCP for every storage class (SR included) that keeps
    what it receives; refuses data sets without pixel data where an image is expected, like real PACS do."""

    def __init__(self, folder: Path, port: int = 0):
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def _store(self, event) -> int:
        ds = event.dataset
        if "Rows" in ds and "PixelData" not in ds:
            return 0xA900
        ds.file_meta = event.file_meta
        ds.save_as(self.folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0x0000

    def received(self) -> list:
        return [read(f) for f in sorted(self.folder.glob("*.dcm"))]

    def stop(self) -> None:
        self.server.shutdown()


def pacs(tmp_path: Path, port: int = 0) -> MiniPacs:
    return MiniPacs(tmp_path / "pacs", port)


def test_parse_destination() -> None:
    assert parse_destination("PACS@10.0.0.5:104") == DimseDestination("PACS", "10.0.0.5", 104)
    assert parse_destination("https://pacs.local/dicom-web/") == StowDestination("https://pacs.local/dicom-web")
    for bad in ("PACS", "PACS@host", "PACS@host:99999", "WAYTOOLONGAETITLE17@h:104"):
        with pytest.raises(DicomSendError):
            parse_destination(bad)


def test_outbox_keeps_objects_through_an_outage_and_delivers_later(tmp_path: Path) -> None:
    port = free_port()
    box = Outbox(tmp_path / "outbox", DimseDestination("PACS", "127.0.0.1", port), attempts=2, backoff=0.05, timeout=5)
    box.put_file(DATA / CT_STUDY[0])
    box.put_file(DATA / CT_STUDY[1])
    report = box.flush()  # nobody listening
    assert report.sent == 0 and report.pending == 2
    pending = box.pending()
    assert len(pending) == 2
    meta = pending[0].with_suffix(".json").read_text()
    assert '"attempts": 2' in meta and ("cannot connect" in meta or "association" in meta)
    receiver = pacs(tmp_path, port=port)
    try:
        report = box.flush()
        assert report.sent == 2 and report.pending == 0 and box.pending() == []
        received = {ds.SOPInstanceUID for ds in receiver.received()}
        assert received == {read(DATA / n).SOPInstanceUID for n in CT_STUDY}
    finally:
        receiver.stop()


def test_permanent_refusal_is_kept_in_rejected_not_dropped(tmp_path: Path) -> None:
    receiver = pacs(tmp_path)
    try:
        ds = read(DATA / CT_STUDY[0])
        del ds.PixelData  # the receiver answers 0xA900
        box = Outbox(tmp_path / "outbox", DimseDestination("PACS", "127.0.0.1", receiver.port), attempts=3, backoff=0.01)
        box.put(ds)
        report = box.flush()
    finally:
        receiver.stop()
    assert report.rejected == 1 and report.sent == 0 and box.pending() == []
    kept = list((tmp_path / "outbox" / "rejected").glob("*.dcm"))
    assert len(kept) == 1 and read(kept[0]).SOPInstanceUID == ds.SOPInstanceUID
    assert "0xA900" in next((tmp_path / "outbox" / "rejected").glob("*.json")).read_text()


def test_stow_to_an_unreachable_server_stays_pending(tmp_path: Path) -> None:
    box = Outbox(tmp_path / "outbox", StowDestination(f"http://127.0.0.1:{free_port()}/dicom-web"), attempts=1, timeout=3)
    box.put_file(DATA / CT_STUDY[0])
    report = box.flush()
    assert report.pending == 1 and report.sent == 0


def test_cli_send_and_retry(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medsight.cli import app

    runner = CliRunner()
    port = free_port()
    outbox = tmp_path / "outbox"
    files = [str(DATA / n) for n in CT_STUDY]
    r = runner.invoke(app, ["dicom", "send", *files, "--dest", f"PACS@127.0.0.1:{port}", "--outbox", str(outbox)])
    assert r.exit_code == 1 and "still queued 2" in r.output  # nobody listening: kept, exit 1
    receiver = pacs(tmp_path, port=port)
    try:
        r = runner.invoke(app, ["dicom", "retry", "--dest", f"PACS@127.0.0.1:{port}", "--outbox", str(outbox)])
        assert r.exit_code == 0, r.output
        assert "sent 2, still queued 0" in r.output
        assert len(receiver.received()) == 2
    finally:
        receiver.stop()
    r = runner.invoke(app, ["dicom", "send", files[0], "--dest", "not-a-destination"])
    assert r.exit_code == 2 and "neither AE@host:port" in r.output
