"""The near-OOD sets of each shipped model: real images of its modality (or a neighbouring one) that it must not read.

A far-OOD image (a dermoscopy photo given to a chest X-ray model) differs in every pixel
statistic; the dangerous inputs are the near ones: a shoulder MR given to the brain MR model,
an adult film given to the paediatric chest model, a fetal head scan given to a breast
ultrasound model. Two sources:

* DICOM files shipped with pydicom-data (``data_store``) and pydicom's own test files, one file
  per distinct picture (``DICOM_IMAGES``: the other encodings of the same image are left out,
  so a count is a count of pictures). They carry headers, so routing can be asked about them.
  Where the header names no body part, the anatomy was read from burned-in text or the image
  and the table says so. Left out: the DICOMDIR test files (16 x 16 px stand-in pixel data),
  the synthetic colour bars, LUT test patterns and a file that decodes to a solid colour.
* other shared data sets (``/work/shared/data``): no headers, so only the detector decides.

Each set has a kind (``KINDS``); the goal's "0 analysed with a finding" is about ``BODY_PART``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

BODY_PART = "other body part"
AGE = "other age group"
DEVICE = "other view, sequence or device"
MODALITY = "other modality"
UNSTATED = "body part not stated"
IN_SCOPE = "in scope (control)"
#: every kind, in report order; IN_SCOPE sets are images the model *should* read (held to no OOD goal)
KINDS = (BODY_PART, AGE, DEVICE, MODALITY, UNSTATED, IN_SCOPE)


@dataclass(frozen=True)
class DicomImage:
    """One distinct picture among the pydicom files: where it is, what it shows and how that is known."""

    file: str  # name in pydicom-data's store, or "test_files/<name>" for pydicom's own test files
    anatomy: str
    known_from: str
    frames: int | None = None  # frames read from a multi-frame file (evenly spaced); None: every frame


DICOM_IMAGES = {d.file: d for d in [
    # MR
    DicomImage("MR2_UNCR.dcm", "shoulder", "StudyDescription SHOULDER"),
    DicomImage("MR-SIEMENS-DICOM-WithOverlays.dcm", "abdomen (liver)", "BodyPartExamined ABDOMEN"),
    DicomImage("emri_small.dcm", "head (enhanced MR, 64 x 64 px)", "BodyPartExamined HEAD"),
    DicomImage("test_files/MR_small.dcm", "not stated (64 x 64 px)", "no body part in the header"),
    # CT
    DicomImage("693_UNCR.dcm", "head", "image (skull and brain)"),
    DicomImage("eCT_Supplemental.dcm", "head", "image (skull and brain)"),
    DicomImage("test_files/J2K_pixelrep_mismatch.dcm", "head", "BodyPartExamined HEAD"),
    DicomImage("bad_sequence.dcm", "neck", "BodyPartExamined NECK"),
    DicomImage("explicit_VR-UN.dcm", "abdomen (pancreas)", "BodyPartExamined PANCREAS"),
    DicomImage("test_files/CT_small.dcm", "thoracic spine", "image (vertebra and ribs)"),
    # CR
    DicomImage("RG3_UNCR.dcm", "leg (distal tibia)", "BodyPartExamined EXTREMITY, StudyDescription"),
    DicomImage("RG1_UNCR.dcm", "chest PA, adult", "BodyPartExamined CHEST, ViewPosition PA"),
    # US
    DicomImage("OBXXXX1A.dcm", "obstetric (palette colour)", "file name (OB), image"),
    DicomImage("US1_UNCR.dcm", "lymph node (power Doppler)", "burned-in text LYMPH NODE"),
    DicomImage("JPGLosslessP14SV1_1s_1f_8b.dcm", "heart (adult echo)", "burned-in text Adult Echo"),
    DicomImage("color-px.dcm", "heart (transoesophageal echo, colour Doppler)", "StudyDescription Echocardiogram"),
    DicomImage("color3d_jpeg_baseline.dcm", "heart (echo cine)", "image (four-chamber view)", frames=8),
    DicomImage("gdcm-US-ALOKA-16.dcm", "not stated", "no body part in the header or the image"),
    # photograph
    DicomImage("OT-PAL-8-face.dcm", "face (clinical photograph)", "image"),
]}


@dataclass(frozen=True)
class DicomSet:
    name: str
    kind: str
    files: tuple[str, ...]


@dataclass(frozen=True)
class SharedSet:
    """A shared data set (folder with manifest.csv, or .npz test split); ``rows`` filters its manifest."""

    name: str
    kind: str
    source: str
    note: str = ""
    rows: str | None = None  # a pandas query on the manifest, e.g. "age >= 18"


MR_OTHER = DicomSet("pydicom MR, other body part", BODY_PART, ("MR2_UNCR.dcm", "MR-SIEMENS-DICOM-WithOverlays.dcm"))
CT_ANY = DicomSet("pydicom CT (head, neck, abdomen, spine)", MODALITY,
                  ("693_UNCR.dcm", "eCT_Supplemental.dcm", "test_files/J2K_pixelrep_mismatch.dcm", "bad_sequence.dcm",
                   "explicit_VR-UN.dcm", "test_files/CT_small.dcm"))
COVID_CT = SharedSet("covid_ct_ucsd_cropped", MODALITY, "covid_ct_ucsd_cropped",
                     "chest CT slices cut from paper figures")
CR_OTHER = DicomSet("pydicom CR, other body part", BODY_PART, ("RG3_UNCR.dcm",))
US_OTHER = DicomSet("pydicom US, other body part", BODY_PART,
                    ("OBXXXX1A.dcm", "US1_UNCR.dcm", "JPGLosslessP14SV1_1s_1f_8b.dcm", "color-px.dcm",
                     "color3d_jpeg_baseline.dcm"))
US_UNSTATED = DicomSet("pydicom US, body part not stated", UNSTATED, ("gdcm-US-ALOKA-16.dcm",))
HC18 = SharedSet("hc18_fetal_head_us", BODY_PART, "hc18_fetal_head_us", "fetal head ultrasound")

#: each shipped model's near-OOD sets (far-OOD: every shared set of another imaging family, as in benchmarks/ood)
NEAR_SETS: dict[str, list[DicomSet | SharedSet]] = {
    "brain-tumor-mri": [
        MR_OTHER,
        DicomSet("pydicom MR head, other device", DEVICE, ("emri_small.dcm",)),
        DicomSet("pydicom MR, body part not stated", UNSTATED, ("test_files/MR_small.dcm",)),
        CT_ANY, COVID_CT,
    ],
    "pneumonia-cxr": [
        CR_OTHER,
        DicomSet("pydicom CR chest, adult", AGE, ("RG1_UNCR.dcm",)),
        SharedSet("covid_chestxray_ieee8023, adults", AGE, "covid_chestxray_ieee8023", "adult frontal films, age >= 18",
                  rows="age >= 18"),
        CT_ANY, COVID_CT,
    ],
    "covid-cxr": [
        CR_OTHER,
        SharedSet("pneumoniamnist.npz", AGE, "pneumoniamnist.npz", "paediatric chest films (1-5 years), 28 x 28 px"),
        CT_ANY, COVID_CT,
        DicomSet("pydicom CR chest, adult", IN_SCOPE, ("RG1_UNCR.dcm",)),
    ],
    "breast-us-busi": [
        US_OTHER, HC18, US_UNSTATED,
        SharedSet("breastmnist.npz", DEVICE, "breastmnist.npz", "the same BUSI images at 28 x 28 px"),
    ],
    "breast-us-malignancy": [
        US_OTHER, HC18, US_UNSTATED,
        SharedSet("busi_256", DEVICE, "busi_256", "BreastMNIST's source images at 256 x 256 px"),
    ],
    "skin-lesion-ham": [
        SharedSet("chasedb1_vessels", BODY_PART, "chasedb1_vessels", "retinal fundus photographs"),
        DicomSet("pydicom face photograph", DEVICE, ("OT-PAL-8-face.dcm",)),
        SharedSet("bccd_blood_cells", MODALITY, "bccd_blood_cells", "blood-smear microscopy"),
    ],
}


@dataclass
class Items:
    """The images of one set (paths or read images) and, for DICOM images, their headers."""

    images: list[Any]
    sources: list[str]
    headers: list[Any] | None = None  # pydicom Datasets (no pixel data), aligned with images
    described: list[DicomImage] = field(default_factory=list)


def dicom_path(file: str) -> Path:
    import data_store
    import pydicom.data

    if file.startswith("test_files/"):
        return Path(pydicom.data.__file__).parent / file
    return Path(data_store.__file__).parent / "data" / file


def dicom_items(s: DicomSet) -> Items:
    """Every frame (up to ``frames``, evenly spaced) of the set's files, read as the service reads a DICOM file."""
    import warnings

    import pydicom

    from medsight.io.readers import read_image

    out = Items([], [], [], [])
    for file in s.files:
        d = DICOM_IMAGES[file]
        path = dicom_path(file)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pydicom's warnings on these deliberately odd test files
            header = pydicom.dcmread(path, stop_before_pixels=True, force=True)
            n = int(header.get("NumberOfFrames") or 1)
            frames = range(n) if d.frames is None or n <= d.frames else np.linspace(0, n - 1, d.frames).round().astype(int)
            for f in frames:
                out.images.append(read_image(path, int(f)))
                out.sources.append(f"{file}" + (f" [frame {int(f)}]" if n > 1 else ""))
                out.headers.append(header)
                out.described.append(d)
    return out


def shared_items(s: SharedSet, data_root: Path, cap: int, seed: int = 0) -> Items:
    """Up to ``cap`` seeded images of a shared set (an .npz file: its test split, as benchmarks/ood samples it)."""
    from benchmarks.shipped import sample_of

    path = data_root / s.source
    if path.suffix == ".npz":
        ds = sample_of(s.source, data_root, cap, seed)
        return Items([ds.image(i) for i in range(len(ds))], [f"{s.source}[{i}]" for i in range(len(ds))])
    import pandas as pd

    df = pd.read_csv(path / "manifest.csv")
    if s.rows:
        df = df.query(s.rows)
    if len(df) > cap:
        df = df.iloc[np.sort(np.random.default_rng(seed).choice(len(df), cap, replace=False))]
    return Items([str(path / p) for p in df["path"]], [str(p) for p in df["path"]])
