"""Storage SCP against real, independent clients (dcmtk echoscu/storescu) and a pynetdicom SCU.

What is checked: C-ECHO works, unknown calling AE titles and requests for another
called AE title are rejected;
real pydicom-data files arrive byte-identical in pixel data and are grouped
into studies; the study-complete callback fires once per study after the idle
timeout; bad input gets a specific DIMSE status, stores nothing and leaves
the listener serving; logs carry UIDs but no patient name or ID.
"""

from __future__ import annotations

import copy
import logging
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
from pynetdicom import AE, sop_class

from medsight.integration.deid import DeidConfig, remap_uid
from medsight.gateway.listener import ListenerConfig, StorageSCP
from medsight.gateway.store import (
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH_SOP_CLASS,
    DUPLICATE_SOP_INSTANCE,
    NOT_AUTHORIZED,
    InstanceStore,
)

from tests.integration.conftest import CT_STUDY, DATA, read, tool, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")
ALLOWED = ("STORESCU", "ECHOSCU", "MEDSIGHT-TEST")


@pytest.fixture()
def listener(tmp_path: Path):
    studies = []
    cfg = ListenerConfig(port=0, data_dir=tmp_path / "scp", allowed_calling_aets=ALLOWED, idle_timeout=1.5)
    scp = StorageSCP(cfg, on_study_complete=studies.append).start()
    scp.studies = studies
    yield scp
    scp.stop()


