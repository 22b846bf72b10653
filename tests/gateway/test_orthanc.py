"""Round trip with a real PACS: Orthanc (Debian packages orthanc, orthanc-dicomweb) on loopback ports.

A real pydicom-data CT study is stored into Orthanc over its REST API; an
Orthanc Lua ``OnStoredInstance`` rule forwards each instance to the MedSight
listener; the complete study is queued in the MedSight service (SQLite), a
service worker analyses it with the tiny model and a ``deliver`` job sends the
SR and the overlay Secondary Captures back by C-STORE; the test then checks
through Orthanc's REST API that both are in the same study with the values the
service stored. A second test uses Orthanc's DICOMweb plugin for pull
(QIDO-RS/WADO-RS) and push (STOW-RS).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pydicom
import pytest
import requests
from pydicom.uid import CTImageStorage

from medsight.gateway.listener import ListenerConfig, StorageSCP
from medsight.gateway.pipeline import ServiceStudyCallback
from medsight.serve.worker import Worker

from tests.integration.conftest import CT_STUDY, DATA, read, service_context, wait_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

ORTHANC = shutil.which("Orthanc") or next((p for p in ("/usr/sbin/Orthanc", "/usr/bin/Orthanc") if os.path.exists(p)), None)
DICOMWEB_PLUGIN = next((p for p in ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",) if os.path.exists(p)), None)
if ORTHANC is None:
    pytest.skip("Orthanc is not installed (Debian package 'orthanc', listed in .ci/apt-packages.txt)", allow_module_level=True)

ROUTE_LUA = """
-- forward every image to MedSight, except what MedSight itself sent back (no loops)
function OnStoredInstance(instanceId, tags, metadata, origin)
  if tags['Manufacturer'] ~= 'MedSight' and tags['Modality'] ~= 'SR' then
    SendToModality(instanceId, 'medsight')
  end
end
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OrthancServer:
    """A throw-away Orthanc: temporary storage, loopback only, no authentication, no default services."""

    def __init__(self, folder: Path, medsight_port: int):
        self.folder = folder
        self.http_port, self.dicom_port = free_port(), free_port()
        (folder / "route.lua").write_text(ROUTE_LUA)
        config = {
            "Name": "MedSightTestPACS", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
            "HttpPort": self.http_port, "DicomPort": self.dicom_port, "DicomAet": "ORTHANC",
            "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "HttpServerEnabled": True, "DicomServerEnabled": True,
            "DicomCheckCalledAet": False, "DicomModalities": {"medsight": ["MEDSIGHT", "127.0.0.1", medsight_port]},
            "LuaScripts": [str(folder / "route.lua")], "Plugins": [DICOMWEB_PLUGIN] if DICOMWEB_PLUGIN else [],
            "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}, "SaveJobs": False, "StableAge": 1, "ConcurrentJobs": 2,
            "StorageCompression": False, "HttpTimeout": 30, "DicomScuTimeout": 30, "DicomScpTimeout": 30,
        }
        (folder / "orthanc.json").write_text(json.dumps(config))
        self.log = open(folder / "orthanc.log", "w")
        self.proc = subprocess.Popen([ORTHANC, str(folder / "orthanc.json")], stdout=self.log, stderr=subprocess.STDOUT)
        self.url = f"http://127.0.0.1:{self.http_port}"
        end = time.monotonic() + 120
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {(folder / 'orthanc.log').read_text()[-2000:]}")
            try:
                if requests.get(f"{self.url}/system", timeout=2).ok:
                    return
            except requests.RequestException:
                time.sleep(0.3)
        raise RuntimeError("Orthanc did not start in time")

    def get(self, path: str):
        r = requests.get(f"{self.url}{path}", timeout=30)
        r.raise_for_status()
        return r.json()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


