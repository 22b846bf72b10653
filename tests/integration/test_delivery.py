"""Results out through the service's durable jobs: FHIR DiagnosticReport and HL7 ORU for an analysed study,
sent to real (local) receivers, with the retry rules of each channel."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from fhir.resources.R4B.bundle import Bundle
from hl7apy.parser import parse_message
from PIL import Image
from sqlalchemy import select

from medsight.integration.delivery import OutputSettings
from medsight.serve.db import Job, Study
from medsight.serve.ingest import ingest_files
from tests.conftest import make_images

from .conftest import run_jobs, service_context
from .test_mllp import Receiver


class FhirServer:
    """Accepts transaction bundles (or answers a fixed error status) and keeps what it got."""

    def __init__(self, status: int = 200):
        self.bundles: list[dict] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers["Content-Length"]))
                outer.bundles.append({"content_type": self.headers["Content-Type"], "body": json.loads(body)})
                reply = json.dumps({"resourceType": "Bundle", "type": "transaction-response"} if status < 300
                                   else {"resourceType": "OperationOutcome"}).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/fhir"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def png_study(folder: Path) -> list[Path]:
    x, y = make_images(1, seed=3)
    paths = []
    for k, img in enumerate(x):
        paths.append(folder / f"img{k}.png")
        Image.fromarray(img).save(paths[-1])
    return paths


def deliver_jobs(ctx) -> dict[str, Job]:
    with ctx.db.session() as s:
        return {j.payload["channel"]: j for j in s.execute(select(Job).where(Job.kind == "deliver")).scalars()}


def test_fhir_and_hl7_results_of_an_uploaded_study_reach_their_receivers(tmp_path: Path, models_dir: Path) -> None:
    fhir, ris = FhirServer(), Receiver("AA")
    ctx = service_context(tmp_path, models_dir, outputs={"fhir_url": fhir.url, "hl7_destination": f"127.0.0.1:{ris.port}",
                                                         "dicom_destination": "PACS@127.0.0.1:104"})
    try:
        study = ingest_files(ctx, png_study(tmp_path), modality="CR", accession_number="ACC-77")
        assert run_jobs(ctx) == 3
        jobs = deliver_jobs(ctx)
        with ctx.db.session() as s:
            finding = s.get(Study, study.id).finding
    finally:
        fhir.stop()
        ris.stop()
        ctx.close()
    # PNG uploads have no DICOM instances to reference: no SR/SC, but FHIR and HL7 go out
    assert sorted(jobs) == ["fhir", "hl7"] and {j.status for j in jobs.values()} == {"done"}
    (posted,) = fhir.bundles
    assert posted["content_type"] == "application/fhir+json"
    bundle = Bundle.model_validate(posted["body"])
    report = next(e.resource for e in bundle.entry if e.resource.__resource_type__ == "DiagnosticReport")
    assert report.imagingStudy[0].identifier.value == f"urn:oid:{study.study_uid}"
    assert any(i.value == "ACC-77" for i in report.identifier)
    assert finding in {c.text for c in report.conclusionCode}
    # conditional create on every entry: a delivery retry cannot duplicate the report
    assert all(e.request.ifNoneExist.startswith("identifier=urn:medsight:result|") for e in bundle.entry)
    (er7,) = ris.messages
    msg = parse_message(er7.replace("\n", "\r"), find_groups=False)
    assert msg.msh.msh_9.value == "ORU^R01^ORU_R01" and msg.obr.obr_3.value == "ACC-77"
    assert "PID" not in [seg.name for seg in msg.children]  # no patient identifiers leave the site


def test_fhir_client_error_fails_at_once_and_server_error_is_retried(tmp_path: Path, models_dir: Path) -> None:
    for status, expected in ((422, ("failed", 1)), (503, ("queued", 1))):
        fhir = FhirServer(status)
        ctx = service_context(tmp_path / str(status), models_dir, outputs={"fhir_url": fhir.url, "backoff_base_s": 600.0})
        try:
            ingest_files(ctx, png_study(tmp_path), modality="CR")
            run_jobs(ctx)
            job = deliver_jobs(ctx)["fhir"]
        finally:
            fhir.stop()
            ctx.close()
        assert (job.status, job.attempts) == expected, status
        assert str(status) in job.last_error


def test_output_settings_validate_destinations() -> None:
    from medsight.errors import MedSightError

    s = OutputSettings(dicom_destination="PACS@10.0.0.5:104", hl7_destination="ris:2575")
    assert s.channels(dicom_source=True) == ["dicom", "hl7"] and s.channels(dicom_source=False) == ["hl7"]
    assert [s.backoff(a) for a in (1, 2, 3)] == [5.0, 10.0, 20.0]
    with pytest.raises(MedSightError, match="neither AE@host:port"):
        OutputSettings(dicom_destination="PACS")
    with pytest.raises(MedSightError, match="not host:port"):
        OutputSettings(hl7_destination="ris")


def test_a_review_updates_the_fhir_report_to_final_in_place_and_corrects_the_hl7_result(tmp_path: Path, models_dir: Path) -> None:
    from medsight.serve.audit import Actor
    from medsight.serve.auth import create_user
    from medsight.serve.reviewed_report import submit_review
    from medsight.serve.reviews import key_result

    fhir, ris = FhirServer(), Receiver("AA")
    ctx = service_context(tmp_path, models_dir, outputs={"fhir_url": fhir.url, "hl7_destination": f"127.0.0.1:{ris.port}"})
    try:
        study = ingest_files(ctx, png_study(tmp_path), modality="CR", accession_number="ACC-78")
        assert run_jobs(ctx) == 3
        with ctx.db.session() as s:
            user = create_user(s, "ruth", "a-long-enough-password-1", "radiologist", full_name="Ruth Reader")
            result = key_result(s, study.id)  # what a review without result_id is about
            other = next(lab for lab in result.labels if lab != result.label)
            submit_review(ctx, s, study.id, Actor("ruth", "radiologist", user.id), label=other, note="no consolidation")
        assert run_jobs(ctx) == 2
        with ctx.db.session() as s:  # a second opinion updates the same report again
            submit_review(ctx, s, study.id, Actor("ruth", "radiologist", user.id), label=result.label)
        assert run_jobs(ctx) == 2
    finally:
        fhir.stop()
        ris.stop()
        ctx.close()
    # HL7: the same order (accession number) again, status C (corrected) instead of P, with the reader's finding
    first, second, third = (parse_message(m.replace("\n", "\r"), find_groups=False) for m in ris.messages)
    assert third.obr.obr_25.value == "F"  # the second reviewer confirmed the model
    assert (first.obr.obr_3.value, first.obr.obr_25.value) == ("ACC-78", "P")
    assert (second.obr.obr_3.value, second.obr.obr_25.value) == ("ACC-78", "C")
    obx = {seg.obx_3.obx_3_1.value: seg for seg in second.children if seg.name == "OBX"}
    assert {seg.obx_11.value for seg in obx.values()} == {"C"}
    assert obx["READER-FINDING"].obx_5.value.split("^")[1] == other
    assert "corrected the model" in obx["REVIEW"].obx_5.value
    preliminary, reviewed, again = (Bundle.model_validate(b["body"]) for b in fhir.bundles)
    old = next(e.resource for e in preliminary.entry if e.resource.__resource_type__ == "DiagnosticReport")
    (entry,) = reviewed.entry  # only the report changes; the model's Observations stay as they are
    report = entry.resource
    ident = next(i.value for i in old.identifier if i.system == "urn:medsight:result")
    assert (entry.request.method, entry.request.url) == ("PUT", f"DiagnosticReport?identifier=urn:medsight:result|{ident}")
    assert (old.status, report.status) == ("preliminary", "final")
    assert report.resultsInterpreter[0].display == "Ruth Reader"
    assert [c.text for c in report.conclusionCode] == [other]
    assert report.conclusion.startswith(f"Reviewed by Ruth Reader: corrected the model's finding '{result.label}' to '{other}'.")
    assert any(i.value == "ACC-78" for i in report.identifier)
    old_obs = [next(i.value for i in e.resource.identifier) for e in preliminary.entry if e.resource.__resource_type__ == "Observation"]
    assert [r.reference for r in report.result] == [f"Observation?identifier=urn:medsight:result|{v}" for v in old_obs]
    (entry2,) = again.entry
    assert entry2.request.url == entry.request.url and entry2.resource.status == "final"
    assert [c.text for c in entry2.resource.conclusionCode] == [result.label]
    assert [r.reference for r in entry2.resource.result] == [r.reference for r in report.result]
