"""``medsight export-reviews``: reviewed cases as a labelled data set that ``medsight train`` reads directly.

Output: ``DIR/manifest.csv`` in the core manifest format (``path,label,...``,
paths relative to the CSV) and ``DIR/images/``. By default images are written
as *de-identified PNGs*: the pixels as displayed (16-bit for grayscale, so no
precision is lost; 8-bit RGB for colour) with no DICOM header at all, so names,
IDs and dates cannot leak. Text burned into the pixels is not removed: export
from modalities that burn in annotations only after checking. ``--originals``
copies the stored files instead, for sites that de-identify elsewhere.

The label of each case is the reviewer's, from the most recent review of that
result; one export holds one model's cases (label sets differ between models). A case whose latest
review excludes it ("not applicable", "wrong body part", "poor quality") is left out: it is no example
of any of the model's labels.
"""

from __future__ import annotations

import csv
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from medsight.errors import DataSetError
from medsight.io.readers import read_image
from medsight.serve.audit import Actor, record
from medsight.serve.context import ServiceContext
from medsight.serve.db import Instance
from medsight.serve.reviews import latest_reviews

COLUMNS = ["path", "label", "sex", "age", "case_id", "model", "model_label", "review_action", "reviewer", "reviewed_at", "modality"]


@dataclass
class ExportSummary:
    out_dir: Path
    manifest: Path
    cases: int
    model: str
    labels: dict[str, int]


def deidentified_png(src: Path, dest: Path) -> None:
    img = read_image(src)
    px = np.clip(img.pixels, 0.0, 1.0)
    if img.channels == 1:
        Image.fromarray((px[..., 0] * 65535.0 + 0.5).astype(np.uint16)).save(dest)
    else:
        Image.fromarray((px * 255.0 + 0.5).astype(np.uint8)).save(dest)


def export_reviews(ctx: ServiceContext, out_dir: Path, actor: Actor, model: str | None = None,
                   originals: bool = False) -> ExportSummary:
    out_dir = Path(out_dir)
    with ctx.db.session() as s:
        reviewed = latest_reviews(s)
        names = sorted({res.model.split("@", 1)[0] for _, res in reviewed})
        if not reviewed:
            raise DataSetError("no reviewed cases to export yet")
        if model is None:
            if len(names) > 1:
                raise DataSetError(f"reviews exist for several models ({', '.join(names)}): choose one with --model")
            model = names[0]
        if model not in names:
            raise DataSetError(f"no reviewed cases for model {model!r}; reviewed models: {', '.join(names)}")
        rows, excluded = [], 0
        for rev, res in reviewed:
            if res.model.split("@", 1)[0] != model:
                continue
            if rev.action == "exclude":  # not applicable, wrong body part, poor quality: no example of any label
                excluded += 1
                continue
            inst = s.get(Instance, res.instance_id)
            study = inst.study
            rows.append({"sha": inst.file_sha256, "fmt": inst.format, "label": rev.label, "sex": inst.patient_sex or "",
                         "age": "" if inst.patient_age is None else inst.patient_age, "case_id": res.id,
                         "model": res.model, "model_label": res.label, "review_action": rev.action,
                         "reviewer": rev.reviewer.username, "reviewed_at": rev.created_at.isoformat() + "Z",
                         "modality": study.modality})
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.csv"
    tmp_manifest = out_dir / ".manifest.csv.tmp"
    with open(tmp_manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=COLUMNS)
        w.writeheader()
        for r in rows:
            src = ctx.store.path_for(r["sha"])
            if originals:
                ext = ".dcm" if r["fmt"] == "dicom" else f".{'jpg' if r['fmt'] == 'jpeg' else r['fmt']}"
                name = f"case_{r['case_id']}{ext}"
                shutil.copyfile(src, images / name)
            else:
                name = f"case_{r['case_id']}.png"
                deidentified_png(src, images / name)
            w.writerow({"path": f"images/{name}", **{k: r[k] for k in COLUMNS if k in r}})
    tmp_manifest.replace(manifest)  # the manifest appears only once every image it lists exists
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["label"]] = counts.get(r["label"], 0) + 1
    with ctx.db.session() as s:
        record(s, actor, "review.export", "dataset", str(out_dir), model=model, cases=len(rows), labels=counts,
               originals=originals, excluded=excluded)
    return ExportSummary(out_dir, manifest, len(rows), model, counts)
