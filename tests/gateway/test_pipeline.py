"""The DICOM gateway feeds the service: listener -> queued study -> worker (Predictor) -> SR + overlays
delivered to a PACS by a durable ``deliver`` job that survives an outage."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydicom.uid import ComprehensiveSRStorage, SecondaryCaptureImageStorage, generate_uid
from pynetdicom import AE, sop_class
from sqlalchemy import select

from medsight.gateway.listener import ListenerConfig, ReceivedStudy, StorageSCP
from medsight.gateway.pipeline import ServiceStudyCallback, analysable_instances, is_own_output, requested_priority
from medsight.serve.db import AuditEvent, Instance, Job, Result, Study

from tests.integration.conftest import CT_STUDY, DATA, read, run_jobs, service_context
from tests.integration.conftest import wait_for
from tests.integration.conftest import free_port, pacs  # noqa: F401 (pacs is a fixture)

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def send_study(port: int, names=CT_STUDY, calling: str = "MODALITY") -> None:
    ae = AE(ae_title=calling)
    ae.add_requested_context(sop_class.CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDSIGHT")
    assert assoc.is_established
    for name in names:
        assert assoc.send_c_store(read(DATA / name)).Status == 0
    assoc.release()


def jobs(ctx, kind: str) -> list[Job]:
    with ctx.db.session() as s:
        return list(s.execute(select(Job).where(Job.kind == kind).order_by(Job.id)).scalars())


def audit_actions(ctx) -> list[str]:
    with ctx.db.session() as s:
        return [a.action for a in s.execute(select(AuditEvent).order_by(AuditEvent.id)).scalars()]


def test_received_study_is_analysed_by_the_service_and_sr_and_overlays_reach_the_pacs(tmp_path: Path, models_dir: Path,
                                                                                      caplog: pytest.LogCaptureFixture) -> None:
    import logging

    caplog.set_level(logging.INFO)
    receiver = pacs(tmp_path)
    ctx = service_context(tmp_path, models_dir, outputs={"dicom_destination": f"PACS@127.0.0.1:{receiver.port}"})
    gateway = StorageSCP(ListenerConfig(port=0, data_dir=tmp_path / "inbox", allowed_calling_aets=("MODALITY",), idle_timeout=1.0),
                         on_study_complete=ServiceStudyCallback(ctx)).start()
    try:
        send_study(gateway.port)
        wait_for(lambda: gateway.completed, timeout=60)
        with ctx.db.session() as s:
            study = s.execute(select(Study)).scalar_one()
            assert (study.status, study.model, study.modality, study.source_format) == ("queued", "tiny-xr", "CT", "dicom")
            assert study.study_uid == read(DATA / CT_STUDY[0]).StudyInstanceUID
        assert run_jobs(ctx) == 2  # the analysis, then the delivery it queued
        results = receiver.received()
    finally:
        gateway.stop()
        receiver.stop()
        ctx.close()
    study_uid = read(DATA / CT_STUDY[0]).StudyInstanceUID
    assert sorted(str(r.SOPClassUID) for r in results) == sorted([ComprehensiveSRStorage] + [SecondaryCaptureImageStorage] * 2)
    assert {r.StudyInstanceUID for r in results} == {study_uid}
    assert all(is_own_output(r) for r in results)  # would not be analysed again if routed back
    sr = next(r for r in results if r.SOPClassUID == ComprehensiveSRStorage)
    refs = {i.ReferencedSOPInstanceUID for s in sr.CurrentRequestedProcedureEvidenceSequence
            for se in s.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}
    assert refs == {read(DATA / n).SOPInstanceUID for n in CT_STUDY}
    # the SR carries the very probabilities the service stored for the radiologist
    import highdicom as hd

    with ctx.db.session() as s:
        stored = {r.probabilities["disc"] for r in s.execute(select(Result)).scalars()}
    groups = hd.sr.ComprehensiveSR.from_dataset(sr).content.get_image_measurement_groups()
    in_sr = {next(m.value for m in g.get_measurements() if m.name.meaning == "Probability of disc") for g in groups}
    assert sorted(in_sr) == pytest.approx(sorted(stored), abs=1e-6)
    (deliver,) = jobs(ctx, "deliver")
    assert deliver.status == "done" and deliver.payload["channel"] == "dicom" and len(deliver.payload["blobs"]) == 3
    assert audit_actions(ctx)[-2:] == ["result.create", "deliver.sent"]
    # nothing identifying in the logs of the whole path (listener, service, worker, sender)
    original = read(DATA / CT_STUDY[0], stop_before_pixels=True)
    secrets = [str(original.PatientID), *[p for p in str(original.PatientName).split("^") if len(p) >= 4]]
    assert secrets and "queued as service study" in caplog.text and "deliver dicom" in caplog.text
    assert not [s for s in secrets if s in caplog.text]


def test_pacs_outage_is_retried_by_the_job_queue_and_nothing_is_dropped(tmp_path: Path, models_dir: Path) -> None:
    port = free_port()  # nobody listens here yet
    ctx = service_context(tmp_path, models_dir, outputs={"dicom_destination": f"PACS@127.0.0.1:{port}", "backoff_base_s": 600.0,
                                                         "timeout_s": 5.0})
    try:
        ServiceStudyCallback(ctx)(ReceivedStudy(read(DATA / CT_STUDY[0]).StudyInstanceUID, [DATA / n for n in CT_STUDY], {"MODALITY"}))
        run_jobs(ctx)
        (deliver,) = jobs(ctx, "deliver")
        # the queue keeps retrying while attempts remain; each attempt records why it failed
        assert deliver.status == "queued" and deliver.attempts >= 1 and "127.0.0.1" in (deliver.last_error or "")
        assert deliver.attempts == 1 and deliver.run_after > deliver.created_at  # backing off, not spinning
        assert "deliver.sent" not in audit_actions(ctx)
        with ctx.db.session() as s:  # the backoff has elapsed (without waiting ten minutes)
            s.get(Job, deliver.id).run_after = deliver.created_at
        receiver = pacs(tmp_path, port=port)
        try:
            run_jobs(ctx)
            received = receiver.received()
        finally:
            receiver.stop()
        (deliver,) = jobs(ctx, "deliver")
        assert deliver.status == "done" and deliver.attempts == 2
        assert len(received) == 3 and "deliver.sent" in audit_actions(ctx)
    finally:
        ctx.close()


def test_delivery_gives_up_after_max_attempts_with_an_audit_event(tmp_path: Path, models_dir: Path) -> None:
    ctx = service_context(tmp_path, models_dir, outputs={"dicom_destination": f"PACS@127.0.0.1:{free_port()}", "backoff_base_s": 0.0,
                                                         "max_attempts": 2, "timeout_s": 5.0})
    try:
        ServiceStudyCallback(ctx)(ReceivedStudy("x", [DATA / n for n in CT_STUDY], {"MODALITY"}))
        run_jobs(ctx)
        (deliver,) = jobs(ctx, "deliver")
        assert (deliver.status, deliver.attempts) == ("failed", 2)
        assert "deliver.failed" in audit_actions(ctx)
        # the objects are still stored: an administrator can re-queue them
        assert all(ctx.store.verify(sha) for sha in deliver.payload["blobs"])
    finally:
        ctx.close()


def test_own_results_and_images_without_pixels_are_not_queued(tmp_path: Path, models_dir: Path) -> None:
    own = read(DATA / CT_STUDY[0])
    own.Manufacturer, own.SOPInstanceUID = "MedSight", generate_uid()
    own.save_as(tmp_path / "own.dcm")
    bare = read(DATA / CT_STUDY[1])
    del bare.PixelData
    bare.save_as(tmp_path / "bare.dcm")
    keep, _, skipped = analysable_instances([tmp_path / "own.dcm", tmp_path / "bare.dcm", DATA / CT_STUDY[0]])
    assert keep == [DATA / CT_STUDY[0]]
    assert [s.split(": ")[1] for s in skipped] == ["MedSight output", "no pixel data"]
    ctx = service_context(tmp_path, models_dir)
    try:
        outcome = ServiceStudyCallback(ctx)(ReceivedStudy(str(own.StudyInstanceUID), [tmp_path / "own.dcm"], {"PACS"}))
        assert outcome.message.startswith("nothing to analyse") and not outcome.handed_off
        with ctx.db.session() as s:
            assert s.execute(select(Study)).first() is None
    finally:
        ctx.close()


def test_a_study_received_twice_is_queued_once_and_unknown_modality_is_refused(tmp_path: Path, models_dir: Path) -> None:
    ctx = service_context(tmp_path, models_dir, default_models={})
    callback = ServiceStudyCallback(ctx)
    study = ReceivedStudy(read(DATA / CT_STUDY[0]).StudyInstanceUID, [DATA / n for n in CT_STUDY], {"PACS"})
    try:
        first, again = callback(study), callback(study)
        assert first.message.startswith("queued as study") and first.handed_off
        assert again.message.startswith("already in the service") and not again.handed_off
        us = DATA / "US1_J2KR.dcm"  # ultrasound: the tiny model reads CR/DX/CT/MR only
        # This was refused and only logged; a study no model applies to is now stored, "not analysed" with the
        # reason, and gets no analysis job (issue 18: the worklist shows it, nothing is dropped at the door).
        kept = ServiceStudyCallback(ctx)(ReceivedStudy("u", [us], {"PACS"}))
        assert "no installed model reads modality 'US'" in kept.message and kept.handed_off
        with ctx.db.session() as s:
            studies = {st.modality: st for st in s.execute(select(Study)).scalars()}
            assert len(studies) == 2 and studies["US"].status == "not_analysed"
            assert "no installed model reads modality 'US'" in studies["US"].not_analysed_reason
            assert s.execute(select(Job).where(Job.study_id == studies["US"].id)).first() is None
    finally:
        ctx.close()


def test_a_late_instance_joins_its_study_which_is_analysed_again(tmp_path: Path, models_dir: Path) -> None:
    """The sender is slower than the idle timeout: the study's second instance arrives after the study was
    handed to the service. It is stored, added to the same study record, and the study is analysed again."""
    from medsight.serve.worklist import worklist

    ctx = service_context(tmp_path, models_dir)
    cfg = ListenerConfig(port=0, data_dir=tmp_path / "inbox", allowed_calling_aets=("MODALITY",), idle_timeout=0.5)
    gateway = StorageSCP(cfg, on_study_complete=ServiceStudyCallback(ctx)).start()
    try:
        send_study(gateway.port, names=CT_STUDY[:1])
        wait_for(lambda: len(gateway.completed) == 1, timeout=60)
        assert run_jobs(ctx) == 1
        send_study(gateway.port, names=CT_STUDY[1:])  # acknowledged with success, as before
        wait_for(lambda: len(gateway.completed) == 2, timeout=60)
        with ctx.db.session() as s:
            (study,) = s.execute(select(Study)).scalars().all()  # the same record, not a second study
            assert study.status == "queued"
            assert {i.sop_instance_uid for i in study.instances} == {read(DATA / n).SOPInstanceUID for n in CT_STUDY}
        first, second = jobs(ctx, "analyse")
        assert (first.status, second.status) == ("done", "queued")
        assert audit_actions(ctx)[-1] == "study.instances_added"
        assert run_jobs(ctx) == 1
        assert not list((tmp_path / "inbox" / "instances").rglob("*.dcm"))  # handed off, like the first instance
    finally:
        gateway.stop()
    try:
        with ctx.db.session() as s:
            newest = s.execute(select(Result).where(Result.job_id == second.id)).scalars().all()
            assert sorted(r.instance_id for r in newest) == sorted(i.id for i in s.get(Study, study.id).instances)
            (row,) = worklist(s, ctx.settings.triage)["items"]
        assert row["id"] == study.id and row["status"] == "analysed"
        assert row["critical_probability"] == pytest.approx(max(r.critical_probability for r in newest))
    finally:
        ctx.close()


def test_late_instances_that_do_not_fit_their_study_are_refused_and_kept(tmp_path: Path, models_dir: Path) -> None:
    ct = read(DATA / CT_STUDY[0])
    mr = read(DATA / "MR2_UNCI.dcm")
    mr.StudyInstanceUID = ct.StudyInstanceUID  # an MR image claiming to belong to the CT study
    mr.save_as(tmp_path / "mr.dcm")
    ctx = service_context(tmp_path, models_dir)
    callback = ServiceStudyCallback(ctx)
    try:
        assert callback(ReceivedStudy(str(ct.StudyInstanceUID), [DATA / CT_STUDY[0]], {"PACS"})).handed_off
        late = callback(ReceivedStudy(str(ct.StudyInstanceUID), [tmp_path / "mr.dcm"], {"PACS"}))
        assert late.message.startswith("late instances refused") and "MR" in late.message
        assert not late.handed_off  # the listener keeps its copy
        assert len(jobs(ctx, "analyse")) == 1 and "study.instances_added" not in audit_actions(ctx)
    finally:
        ctx.close()


def test_requested_procedure_priority_sets_the_worklist_priority() -> None:
    ds = read(DATA / CT_STUDY[0], stop_before_pixels=True)
    assert requested_priority(ds) == "routine"
    for value, expected in (("STAT", "stat"), ("HIGH", "urgent"), ("LOW", "routine"), ("MEDIUM", "routine")):
        ds.RequestedProcedurePriority = value
        assert requested_priority(ds) == expected


@pytest.mark.parametrize("keep", [False, True])
def test_inbox_copy_is_removed_once_the_service_holds_the_study_and_a_resend_is_a_duplicate(tmp_path: Path, models_dir: Path,
                                                                                         keep: bool) -> None:
    from medsight.gateway.store import InstanceStore

    ctx = service_context(tmp_path, models_dir)
    inbox = tmp_path / "inbox"
    cfg = ListenerConfig(port=0, data_dir=inbox, allowed_calling_aets=("MODALITY",), idle_timeout=0.5, keep_received=keep)
    gateway = StorageSCP(cfg, on_study_complete=ServiceStudyCallback(ctx)).start()
    try:
        send_study(gateway.port)
        wait_for(lambda: gateway.completed, timeout=60)
        inbox_files = list((inbox / "instances").rglob("*.dcm"))
        assert len(inbox_files) == (len(CT_STUDY) if keep else 0)
        with ctx.db.session() as s:  # the service's own copies, verified against their sha256
            hashes = [i.file_sha256 for i in s.execute(select(Study)).scalar_one().instances]
        assert len(hashes) == len(CT_STUDY) and all(ctx.store.verify(h) for h in hashes)
        # the PACS sends the same study again: every C-STORE succeeds as a duplicate, nothing is queued twice
        send_study(gateway.port)
        assert not gateway.store.due_studies(0.0)
    finally:
        gateway.stop()
    with ctx.db.session() as s:
        assert len(s.execute(select(Study)).all()) == 1
    ctx.close()
    # after a restart the released study is neither pending nor pointing at missing files
    again = InstanceStore(inbox)
    assert not again.due_studies(0.0)
    assert again.study_files(read(DATA / CT_STUDY[0]).StudyInstanceUID) == (sorted(inbox_files) if keep else [])


def test_a_readers_correction_reaches_the_pacs_as_a_verified_sr_superseding_the_preliminary_one(tmp_path: Path,
                                                                                                 models_dir: Path) -> None:
    import highdicom as hd

    from medsight.serve.audit import Actor
    from medsight.serve.auth import create_user
    from medsight.serve.reviewed_report import submit_review

    receiver = pacs(tmp_path)
    ctx = service_context(tmp_path, models_dir, outputs={"dicom_destination": f"PACS@127.0.0.1:{receiver.port}",
                                                         "institution_name": "General Hospital", "send_overlays": False})
    try:
        ServiceStudyCallback(ctx)(ReceivedStudy(read(DATA / CT_STUDY[0]).StudyInstanceUID, [DATA / n for n in CT_STUDY], {"PACS"}))
        assert run_jobs(ctx) == 2
        preliminary = receiver.received()
        assert [str(ds.VerificationFlag) for ds in preliminary] == ["UNVERIFIED"]
        with ctx.db.session() as s:
            user = create_user(s, "ruth", "a-long-enough-password-1", "radiologist", full_name="Reader^Ruth")
            result = s.execute(select(Result).order_by(Result.id)).scalars().first()
            other = next(lab for lab in result.labels if lab != result.label)
            review = submit_review(ctx, s, result.study_id, Actor("ruth", "radiologist", user.id), label=other,
                                   note="motion artefact", result_id=result.id)
            assert review.action == "correct"
            instance_uid = s.get(Instance, result.instance_id).sop_instance_uid
        assert run_jobs(ctx) == 1  # the verified SR's delivery
        verified = next(ds for ds in receiver.received() if ds.SOPInstanceUID != preliminary[0].SOPInstanceUID)
    finally:
        receiver.stop()
    assert verified.StudyInstanceUID == preliminary[0].StudyInstanceUID
    assert (verified.VerificationFlag, verified.PreliminaryFlag) == ("VERIFIED", "FINAL")
    assert str(verified.VerifyingObserverSequence[0].VerifyingObserverName) == "Reader^Ruth"
    assert verified.VerifyingObserverSequence[0].VerifyingOrganization == "General Hospital"
    assert [i.ReferencedSOPInstanceUID for s in verified.PredecessorDocumentsSequence for se in s.ReferencedSeriesSequence
            for i in se.ReferencedSOPSequence] == [preliminary[0].SOPInstanceUID]
    groups = hd.sr.ComprehensiveSR.from_dataset(verified).content.get_image_measurement_groups()
    by_image = {g.source_images[0].referenced_sop_instance_uid: g for g in groups}
    assert {e.name.meaning: e.value.meaning for e in by_image[instance_uid].get_qualitative_evaluations()}[
        "Finding of the human reader"] == other
    try:
        with ctx.db.session() as s:
            deliveries = [j for j in jobs(ctx, "deliver")]
            assert [j.status for j in deliveries] == ["done", "done"] and deliveries[1].payload["review"] == review.id
            # a PNG upload has no PACS study: its review queues nothing
            from medsight.serve.db import Study as StudyRow

            study = s.get(StudyRow, result.study_id)
            study.source_format = "png"
            submit_review(ctx, s, study.id, Actor("ruth", "radiologist", user.id), label=result.label, result_id=result.id)
        assert len(jobs(ctx, "deliver")) == 2
    finally:
        ctx.close()
