"""Upload limits: zip archives judged from their central directory, image bombs refused with 413 before decoding."""

from __future__ import annotations

import io
import time
import tracemalloc
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from medsight.errors import UploadError, UploadTooLargeError
from medsight.io.budget import set_max_pixels
from medsight.serve.ingest import expand_archives
from tests.io.bombs import deflated_dicom, native_dicom, png_of_zeros
from tests.serve.test_upload import counts

#: Python heap growth allowed while the service refuses an image bomb (before the budget: gigabytes).
PEAK_MB = 64


@pytest.fixture
def svc_factory(tmp_path: Path, models_dir: Path) -> Iterator:
    from tests.serve.conftest import make_service

    made = []

    def make(**overrides: object):
        svc = make_service(tmp_path / str(len(made)), f"sqlite:///{tmp_path / f'db{len(made)}.sqlite'}", models_dir, **overrides)
        made.append(svc)
        return svc

    yield make
    for svc in made:
        svc.client.close()
        svc.ctx.close()
    set_max_pixels(None)  # a service sets its process's budget; the next test gets the default back


def zip_bytes(members: dict[str, bytes], compression: int = zipfile.ZIP_DEFLATED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def test_a_zip_of_100000_empty_members_is_refused_at_once_and_nothing_is_written(tmp_path: Path, svc_factory) -> None:
    flood = tmp_path / "flood.zip"
    with zipfile.ZipFile(flood, "w") as zf:
        for i in range(100_000):
            zf.writestr(f"f{i}.dcm", b"")
    work = tmp_path / "work"
    work.mkdir()
    start = time.perf_counter()
    with pytest.raises(UploadTooLargeError, match="100000 entries"):
        expand_archives([("flood.zip", flood)], work, 256 << 20, 500)
    assert time.perf_counter() - start < 0.2
    assert list(work.iterdir()) == []
    svc = svc_factory()
    r = svc.upload([("flood.zip", flood.read_bytes())])
    assert r.status_code == 413 and r.json()["error"] == "UploadTooLargeError", r.text
    assert counts(svc) == (0, 0, 0, 0)
    assert not any(svc.ctx.store.tmp_dir.iterdir())


def test_zip_members_are_judged_from_the_central_directory_before_extraction(tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()

    def expand(members: dict[str, bytes], **limits: int) -> list:
        path = tmp_path / "a.zip"
        path.write_bytes(zip_bytes(members))
        return expand_archives([("a.zip", path)], work, limits.get("max_bytes", 256 << 20), limits.get("max_files", 500))

    with pytest.raises(UploadError, match="unsafe path"):
        expand({"ok.dcm": b"x", "../../etc/cron.d/x.dcm": b"x"})
    with pytest.raises(UploadError, match="unsafe path"):
        expand({"/abs/x.dcm": b"x"})
    with pytest.raises(UploadTooLargeError, match="inflates .* times"):
        expand({"zeros.dcm": bytes(16 << 20)})  # deflates about 1000:1
    with pytest.raises(UploadTooLargeError, match="501 files"):
        expand({f"{i}.dcm": b"x" for i in range(501)})
    with pytest.raises(UploadTooLargeError, match="expands to"):
        expand({"a.dcm": bytes(4096), "b.dcm": bytes(4096)}, max_bytes=8000)
    assert list(work.iterdir()) == []  # every refusal came before anything was extracted
    # what real archives hold passes: folders, macOS twins and a DICOMDIR are skipped, names kept for messages
    out = expand({"study/": b"", "study/1.dcm": b"one", "__MACOSX/study/._1.dcm": b"", "study/DICOMDIR": b"x"})
    assert [(name, path.read_bytes()) for name, path in out] == [("a.zip/study/1.dcm", b"one")]


def test_image_bombs_are_refused_with_413_and_little_memory(tmp_path: Path, svc_factory) -> None:
    svc = svc_factory()
    png = png_of_zeros(tmp_path / "bomb.png", 13000, 13000).read_bytes()
    dcm = deflated_dicom(tmp_path / "bomb.dcm", 12000, 12000).read_bytes()
    assert len(png) < 1 << 20 and len(dcm) < 1 << 20
    tracemalloc.start()
    try:
        r_png = svc.upload([("bomb.png", png)], modality="CR")
        r_dcm = svc.upload([("bomb.dcm", dcm)])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    for r, size in ((r_png, "13000x13000"), (r_dcm, "12000x12000")):
        assert r.status_code == 413, r.text
        body = r.json()
        assert body["error"] == "ImageTooLargeError" and size in body["detail"] and "max_pixels" in body["detail"]
    assert r_png.json()["detail"].startswith("bomb.png: ")  # the uploaded name, not a temporary path
    assert peak < PEAK_MB << 20
    assert counts(svc) == (0, 0, 0, 0)


def test_pixel_data_three_times_longer_than_declared_is_refused(tmp_path: Path, svc_factory) -> None:
    svc = svc_factory()
    long = native_dicom(tmp_path / "long.dcm", 64, 64, bytes(3 * 64 * 64 * 2)).read_bytes()
    r = svc.upload([("long.dcm", long)])
    assert r.status_code == 422 and r.json()["error"] == "OverlongPixelDataError", r.text
    assert counts(svc) == (0, 0, 0, 0)


def test_a_bomb_is_refused_before_deidentification_on_arrival_reads_it(tmp_path: Path, svc_factory) -> None:
    from medsight.integration.deid import new_key_file

    svc = svc_factory(deid_key_file=new_key_file(tmp_path / "site.key"))
    tracemalloc.start()
    try:
        r = svc.upload([("bomb.dcm", deflated_dicom(tmp_path / "bomb.dcm", 12000, 12000).read_bytes())])
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert r.status_code == 413 and r.json()["error"] == "ImageTooLargeError", r.text
    assert peak < PEAK_MB << 20


def test_the_max_pixels_setting_is_the_budget_of_the_service(tmp_path: Path, svc_factory, monkeypatch) -> None:
    from medsight.serve.config import ServiceSettings

    monkeypatch.setenv("MEDSIGHT_MAX_PIXELS", "12345")
    assert ServiceSettings.from_env().max_pixels == 12345
    svc = svc_factory(max_pixels=100 * 100)
    r = svc.upload([("small.png", png_of_zeros(tmp_path / "small.png", 128, 128).read_bytes())], modality="CR")
    assert r.status_code == 413 and "10,000" in r.json()["detail"], r.text
