"""Fixtures of the DICOM gateway tests: real pydicom-data files and predictions of the tiny model."""

from __future__ import annotations

import os
import shutil
import socket
import time
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
    from medsight.integration.results import AnalysedImage

    files = [DATA / n for n in CT_STUDY]
    preds = list(predictor.stream([str(f) for f in files], explain=True))
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


def wait_for(predicate, timeout: float = 30.0, period: float = 0.1):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = predicate()
        if value:
            return value
        time.sleep(period)
    raise AssertionError("condition not reached in time")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class MiniPacs:
    """A stand-in PACS: a pynetdicom Storage SCP for every storage class (SR included) that keeps
    what it receives; refuses data sets without pixel data where an image is expected, like real PACS do."""

    def __init__(self, folder: Path, port: int = 0):
        from pynetdicom import AE, AllStoragePresentationContexts, evt

        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, self._store)])

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def _store(self, event) -> int:
        ds = event.dataset
        if "Rows" in ds and "PixelData" not in ds:
            return 0xA900
        ds.file_meta = event.file_meta
        ds.save_as(self.folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0x0000

    def received(self) -> list:
        return [read(f) for f in sorted(self.folder.glob("*.dcm"))]

    def stop(self) -> None:
        self.server.shutdown()


def pacs(tmp_path: Path, port: int = 0) -> MiniPacs:
    return MiniPacs(tmp_path / "pacs", port)