def scu(scp: StorageSCP, ae_title: str = "MEDSIGHT-TEST", contexts=None):
    ae = AE(ae_title=ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for cx in contexts or [sop_class.Verification, sop_class.CTImageStorage, sop_class.SecondaryCaptureImageStorage,
                           sop_class.MRImageStorage, sop_class.RTPlanStorage]:
        for ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1"):  # one context each: raw files are sent in their own syntax
            ae.add_requested_context(cx, ts)
    assoc = ae.associate("127.0.0.1", scp.port, ae_title="MEDSIGHT")
    assert assoc.is_established
    return assoc


def part10_raw(dataset_bytes: bytes, sop_class_uid: str, sop_instance_uid: str) -> bytes:
    """A Part 10 file whose data set bytes are exactly ``dataset_bytes`` (Implicit VR Little Endian)."""
    import io

    from pydicom.dataset import FileMetaDataset
    from pydicom.filewriter import write_file_meta_info

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = sop_class_uid, sop_instance_uid
    meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    write_file_meta_info(buf, meta, enforce_standard=True)
    return buf.getvalue() + dataset_bytes


def stored_files(scp: StorageSCP) -> list[Path]:
    return sorted((scp.config.data_dir / "instances").rglob("*.dcm"))


def test_echoscu_succeeds_and_unknown_calling_ae_is_rejected(listener: StorageSCP, caplog) -> None:
    echoscu = tool("echoscu")
    ok = subprocess.run([echoscu, "-aet", "ECHOSCU", "-aec", "MEDSIGHT", "127.0.0.1", str(listener.port)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    with caplog.at_level(logging.WARNING, logger="medsight.gateway.listener"):
        bad = subprocess.run([echoscu, "-aet", "INTRUDER", "-aec", "MEDSIGHT", "127.0.0.1", str(listener.port)],
                             capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0
    assert "Calling AE Title Not Recognized" in bad.stderr
    assert any("INTRUDER" in r.getMessage() and "rejected" in r.getMessage() for r in caplog.records)


def test_a_wrong_called_ae_title_is_rejected_unless_the_operator_opts_out(listener: StorageSCP, tmp_path: Path,
                                                                         caplog) -> None:
    echoscu = tool("echoscu")
    with caplog.at_level(logging.WARNING, logger="medsight.gateway.listener"):
        bad = subprocess.run([echoscu, "-aet", "ECHOSCU", "-aec", "OTHER-PACS", "127.0.0.1", str(listener.port)],
                             capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "Called AE Title Not Recognized" in bad.stderr
    assert any("OTHER-PACS" in r.getMessage() and "Called AE title not recognised" in r.getMessage() for r in caplog.records)
    cfg = ListenerConfig(port=0, data_dir=tmp_path / "any-called", allowed_calling_aets=ALLOWED, require_called_aet=False)
    with StorageSCP(cfg) as scp:
        ok = subprocess.run([echoscu, "-aet", "ECHOSCU", "-aec", "OTHER-PACS", "127.0.0.1", str(scp.port)],
                            capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr


def test_listener_binds_loopback_and_requires_an_ae_policy(tmp_path: Path) -> None:
    assert ListenerConfig(allowed_calling_aets=("X",)).host == "127.0.0.1"
    with pytest.raises(ValueError, match="allowed_calling_aets"):
        ListenerConfig(data_dir=tmp_path)


def test_storescu_sends_real_files_which_arrive_intact_and_grouped(listener: StorageSCP, caplog) -> None:
    storescu = tool("storescu")
    uncompressed = [DATA / n for n in (*CT_STUDY, "MR2_UNCI.dcm")]
    with caplog.at_level(logging.INFO, logger="medsight"):
        r = subprocess.run([storescu, "-aet", "STORESCU", "-aec", "MEDSIGHT", "127.0.0.1", str(listener.port), *map(str, uncompressed)],
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        # compressed transfer syntaxes are accepted as they are (JPEG 2000 lossless, RLE)
        for flag, name in (("-xv", "US1_J2KR.dcm"), ("-xr", "OBXXXX1A_rle.dcm")):
            r = subprocess.run([storescu, flag, "-aet", "STORESCU", "-aec", "MEDSIGHT", "127.0.0.1", str(listener.port), str(DATA / name)],
                               capture_output=True, text=True, timeout=120)
            assert r.returncode == 0, (name, r.stderr)
        studies = wait_for(lambda: len(listener.studies) >= 4 and listener.studies)
    sent = [*uncompressed, DATA / "US1_J2KR.dcm", DATA / "OBXXXX1A_rle.dcm"]
    by_sop = {read(f).SOPInstanceUID: f for f in stored_files(listener)}
    assert len(by_sop) == len(sent)
    for original in sent:
        o = read(original)
        s = read(by_sop[o.SOPInstanceUID])
        assert s.PixelData == o.PixelData, original.name
        assert s.file_meta.TransferSyntaxUID == o.file_meta.TransferSyntaxUID
        assert s.StudyInstanceUID == o.StudyInstanceUID and s.PatientID == o.PatientID
    # callbacks per study, each with exactly that study's instances (the last one of a study sees all of them)
    groups = {s.study_instance_uid: {read(f).SOPInstanceUID for f in s.files} for s in studies}
    ct_uid = read(DATA / CT_STUDY[0]).StudyInstanceUID
    assert groups[ct_uid] == {read(DATA / n).SOPInstanceUID for n in CT_STUDY}
    assert len(groups) == 4
    assert all(s.calling_aets == {"STORESCU"} for s in studies)
    # logs name instances by UID only
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert ct_uid in text
    for f in sent:
        o = read(f)
        for secret in (str(o.PatientName), str(o.get("PatientID", ""))):
            if len(secret) >= 4:
                assert secret not in text


def test_bad_input_gets_a_status_and_stores_nothing(listener: StorageSCP, tmp_path: Path, monkeypatch) -> None:
    import pynetdicom._config

    # send files byte for byte as they are on disk (pynetdicom otherwise decodes and re-encodes them)
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    assoc = scu(listener)
    try:
        ct = read(DATA / CT_STUDY[0])
        # 1. no pixel data
        no_pixels = copy.deepcopy(ct)
        del no_pixels.PixelData
        no_pixels.SOPInstanceUID = pydicom.uid.generate_uid()
        assert assoc.send_c_store(no_pixels).Status == DOES_NOT_MATCH_SOP_CLASS
        # 2. truncated pixel data (header says 512x512x16 bit)
        short = copy.deepcopy(ct)
        short.PixelData = ct.PixelData[:1000]
        short.SOPInstanceUID = pydicom.uid.generate_uid()
        assert assoc.send_c_store(short).Status == DOES_NOT_MATCH_SOP_CLASS
        # 3. a UID that would escape the data folder
        evil = copy.deepcopy(ct)
        evil.StudyInstanceUID = "../../../../tmp/evil"
        assert assoc.send_c_store(evil).Status == DOES_NOT_MATCH_SOP_CLASS
        # 4. truncated data set bytes sent raw from a file (pynetdicom does not decode file paths)
        raw = (DATA / CT_STUDY[0]).read_bytes()
        cut = tmp_path / "cut.dcm"
        cut.write_bytes(raw[: len(raw) // 3])
        assert assoc.send_c_store(cut).Status == CANNOT_UNDERSTAND
        # 5. huge declared length: valid File Meta, then an element claiming ~4 GB of value
        huge = tmp_path / "huge.dcm"
        raw_ds = (b"\x08\x00\x16\x00" + b"\x1a\x00\x00\x00" + b"1.2.840.10008.5.1.4.1.1.2\x00"
                  + b"\x10\x00\x10\x00" + b"\xf0\xff\xff\xff" + b"Doe^John")
        huge.write_bytes(part10_raw(raw_ds, sop_class.CTImageStorage, pydicom.uid.generate_uid()))
        assert assoc.send_c_store(huge).Status == CANNOT_UNDERSTAND
        assert stored_files(listener) == []
        # 6. unknown SOP class: refused at association negotiation, nothing to send on
        plan_cx = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == sop_class.RTPlanStorage]
        assert plan_cx == []
        # 7. duplicates: identical -> success without a second copy; same UID other content -> 0x0111
        assert assoc.send_c_store(ct).Status == 0x0000
        assert assoc.send_c_store(ct).Status == 0x0000
        assert len(stored_files(listener)) == 1
        changed = copy.deepcopy(ct)
        changed.SeriesDescription = "something else"
        assert assoc.send_c_store(changed).Status == DUPLICATE_SOP_INSTANCE
        assert len(stored_files(listener)) == 1
        # the listener still serves on the same association
        assert assoc.send_c_echo().Status == 0x0000
    finally:
        assoc.release()
    assert not list(Path("/tmp").glob("evil*"))
    assert not list((listener.config.data_dir / "instances").rglob("*.tmp"))  # no half-written file left


def test_deidentify_on_arrival(tmp_path: Path) -> None:
    key = b"listener-site-key-0123456789abcdef"
    cfg = ListenerConfig(port=0, data_dir=tmp_path / "scp", allowed_calling_aets=("MEDSIGHT-TEST",), idle_timeout=0.3,
                         deid=DeidConfig(key=key))
    with StorageSCP(cfg) as scp:
        assoc = scu(scp)
        try:
            ct = read(DATA / CT_STUDY[0])
            assert assoc.send_c_store(ct).Status == 0x0000
            burned = read(DATA / "SC_rgb.dcm")
            burned.BurnedInAnnotation = "YES"
            assert assoc.send_c_store(burned).Status == NOT_AUTHORIZED
        finally:
            assoc.release()
        files = stored_files(scp)
        assert len(files) == 1
        stored = read(files[0])
        assert stored.PatientIdentityRemoved == "YES"
        assert stored.StudyInstanceUID == remap_uid(key, ct.StudyInstanceUID)
        assert str(stored.PatientName) != str(ct.PatientName) and stored.PixelData == ct.PixelData


def test_pending_studies_survive_a_restart(tmp_path: Path) -> None:
    from pynetdicom.dsutils import split_dataset

    store = InstanceStore(tmp_path)
    ct = read(DATA / CT_STUDY[0])
    _, offset = split_dataset(DATA / CT_STUDY[0])
    raw = (DATA / CT_STUDY[0]).read_bytes()[offset:]  # the data set as it travels in P-DATA
    result = store.ingest(raw, str(ct.file_meta.TransferSyntaxUID))
    assert result.ok
    assert store.due_studies(idle_timeout=60) == []  # still receiving
    again = InstanceStore(tmp_path)  # "restart": the study was never completed
    due = again.due_studies(idle_timeout=0, now=time.monotonic() + 1)
    assert [s.uid for s in due] == [ct.StudyInstanceUID]
    again.mark_complete(ct.StudyInstanceUID, {"instances": 1})
    assert InstanceStore(tmp_path).due_studies(idle_timeout=0, now=time.monotonic() + 1) == []


def test_cli_listen_end_to_end_with_dcmtk(tmp_path: Path, models_dir: Path) -> None:
    """`medsight dicom listen` as a hospital runs it: dcmtk's echoscu and storescu send a real study, the
    in-process service worker analyses it and the SR + overlays arrive at the configured PACS."""
    import json
    import socket
    import sys

    from tests.integration.conftest import pacs  # noqa: F401

    echoscu, storescu = tool("echoscu"), tool("storescu")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    receiver = pacs(tmp_path)
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"model_paths": [str(models_dir)], "use_zoo": False, "default_models": {"CT": "tiny-xr"},
                                    "poll_seconds": 0.2}))
    proc = subprocess.Popen([sys.executable, "-m", "medsight.cli", "dicom", "listen", "--port", str(port), "--calling-aet", "STORESCU",
                             "--data-dir", str(tmp_path / "d"), "--settings", str(settings), "--idle-timeout", "1",
                             "--acse-timeout", "3", "--max-associations", "4", "--max-per-peer", "2",
                             "--dest", f"PACS@127.0.0.1:{receiver.port}"], stderr=subprocess.PIPE, text=True)
    try:
        def echo_ok():
            return subprocess.run([echoscu, "-aet", "STORESCU", "-aec", "MEDSIGHT", "127.0.0.1", str(port)],
                                  capture_output=True, timeout=30).returncode == 0
        wait_for(echo_ok, timeout=120, period=0.5)
        sent = subprocess.run([storescu, "-aet", "STORESCU", "-aec", "MEDSIGHT", "127.0.0.1", str(port),
                               *[str(DATA / n) for n in CT_STUDY]], capture_output=True, text=True, timeout=60)
        assert sent.returncode == 0, sent.stderr
        results = wait_for(lambda: len(receiver.received()) >= 3 and receiver.received(), timeout=180, period=0.5)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        receiver.stop()
    assert sorted(r.Modality for r in results) == ["OT", "OT", "SR"]
    assert {r.StudyInstanceUID for r in results} == {read(DATA / CT_STUDY[0]).StudyInstanceUID}
    assert (tmp_path / "d" / "medsight.db").exists()  # the study went through the service's database
    no_policy = subprocess.run([sys.executable, "-m", "medsight.cli", "dicom", "listen", "--port", str(port)],
                               capture_output=True, text=True, timeout=120)
    assert no_policy.returncode == 2 and "--calling-aet" in no_policy.stderr
