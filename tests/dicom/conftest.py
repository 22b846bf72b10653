"""Fixtures of the DICOM gateway tests: real pydicom-data files and predictions of the tiny model."""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pydicom
import pytest

import data_store

DATA = Path(data_store.__file__).parent / "data"
# A real two-instance head CT study of pydicom-data (two distinct SOP Instance UIDs, one Study Instance UID).
CT_STUDY = ("693_UNCI.dcm", "693_UNCR.dcm")


def read(path: Path, **kw) -> pydicom.Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, **kw)


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian package listed in .ci/apt-packages.txt)")
    return path


@pytest.fixture(scope="session")
def predictor(request: pytest.FixtureRequest):
    """The tiny model of tests/conftest.py; MEDSIGHT_TEST_PACKAGE may point at an already trained one
    (training it takes seconds on an idle machine but many minutes next to a training job)."""
    from medsight import load_model

    prebuilt = os.environ.get("MEDSIGHT_TEST_PACKAGE")
    return load_model(Path(prebuilt) if prebuilt else request.getfixturevalue("tiny_package"))


@pytest.fixture(scope="session")
def ct_study(predictor) -> list:
    """The CT study analysed by the tiny model: one AnalysedImage per instance."""
    from medsight.dicom.results import AnalysedImage

    files = [DATA / n for n in CT_STUDY]
    preds = predictor.predict_batch([str(f) for f in files], explain=True)
    return [AnalysedImage(p, read(f)) for p, f in zip(preds, files)]


def service_context(folder: Path, models_dir: Path, **overrides):
    """A real service (SQLite, file store, job queue) whose CT model is the tiny test model."""
    from medsight.serve.config import ServiceSettings
    from medsight.serve.context import ServiceContext

    fields = {"data_dir": folder / "service", "model_paths": [models_dir], "use_zoo": False,
              "default_models": {"CT": "tiny-xr", "CR": "tiny-xr"}} | overrides
    settings = ServiceSettings(**fields)
    return ServiceContext.build(settings)


def run_jobs(ctx) -> int:
    """Run every due job (analysis, then the deliveries it queued) in this process."""
    from medsight.serve.worker import Worker

    return Worker(ctx, name="test-worker").run(exit_when_idle=True)