@pytest.fixture(scope="module")
def round_trip(models_dir, tmp_path_factory):
    """Run the whole round trip once; yields what the tests inspect."""
    import threading

    folder = tmp_path_factory.mktemp("orthanc")
    listener_port = free_port()
    pacs = OrthancServer(folder, listener_port)
    ctx = service_context(folder, models_dir, poll_seconds=0.2,
                          outputs={"dicom_destination": f"ORTHANC@127.0.0.1:{pacs.dicom_port}", "backoff_base_s": 1.0})
    callback = ServiceStudyCallback(ctx)
    cfg = ListenerConfig(port=listener_port, data_dir=folder / "medsight", allowed_calling_aets=("ORTHANC",), idle_timeout=3.0)
    scp = StorageSCP(cfg, on_study_complete=callback).start()
    worker = Worker(ctx, name="orthanc-test-worker")
    threading.Thread(target=worker.run, daemon=True).start()
    try:
        for name in CT_STUDY:  # the hospital's modality stores the study into the PACS
            r = requests.post(f"{pacs.url}/instances", data=(DATA / name).read_bytes(), timeout=60)
            r.raise_for_status()
        study_uid = read(DATA / CT_STUDY[0]).StudyInstanceUID
        found = wait_for(lambda: requests.post(f"{pacs.url}/tools/lookup", data=study_uid, timeout=10).json(), 30)
        orthanc_study = next(f["ID"] for f in found if f["Type"] == "Study")
        wait_for(lambda: len(pacs.get(f"/studies/{orthanc_study}/instances")) >= len(CT_STUDY) + 3, timeout=600)
        instances = pacs.get(f"/studies/{orthanc_study}/instances")
        files = {i["ID"]: requests.get(f"{pacs.url}/instances/{i['ID']}/file", timeout=30).content for i in instances}
        yield {"pacs": pacs, "study_uid": study_uid, "orthanc_study": orthanc_study, "instances": instances, "files": files,
               "folder": folder, "scp": scp, "ctx": ctx}
    finally:
        worker.stop()
        scp.stop()
        pacs.stop()
        ctx.close()


def _datasets(files: dict[str, bytes]) -> list[pydicom.Dataset]:
    import io

    return [pydicom.dcmread(io.BytesIO(b)) for b in files.values()]


def test_orthanc_holds_sr_and_overlays_in_the_source_study(round_trip) -> None:
    from sqlalchemy import select

    from medsight.serve.db import Instance, Job, Result

    datasets = _datasets(round_trip["files"])
    by_modality: dict[str, list] = {}
    for ds in datasets:
        by_modality.setdefault(str(ds.Modality), []).append(ds)
    assert len(by_modality["CT"]) == len(CT_STUDY)
    assert len(by_modality["SR"]) == 1
    overlays = [ds for ds in datasets if ds.SOPClassUID == pydicom.uid.SecondaryCaptureImageStorage]
    assert len(overlays) == len(CT_STUDY)
    assert {ds.StudyInstanceUID for ds in datasets} == {round_trip["study_uid"]}
    # the SR holds what the Predictor says about these very images
    import highdicom as hd

    sr = hd.sr.ComprehensiveSR.from_dataset(by_modality["SR"][0])
    ctx = round_trip["ctx"]
    with ctx.db.session() as s:  # what the service stored and shows the radiologist, per source instance
        expected = {i.sop_instance_uid: r for r, i in s.execute(select(Result, Instance).join(Instance, Result.instance_id == Instance.id))}
        deliveries = list(s.execute(select(Job).where(Job.kind == "deliver")).scalars())
    assert set(expected) == {read(DATA / n).SOPInstanceUID for n in CT_STUDY}
    groups = sr.content.get_image_measurement_groups()
    assert len(groups) == len(CT_STUDY)
    for g in groups:
        r = expected[g.source_images[0].referenced_sop_instance_uid]
        values = {m.name.meaning: m.value for m in g.get_measurements()}
        for label, prob in r.probabilities.items():
            assert values[f"Probability of {label}"] == pytest.approx(prob, abs=1e-6)
        assert g.finding_type.meaning == r.label
    for sc in overlays:
        assert "not for primary diagnosis" in sc.SeriesDescription
        assert sc.SourceImageSequence[0].ReferencedSOPInstanceUID in expected
    # Orthanc's own view: series of the study, as a PACS user sees them
    series = round_trip["pacs"].get(f"/studies/{round_trip['orthanc_study']}/series")
    modalities = sorted(s["MainDicomTags"].get("Modality", "") for s in series)
    assert modalities.count("SR") == 1 and "CT" in modalities
    assert [(j.status, j.payload["channel"]) for j in deliveries] == [("done", "dicom")]


