"""The listener under the pixel budget: a deflated data set is inflated only once its header has passed."""

from __future__ import annotations

import logging
import tracemalloc
from pathlib import Path

import pytest
from pynetdicom import AE, sop_class
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from medsight.gateway.listener import ListenerConfig, StorageSCP
from medsight.gateway.store import CANNOT_UNDERSTAND, OUT_OF_RESOURCES, SUCCESS
from tests.io.bombs import deflated_dicom, native_dicom

#: Python heap growth allowed while the listener refuses a bomb (before the budget: the inflated 288 MB, twice).
PEAK_MB = 64


@pytest.fixture()
def listener(tmp_path: Path):
    cfg = ListenerConfig(port=0, data_dir=tmp_path / "scp", allowed_calling_aets=("BUDGET-TEST",), idle_timeout=60)
    scp = StorageSCP(cfg).start()
    yield scp
    scp.stop()


@pytest.fixture()
def assoc(listener: StorageSCP, monkeypatch):
    import pynetdicom._config

    # send files byte for byte as they are on disk (pynetdicom otherwise decodes and re-encodes them)
    monkeypatch.setattr(pynetdicom._config, "STORE_SEND_CHUNKED_DATASET", True)
    ae = AE(ae_title="BUDGET-TEST")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 30
    for ts in (DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian):  # one context each
        ae.add_requested_context(sop_class.SecondaryCaptureImageStorage, ts)
    a = ae.associate("127.0.0.1", listener.port, ae_title="MEDSIGHT")
    assert a.is_established
    yield a
    a.release()


def stored(listener: StorageSCP) -> list[Path]:
    return sorted((listener.config.data_dir / "instances").rglob("*.dcm"))


def test_a_deflated_bomb_over_c_store_is_refused_out_of_resources(listener: StorageSCP, assoc, tmp_path: Path, caplog) -> None:
    bomb = deflated_dicom(tmp_path / "bomb.dcm", 12000, 12000)  # 280 KB that inflate to 288 MB
    caplog.set_level(logging.WARNING, logger="medsight.gateway.listener")
    tracemalloc.start()
    try:
        status = assoc.send_c_store(bomb).Status
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == OUT_OF_RESOURCES
    assert "12000x12000" in caplog.text and "max_pixels" in caplog.text
    assert peak < PEAK_MB << 20
    assert stored(listener) == []
    # the association goes on, and a deflated instance within the budget is stored
    assert assoc.send_c_store(deflated_dicom(tmp_path / "small.dcm", 64, 64)).Status == SUCCESS
    assert len(stored(listener)) == 1


def test_pixel_data_three_times_longer_than_declared_cannot_be_understood(listener: StorageSCP, assoc, tmp_path: Path) -> None:
    long = native_dicom(tmp_path / "long.dcm", 64, 64, bytes(3 * 64 * 64 * 2))
    assert assoc.send_c_store(long).Status == CANNOT_UNDERSTAND
    liar = deflated_dicom(tmp_path / "liar.dcm", 64, 64, trailing_zeros=64 << 20)
    assert assoc.send_c_store(liar).Status == CANNOT_UNDERSTAND
    assert stored(listener) == []
