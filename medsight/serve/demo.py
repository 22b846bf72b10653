"""``medsight serve --demo``: queue the bundled sample studies so the worklist is populated on start.

Uses the same samples as ``medsight demo`` (``medsight/samples/samples.json``) and
the normal upload path, so the demo exercises exactly what a real upload does.
Samples whose model is not installed, or does not apply (the adult chest CR named for the
paediatric model; docs/routing.md), are skipped with a note.
"""

from __future__ import annotations

import json

from rich.console import Console

from medsight.io.samples import SAMPLES_DIR, sample_path
from medsight.errors import MedSightError
from medsight.serve.audit import Actor
from medsight.serve.context import ServiceContext
from medsight.serve.ingest import UploadRequest, ingest

#: Requested priorities for the demo, so the worklist shows STAT/urgent handling.
DEMO_PRIORITY = {"RG1_J2KR.dcm": "stat", "pneumonia-cxr_test0000_pneumonia.png": "urgent"}


def _first_modality(card_modality: str) -> str:
    return card_modality.strip().split(" ", 1)[0].split("/")[0].upper()


def load_demo_studies(ctx: ServiceContext, console: Console | None = None) -> list[int]:
    console = console or Console(stderr=True)
    entries = json.loads((SAMPLES_DIR / "samples.json").read_text())
    actor = Actor("demo-loader", "operator")
    ids: list[int] = []
    for k, e in enumerate(entries, 1):
        try:
            card = ctx.catalog.card(e["model"])
            path = sample_path(e)
            modality = None if path.suffix.lower() == ".dcm" else _first_modality(card.modality)
            # A PNG/JPEG sample has no header to route on; it comes from its model's own test split
            # (samples.json), so the demo overrides applicability for it. DICOM samples are routed as any study.
            study = ingest(ctx, UploadRequest([(path.name, path)], modality, card.name,
                                              DEMO_PRIORITY.get(path.name, "routine"), f"DEMO-{k:02d}",
                                              (f"demo sample, reference label {e['truth']}" if e.get("truth") else f"demo sample: {e.get('note', '')}")[:250],
                                              override_applicability=modality is not None), actor)
            ids.append(study.id)
        except MedSightError as err:
            console.print(f"demo: skipped {e.get('file') or e.get('pydicom_data')}: {err}", highlight=False)
    console.print(f"demo: {len(ids)} sample studies queued for analysis", highlight=False)
    return ids
