"""One analysis job: every image of a study through the core :class:`~medsight.predict.predictor.Predictor`.

The service never re-implements inference: it hands stored files to the same
``Predictor`` the CLI uses, then stores what that returns. Derived images
(display PNG, heat-map overlay, bare heat map) are written to content-addressed
storage before the transaction that records the results, and that transaction
also completes the job conditionally on the worker still holding its lease.
"""

from __future__ import annotations

import io
import logging
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image
from sqlalchemy import select

from medsight.explain.overlay import save_heatmap, save_overlay
from medsight.io.image import MedImage
from medsight.models.policy import critical_probability, finding_labels, is_critical, reported_finding
from medsight.predict.result import Prediction, PredictionError
from medsight.serve.audit import Actor, record
from medsight.serve.context import ServiceContext
from medsight.serve.db import Instance, Result, Study, utcnow
from medsight.serve.jobs import Lease
from medsight.serve.triage import base_score, most_urgent


log = logging.getLogger("medsight.serve.analysis")


class LeaseLost(Exception):
    """The worker's lease expired and the job was claimed elsewhere: its results must not be written."""


class AnalysisFailed(Exception):
    """The study cannot be analysed (unreadable image at analysis time, model gone): retrying will not help."""


def display_png(image: MedImage) -> bytes:
    """The image as the radiologist sees it (readers already applied LUTs/windowing), 8-bit PNG."""
    px = image.to_uint8()
    arr = px[..., 0] if px.shape[-1] == 1 else px
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", optimize=False, compress_level=3)
    return buf.getvalue()


def _build_outgoing(ctx: ServiceContext, study: dict, paths: list[Path], preds: list, card=None) -> tuple[dict[str, list[str]], str | None]:  # noqa: ANN001
    """Build the configured result objects (SR/SC, FHIR, HL7) once and store them; channel -> blob hashes.

    Built here, from the very predictions just stored, so a delivery retry
    re-sends identical bytes. A failure to build is reported (audit + log) but
    does not undo the analysis: the radiologist still sees the result.
    """
    outputs = ctx.settings.outputs
    dicom_source = study["source_format"] == "dicom"
    channels = outputs.channels(dicom_source)
    if not channels:
        return {}, None
    from medsight.integration.delivery import build_payloads
    from medsight.integration.results import AnalysedImage

    try:
        # the card puts the model's intended use and applicable ages into the SR and the FHIR report
        images = [AnalysedImage(p, source_header(path) if dicom_source else stand_in_header(study), card)
                  for path, p in zip(paths, preds)]
        return {c: [ctx.store.put_bytes(b) for b in build_payloads(images, c, outputs)] for c in channels}, None
    except Exception as e:  # noqa: BLE001 - any builder failure is reported, the analysis stands
        log.exception("study %s: result objects could not be built", study["study_uid"])
        return {}, f"{type(e).__name__}: {e}"[:500]


def source_header(path: Path):  # noqa: ANN202 - pydicom Dataset
    import pydicom

    return pydicom.dcmread(path, stop_before_pixels=True)


def stand_in_header(study: dict):  # noqa: ANN202 - pydicom Dataset
    """PNG/JPEG uploads have no DICOM header; FHIR and HL7 need only the study's identity."""
    from pydicom.dataset import Dataset

    ds = Dataset()
    ds.StudyInstanceUID = study["study_uid"]
    ds.Modality = study["modality"]
    if study["accession_number"]:
        ds.AccessionNumber = study["accession_number"]
    return ds


def reports_critical(card, pred: Prediction) -> bool:  # noqa: ANN001 - ModelCard
    """Whether the result *reports* a critical finding: a referred image reports none, whatever its label says,
    so it is never flagged critical nor announced by the critical-finding webhook (the refer weight ranks it)."""
    return not pred.refer and is_critical(card, pred.label, pred.probabilities)


