"""Sending DICOM: C-STORE through the outbox, retry after an outage, permanent refusals kept, never dropped.

(The listener -> service -> SR/SC delivery path is tested in test_pipeline.py.)"""

from __future__ import annotations

from pathlib import Path

import pytest

from medsight.integration.sender import DimseDestination, Outbox, StowDestination, parse_destination
from medsight.errors import DicomSendError

from tests.integration.conftest import CT_STUDY, DATA, MiniPacs, free_port, pacs, read  # noqa: F401 (pacs is a fixture)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


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
