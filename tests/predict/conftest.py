"""Fixtures of the fast-inference tests: a private ONNX cache, real sample images, a tunable package copy."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from medsight.predict.settings import RuntimeSettings

SAMPLES = Path(__file__).resolve().parents[2] / "medsight" / "samples"


@pytest.fixture(scope="session")
def runtime_settings(tmp_path_factory: pytest.TempPathFactory) -> RuntimeSettings:
    """One thread and no decode workers: deterministic and light on a shared 2-core CI box."""
    return RuntimeSettings(cache_dir=tmp_path_factory.mktemp("cache"), intra_op_threads=1, decode_workers=0)


@pytest.fixture(scope="session")
def sample_files() -> list[Path]:
    """The real medical images bundled with MedSight (chest X-ray, breast ultrasound, dermoscopy)."""
    files = sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in (".png", ".jpg"))
    assert len(files) >= 4
    return files


@pytest.fixture
def package_copy(tiny_package: Path, tmp_path: Path) -> Path:
    """A writable copy of the tiny package (tests that write card.runtime must not touch the shared one)."""
    return Path(shutil.copytree(tiny_package, tmp_path / "tiny"))