def analyse_study(ctx: ServiceContext, lease: Lease) -> Study:
    """Run the study's model on each instance, store results, complete the job. Raises LeaseLost / AnalysisFailed."""
    with ctx.db.session() as s:
        study = s.get(Study, lease.study_id)
        if study is None:
            raise AnalysisFailed(f"study {lease.study_id} no longer exists")
        study.status = "analysing"
        model_name = study.model
        facts = {"study_uid": study.study_uid, "accession_number": study.accession_number,
                 "source_format": study.source_format, "modality": study.modality}
        instances = [(i.id, i.file_sha256) for i in s.execute(
            select(Instance).where(Instance.study_id == study.id).order_by(Instance.id)).scalars()]
    try:
        predictor = ctx.catalog.predictor(model_name)
    except Exception as e:  # model removed or corrupted since upload
        raise AnalysisFailed(f"model {model_name!r} cannot be loaded: {e}") from e
    card = predictor.card
    paths = [ctx.store.path_for(sha) for _, sha in instances]
    preds = list(predictor.stream(paths, explain=True))
    errors = [p for p in preds if isinstance(p, PredictionError)]
    if errors:
        raise AnalysisFailed("; ".join(f"{e.kind}: {e.error}" for e in errors))

    outgoing, export_error = _build_outgoing(ctx, facts, paths, preds, card)
    stored = []
    with tempfile.TemporaryDirectory(dir=ctx.store.tmp_dir) as tmp:
        for (inst_id, _), pred in zip(instances, preds):
            assert isinstance(pred, Prediction) and pred.image is not None
            disp = ctx.store.put_bytes(display_png(pred.image))
            over = heat = None
            if pred.heatmap is not None:
                # alpha=1: the web page blends the overlay over the image with its own opacity slider.
                over = ctx.store.put_file(save_overlay(pred.image, pred.heatmap, Path(tmp) / f"{inst_id}_o.png", alpha=1.0))
                heat = ctx.store.put_file(save_heatmap(np.clip(pred.heatmap, 0, 1), Path(tmp) / f"{inst_id}_h.png"))
            stored.append((inst_id, pred, disp, over, heat))

    w = ctx.settings.triage
    with ctx.db.session() as s:
        if not ctx.queue.complete(s, lease):
            raise LeaseLost(f"job {lease.job_id}: lease lost before results were written")
        study = s.get(Study, lease.study_id)
        results = []
        for inst_id, pred, disp, over, heat in stored:
            pc = critical_probability(card, pred.probabilities)
            r = Result(
                study_id=study.id, instance_id=inst_id, job_id=lease.job_id, model=pred.model, label=pred.label,
                labels=list(card.labels), task=card.task, findings=finding_labels(card),
                probabilities=pred.probabilities, confidence=pred.confidence, refer=pred.refer, statement=pred.statement,
                critical_probability=pc, critical=reports_critical(card, pred), heatmap_label=pred.heatmap_label,
                display_sha256=disp, overlay_sha256=over, heatmap_sha256=heat, created_by=lease.owner,
            )
            s.add(r)
            results.append(r)
        s.flush()
        key = most_urgent(results)
        study.status, study.analysed_at, study.error = "analysed", utcnow(), None
        study.critical_probability = key.critical_probability
        study.refer = any(r.refer for r in results)
        study.critical = any(r.critical for r in results)
        study.finding = reported_finding(key.label, key.refer)  # a referred key image names no finding
        study.priority_base = base_score(w, study.requested_priority, study.critical_probability, study.refer)
        record(s, Actor(f"worker:{lease.owner}", "worker"), "result.create", "study", study.id,
               results=[r.id for r in results], model=key.model, finding=study.finding, refer=study.refer,
               critical=study.critical,
               job=lease.job_id, attempt=lease.attempt)
        outputs = ctx.settings.outputs
        for channel, shas in outgoing.items():
            ctx.queue.enqueue(s, "deliver", study.id, {"channel": channel, "blobs": shas}, priority=50,
                              max_attempts=outputs.max_attempts)
        if export_error:
            record(s, Actor(f"worker:{lease.owner}", "worker"), "deliver.build_failed", "study", study.id, error=export_error)
        if study.critical and ctx.settings.webhook.url:
            ctx.queue.enqueue(s, "notify", study.id, {"url": ctx.settings.webhook.url}, priority=100,
                              max_attempts=ctx.settings.webhook.max_attempts)
        return study
