"""docs/pacs-integration.md, section 2, followed as written, against a real Orthanc.

One settings file; ``medsight dicom listen --settings`` and ``medsight serve --settings --workers 0``
as two processes on it, with the shipped model zoo. Orthanc forwards three pydicom-data images: a
shoulder MR (``MR2_UNCR``) and a tibia film (``RG3_UNCR``), which no model applies to, and an adult's
chest film (``RG1_UNCR``), which the adult chest model reads and refers to a human. Orthanc then holds
no SR with a finding: two "not analysed" notices and one referral. A radiologist's review in the web
service then reaches Orthanc as the verified SR (before the shared settings file, the doc gave the
PACS to the listener alone and this SR was never sent).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.data import get_testdata_file

from tests.gateway.test_orthanc import OrthancServer, free_port, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

FILES = {"MR2_UNCR.dcm": "not analysed", "RG3_UNCR.dcm": "not analysed", "RG1_UNCR.dcm": "referral"}
PASSWORD = "a long test password 42"


def _medsight(*args: str, log: Path, stdin: str | None = None) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("MEDSIGHT_SETTINGS", None)
    return subprocess.Popen([sys.executable, "-m", "medsight.cli", *args], stdout=open(log, "w"), stderr=subprocess.STDOUT,
                            stdin=subprocess.PIPE if stdin is not None else None, env=env, text=True)


def _srs(pacs: OrthancServer, study_uid: str) -> list[pydicom.Dataset]:
    found = requests.post(f"{pacs.url}/tools/lookup", data=study_uid, timeout=10).json()
    study = next((f["ID"] for f in found if f["Type"] == "Study"), None)
    if study is None:
        return []
    out = []
    for inst in pacs.get(f"/studies/{study}/instances"):
        ds = pydicom.dcmread(io.BytesIO(requests.get(f"{pacs.url}/instances/{inst['ID']}/file", timeout=30).content))
        if ds.Modality == "SR":
            out.append(ds)
    return out


def _findings(sr: pydicom.Dataset) -> list[str]:
    """Every Finding (DCM 121071) the SR states, at any depth."""
    out = []

    def walk(items) -> None:  # noqa: ANN001
        for item in items:
            name = item.get("ConceptNameCodeSequence")
            if name and name[0].CodeValue == "121071" and "ConceptCodeSequence" in item:
                out.append(str(item.ConceptCodeSequence[0].CodeMeaning))
            walk(item.get("ContentSequence", []))

    walk(sr.get("ContentSequence", []))
    return out


def _text(sr: pydicom.Dataset) -> str:
    parts = []

    def walk(items) -> None:  # noqa: ANN001
        for item in items:
            if "TextValue" in item:
                parts.append(str(item.TextValue))
            walk(item.get("ContentSequence", []))

    walk(sr.get("ContentSequence", []))
    return " ".join(parts)


def test_following_the_doc_delivers_notices_referral_and_the_verified_sr(tmp_path: Path) -> None:
    listener_port, web_port = free_port(), free_port()
    (tmp_path / "orthanc").mkdir()
    pacs = OrthancServer(tmp_path / "orthanc", listener_port)
    data = tmp_path / "medsight"
    settings = tmp_path / "settings.json"  # the doc's file: the data folder and where results go
    settings.write_text(json.dumps({"data_dir": str(data), "poll_seconds": 0.2,
                                    "outputs": {"dicom_destination": f"ORTHANC@127.0.0.1:{pacs.dicom_port}",
                                                "backoff_base_s": 1.0}}))
    procs = []
    try:
        procs.append(_medsight("dicom", "listen", "--aet", "MEDSIGHT", "--port", str(listener_port), "--host", "127.0.0.1",
                               "--calling-aet", "ORTHANC", "--settings", str(settings), "--idle-timeout", "3",
                               log=tmp_path / "listener.log"))
        wait_for(lambda: (data / "delivery-listener.json").exists() or procs[0].poll() is not None, 120)
        assert procs[0].poll() is None, (tmp_path / "listener.log").read_text()
        procs.append(_medsight("serve", "--settings", str(settings), "--workers", "0", "--port", str(web_port),
                               log=tmp_path / "serve.log"))
        web = f"http://127.0.0.1:{web_port}"

        def up() -> bool:
            assert procs[1].poll() is None, (tmp_path / "serve.log").read_text()
            try:
                return requests.get(f"{web}/health", timeout=2).status_code in (200, 503)
            except requests.RequestException:
                return False

        wait_for(up, 120)
        create = subprocess.run([sys.executable, "-m", "medsight.cli", "users", "create", "--settings", str(settings),
                                 "--username", "reader", "--role", "radiologist", "--full-name", "Reader^Rita",
                                 "--password-stdin"], input=PASSWORD + "\n", capture_output=True, text=True, timeout=120)
        assert create.returncode == 0, create.stdout + create.stderr

        uids = {}
        for name in FILES:  # the modality stores each study into the PACS, which routes it to MedSight
            raw = Path(get_testdata_file(name)).read_bytes()
            uids[name] = pydicom.dcmread(io.BytesIO(raw), stop_before_pixels=True).StudyInstanceUID
            requests.post(f"{pacs.url}/instances", data=raw, timeout=60).raise_for_status()
        srs = {name: wait_for(lambda n=name: _srs(pacs, uids[n]), 600) for name in FILES}

        for name, outcome in FILES.items():  # no SR in the PACS names a finding
            assert len(srs[name]) == 1, name
            sr = srs[name][0]
            assert _findings(sr) == [], (name, _findings(sr))
            text = _text(sr)
            if outcome == "not analysed":
                assert "Not analysed: no model applies" in text and "No AI result will follow" in text, (name, text)
            else:
                assert "Refer to a human" in text and "no finding is reported" in text, text

        token = requests.post(f"{web}/api/auth/login", json={"username": "reader", "password": PASSWORD},
                              timeout=30).json()["token"]
        h = {"Authorization": f"Bearer {token}"}
        items = requests.get(f"{web}/api/worklist", params={"status": "all"}, headers=h, timeout=30).json()["items"]
        by_uid = {i["study_uid"]: i for i in items}
        for name, outcome in FILES.items():
            row = by_uid[uids[name]]
            assert row["finding"] is None, row
            if outcome == "not analysed":
                assert row["status"] == "not_analysed" and row["not_analysed_reason"].startswith("not analysed: no model applies")
            else:
                assert row["status"] == "analysed" and row["refer"] is True
        referred = by_uid[uids["RG1_UNCR.dcm"]]
        detail = requests.get(f"{web}/api/studies/{referred['id']}", headers=h, timeout=30).json()
        label = detail["results"][0]["labels"][0]
        r = requests.post(f"{web}/api/studies/{referred['id']}/reviews", json={"label": label}, headers=h, timeout=60)
        assert r.status_code == 201, r.text

        def verified() -> list[pydicom.Dataset]:
            return [sr for sr in _srs(pacs, uids["RG1_UNCR.dcm"]) if sr.get("VerificationFlag") == "VERIFIED"]

        sr = wait_for(verified, 300)[0]  # the review, queued by 'medsight serve', reached the PACS
        assert "Rita" in str(sr.VerifyingObserverSequence[0].VerifyingObserverName)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
        pacs.stop()