def test_dsrdump_reads_the_sr_stored_in_orthanc(round_trip, tmp_path: Path) -> None:
    dsrdump = shutil.which("dsrdump")
    if dsrdump is None:
        pytest.skip("dsrdump (dcmtk) is not installed")
    sr_bytes = next(b for b, ds in zip(round_trip["files"].values(), _datasets(round_trip["files"])) if ds.Modality == "SR")
    (tmp_path / "sr.dcm").write_bytes(sr_bytes)
    out = subprocess.run([dsrdump, str(tmp_path / "sr.dcm")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Imaging Measurement Report" in out.stdout and "AI result - not for primary" in out.stdout
    (round_trip["folder"] / "dsrdump.txt").write_text(out.stdout)


def test_orthanc_routed_with_its_own_ae_title_and_results_are_not_analysed_again(round_trip) -> None:
    scp = round_trip["scp"]
    assert scp.completed.count(round_trip["study_uid"]) >= 1
    # the listener's index of every instance it received (the files themselves are removed once queued)
    index = [json.loads(p.read_text()) for p in (round_trip["folder"] / "medsight" / "studies").rglob("*.json")
             if p.name != "complete.json"]
    # Orthanc's rule skipped MedSight's own results: only the CT images reached the listener
    assert sorted(e["sop_class_uid"] for e in index) == [CTImageStorage] * len(CT_STUDY)
    assert not list((round_trip["folder"] / "medsight" / "instances").rglob("*.dcm"))


@pytest.mark.skipif(DICOMWEB_PLUGIN is None, reason="orthanc-dicomweb plugin is not installed")
def test_dicomweb_pull_and_stow_against_orthanc(round_trip, tmp_path: Path) -> None:
    from medsight.gateway.dicomweb import DicomWebSource
    from medsight.integration.sender import Outbox, StowDestination

    url = round_trip["pacs"].url + "/dicom-web"
    source = DicomWebSource(url)
    studies = source.search_studies(modality="CT")
    assert round_trip["study_uid"] in [s.study_instance_uid for s in studies]
    paths = source.retrieve_study(round_trip["study_uid"], tmp_path / "pulled")
    pulled = [read(p) for p in paths]
    assert len(pulled) == len(round_trip["instances"])
    ct = {ds.SOPInstanceUID: ds for ds in pulled if ds.Modality == "CT"}
    for name in CT_STUDY:
        original = read(DATA / name)
        assert ct[original.SOPInstanceUID].PixelData == original.PixelData
    # STOW-RS: push a copy of the SR under a new SOP Instance UID through the outbox
    sr = next(ds for ds in pulled if ds.Modality == "SR")
    sr.SOPInstanceUID = pydicom.uid.generate_uid()
    box = Outbox(tmp_path / "outbox", StowDestination(url), attempts=2, backoff=0.1)
    box.put(sr)
    report = box.flush()
    assert report.sent == 1 and report.pending == 0
    after = round_trip["pacs"].get(f"/studies/{round_trip['orthanc_study']}/instances")
    assert len(after) == len(round_trip["instances"]) + 1


def test_cfind_and_cget_pull_from_orthanc(round_trip, tmp_path: Path) -> None:
    """Classic Query/Retrieve for a PACS without DICOMweb: C-FIND finds the study, C-GET brings every
    instance back on the same association (Orthanc knows our AE title as the 'medsight' modality)."""
    from medsight.gateway.qr import DimseSource
    from medsight.integration.sender import DimseDestination
    from medsight.errors import DicomGatewayError

    in_pacs = round_trip["pacs"].get(f"/studies/{round_trip['orthanc_study']}/instances")  # now, after other tests stored more
    pacs = DimseDestination("ORTHANC", "127.0.0.1", round_trip["pacs"].dicom_port)
    source = DimseSource(pacs, calling_aet="MEDSIGHT", timeout=30)
    studies = source.search_studies(modality="CT")
    found = next(s for s in studies if s.study_instance_uid == round_trip["study_uid"])
    assert {"CT", "SR"} <= set(found.modalities) and found.n_instances == len(in_pacs)
    assert source.search_studies(modality="MG") == []
    paths = source.retrieve_study(round_trip["study_uid"], tmp_path / "pulled")
    assert all(p.parent == tmp_path / "pulled" / round_trip["study_uid"] for p in paths)
    pulled = [read(p) for p in paths]
    assert sorted(str(ds.SOPInstanceUID) for ds in pulled) == sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in in_pacs)
    ct = {ds.SOPInstanceUID: ds for ds in pulled if ds.Modality == "CT"}
    for name in CT_STUDY:
        original = read(DATA / name)
        assert ct[original.SOPInstanceUID].PixelData == original.PixelData
    # an AE title Orthanc does not know is refused: a clear error, not an empty result
    with pytest.raises(DicomGatewayError, match="C-FIND"):
        DimseSource(pacs, calling_aet="STRANGER", timeout=10).search_studies(modality="CT")


def test_cli_pull_with_cget_queues_the_study(round_trip, models_dir, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from medsight.cli import app

    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"model_paths": [str(models_dir)], "use_zoo": False, "default_models": {"CT": "tiny-xr"}}))
    pacs = f"ORTHANC@127.0.0.1:{round_trip['pacs'].dicom_port}"
    in_pacs = round_trip["pacs"].get(f"/studies/{round_trip['orthanc_study']}/instances")
    r = CliRunner().invoke(app, ["dicom", "pull", "--from", pacs, "--modality", "CT", "--out", str(tmp_path / "pulled"),
                                 "--queue", "--data-dir", str(tmp_path / "svc"), "--settings", str(settings)])
    assert r.exit_code == 0, r.output
    assert f"{round_trip['study_uid']}: {len(in_pacs)} instances" in r.output
    assert "queued as study 1 (tiny-xr" in r.output
    r = CliRunner().invoke(app, ["dicom", "pull", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "exactly one source" in r.output
    r = CliRunner().invoke(app, ["dicom", "pull", "--from", "http://pacs/dicom-web", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--url" in r.output


@pytest.mark.skipif(DICOMWEB_PLUGIN is None, reason="orthanc-dicomweb plugin is not installed")
def test_cli_pull_queues_the_study_in_a_service_without_our_own_results(round_trip, models_dir, tmp_path: Path) -> None:
    from sqlalchemy import select
    from typer.testing import CliRunner

    from medsight.cli import app
    from medsight.serve.config import ServiceSettings
    from medsight.serve.context import ServiceContext
    from medsight.serve.db import Instance, Study

    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"model_paths": [str(models_dir)], "use_zoo": False, "default_models": {"CT": "tiny-xr"}}))
    url = round_trip["pacs"].url + "/dicom-web"
    r = CliRunner().invoke(app, ["dicom", "pull", "--url", url, "--study", round_trip["study_uid"], "--out", str(tmp_path / "pulled"),
                                 "--queue", "--data-dir", str(tmp_path / "svc"), "--settings", str(settings)])
    assert r.exit_code == 0, r.output
    assert "queued as study 1 (tiny-xr" in r.output
    ctx = ServiceContext.build(ServiceSettings(data_dir=tmp_path / "svc", use_zoo=False))
    try:
        with ctx.db.session() as s:
            study = s.execute(select(Study)).scalar_one()
            n = len(s.execute(select(Instance)).all())
    finally:
        ctx.close()
    # the PACS study also holds MedSight's SR and overlays by now: only the CT images are queued
    assert (study.study_uid, study.status, n) == (round_trip["study_uid"], "queued", len(CT_STUDY))
