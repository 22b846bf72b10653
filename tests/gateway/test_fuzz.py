"""Mutation fuzzing of the receive path with Hypothesis, seeded with real pydicom-data files.

The bulk (a few thousand cases) goes straight to :meth:`InstanceStore.ingest`,
the function the C-STORE handler calls; a few hundred go over the network to
a running listener. Properties: ingest never raises; every answer is one of
the documented statuses; a success leaves a complete file that re-reads and
whose name is its content hash; a failure leaves nothing behind; the listener
answers every request and still serves afterwards.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom import AE, sop_class
from pynetdicom.dsutils import split_dataset

from medsight.gateway.listener import IMAGE_STORAGE_CLASSES, ListenerConfig, StorageSCP
from medsight.gateway.store import (
    CANNOT_UNDERSTAND,
    DOES_NOT_MATCH_SOP_CLASS,
    DUPLICATE_SOP_INSTANCE,
    OUT_OF_RESOURCES,
    SUCCESS,
    InstanceStore,
)

from tests.integration.conftest import DATA

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

# small real files of different encodings: explicit/implicit LE, big endian, RLE, JPEG-LS, JPEG 2000, palette, multi-frame
SEEDS = ["SC_rgb.dcm", "emri_small.dcm", "emri_small_big_endian.dcm", "emri_small_RLE.dcm", "emri_small_jpeg_ls_lossless.dcm",
         "emri_small_jpeg_2k_lossless.dcm", "color-px.dcm", "OBXXXX1A_rle.dcm", "SC_rgb_2frame.dcm"]
STATUSES = {SUCCESS, CANNOT_UNDERSTAND, DOES_NOT_MATCH_SOP_CLASS, DUPLICATE_SOP_INSTANCE, OUT_OF_RESOURCES}


def _seed(name: str) -> tuple[bytes, str]:
    """The data set bytes as they travel in P-DATA (after the File Meta), and their transfer syntax."""
    meta, offset = split_dataset(DATA / name)
    return (DATA / name).read_bytes()[offset:], str(meta.TransferSyntaxUID)


SEED_BYTES = {name: _seed(name) for name in SEEDS}
SEED_CLASSES = {name: str(split_dataset(DATA / name)[0].MediaStorageSOPClassUID) for name in SEEDS}
# over the network only seeds whose SOP class the listener accepts (color-px.dcm is the retired US class)
NET_SEEDS = [n for n in SEEDS if SEED_CLASSES[n] in {str(c) for c in IMAGE_STORAGE_CLASSES}]


@st.composite
def mutated(draw, seeds: list[str] = SEEDS) -> tuple[str, bytes, str]:
    name = draw(st.sampled_from(seeds))
    data, ts = SEED_BYTES[name]
    buf = bytearray(data)
    # most structure (tags, VRs, lengths, UIDs) sits in the first 2 KB; hit it harder
    for _ in range(draw(st.integers(1, 6))):
        op = draw(st.sampled_from(["flip", "byte", "truncate", "insert", "delete", "length", "ts"]))
        hot = min(len(buf), 2048) if draw(st.booleans()) else len(buf)
        if not buf:
            break
        pos = draw(st.integers(0, max(0, hot - 1)))
        if op == "flip":
            buf[pos] ^= 1 << draw(st.integers(0, 7))
        elif op == "byte":
            buf[pos] = draw(st.integers(0, 255))
        elif op == "truncate":
            del buf[pos:]
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif op == "delete":
            del buf[pos: pos + draw(st.integers(1, 64))]
        elif op == "length":  # a huge or wrong declared length
            buf[pos: pos + 4] = draw(st.sampled_from([b"\xff\xff\xff\xff", b"\xf0\xff\xff\x7f", b"\x00\x00\x00\x80", b"\x01\x00\x00\x00"]))
        elif op == "ts":  # decode with the wrong transfer syntax
            ts = draw(st.sampled_from(["1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"]))
    return name, bytes(buf), ts


def _check_store_state(store: InstanceStore, before: set[Path], result) -> None:
    files = set(store.instances_dir.rglob("*")) if store.instances_dir.exists() else set()
    assert not [f for f in files if f.name.startswith(".partial-")], "temporary file left behind"
    new = {f for f in files if f.is_file()} - before
    if result.status == SUCCESS and not result.duplicate:
        assert new == {result.path}
        data = result.path.read_bytes()
        assert result.path.stem == hashlib.sha256(data).hexdigest()
        ds = pydicom.dcmread(io.BytesIO(data))
        assert str(ds.SOPInstanceUID) == result.sop_instance_uid
        assert (store.studies_dir / result.study_uid / f"{result.sop_instance_uid}.json").exists()
    else:
        assert new == set(), f"status 0x{result.status:04X} but files were written"


@pytest.fixture(scope="module")
def fuzz_store(tmp_path_factory) -> InstanceStore:
    return InstanceStore(tmp_path_factory.mktemp("fuzz-store"))


@settings(max_examples=2500, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(case=mutated())
def test_ingest_never_raises_and_never_stores_half(fuzz_store: InstanceStore, case) -> None:
    _, data, ts = case
    before = {f for f in fuzz_store.instances_dir.rglob("*") if f.is_file()} if fuzz_store.instances_dir.exists() else set()
    result = fuzz_store.ingest(data, ts)
    assert result.status in STATUSES, hex(result.status)
    assert result.reason
    _check_store_state(fuzz_store, before, result)


def test_unmutated_seeds_are_accepted(tmp_path: Path) -> None:
    """The fuzz seeds themselves are valid: failures above come from the mutations."""
    for name in SEEDS:  # a store each: several seeds are one instance in different encodings
        data, ts = SEED_BYTES[name]
        assert InstanceStore(tmp_path / name).ingest(data, ts).status == SUCCESS, name


@pytest.fixture(scope="module")
def fuzz_listener(tmp_path_factory):
    cfg = ListenerConfig(port=0, data_dir=tmp_path_factory.mktemp("fuzz-net"), allowed_calling_aets=("FUZZER",), idle_timeout=3600)
    scp = StorageSCP(cfg).start()
    yield scp
    scp.stop()


@pytest.fixture(scope="module")
def fuzz_ae():
    ae = AE(ae_title="FUZZER")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for cx in sorted({SEED_CLASSES[n] for n in NET_SEEDS}):
        for ts in ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5",
                   "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"):
            ae.add_requested_context(cx, ts)  # one context per syntax: raw bytes travel in their own
    ae.add_requested_context(sop_class.Verification)
    return ae


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(case=mutated(NET_SEEDS))
def test_listener_answers_every_mutated_instance(fuzz_listener, fuzz_ae, tmp_path_factory, case) -> None:
    import pynetdicom._config

    pynetdicom._config.STORE_SEND_CHUNKED_DATASET = True  # send the bytes as they are, undecoded
    name, data, _ = case
    # send the mutated bytes raw, declared with the seed's own context, as a sender with a corrupt file would
    meta = pydicom.dataset.FileMetaDataset()
    seed_meta, _ = split_dataset(DATA / name)
    meta.MediaStorageSOPClassUID = seed_meta.MediaStorageSOPClassUID
    meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    meta.TransferSyntaxUID = seed_meta.TransferSyntaxUID
    buf = io.BytesIO()
    buf.write(b"\x00" * 128 + b"DICM")
    pydicom.filewriter.write_file_meta_info(buf, meta, enforce_standard=True)
    path = tmp_path_factory.getbasetemp() / "fuzz-case.dcm"
    path.write_bytes(buf.getvalue() + data)
    assoc = fuzz_ae.associate("127.0.0.1", fuzz_listener.port, ae_title="MEDSIGHT")
    assert assoc.is_established
    try:
        status = assoc.send_c_store(path)
    finally:
        pynetdicom._config.STORE_SEND_CHUNKED_DATASET = False
        if assoc.is_established:
            assoc.release()
    assert "Status" in status, "no C-STORE response: the listener dropped the request"
    assert status.Status in STATUSES, hex(status.Status)


def test_listener_still_serves_after_fuzzing(fuzz_listener, fuzz_ae) -> None:
    assoc = fuzz_ae.associate("127.0.0.1", fuzz_listener.port, ae_title="MEDSIGHT")
    assert assoc.send_c_echo().Status == 0x0000
    assoc.release()
    partial = [f for f in (fuzz_listener.config.data_dir / "instances").rglob(".partial-*")] if (fuzz_listener.config.data_dir / "instances").exists() else []
    assert partial == []
