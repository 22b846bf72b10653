"""The pixel budget: small files that declare or inflate to huge images are refused from their headers.

Memory is measured where it would be spent: each probe is read in a fresh interpreter and its
peak RSS growth (``ru_maxrss``) over a warm-up read of a small file of the same kind must stay
small; before the budget, these files took gigabytes.
"""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import DeflatedExplicitVRLittleEndian

from medsight.errors import ImageTooLargeError, OverlongPixelDataError
from medsight.io import read_dicom, read_dicom_frames, read_image, read_nifti
from medsight.io.budget import DEFAULT_MAX_PIXELS, ImageBudget, check_dicom, current_budget, set_max_pixels
from medsight.io.datasets import load_npz
from tests.io.bombs import deflated_dicom, image_header, native_dicom, png_of_zeros

ROOT = Path(__file__).resolve().parents[2]
#: Peak RSS growth allowed while a probe is refused (the refusal itself needs kilobytes).
GROWTH_MB = 64

_PROBE = """
import json, resource, sys, time
from medsight.errors import MedSightError
from medsight.io import read_image
read_image(sys.argv[2])  # warm-up: the readers' libraries are loaded before the baseline
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
try:
    read_image(sys.argv[1])
    error, message = None, ""
except MedSightError as e:
    error, message = type(e).__name__, str(e)
growth = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024
print(json.dumps({"error": error, "message": message, "growth_mb": growth, "seconds": time.perf_counter() - start}))
"""


def read_in_fresh_process(path: Path, warm_up: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", _PROBE, str(path), str(warm_up)], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture
def budget() -> Iterator[None]:
    """Tests that change this process's budget get the default back."""
    yield
    set_max_pixels(None)


def test_png_bomb_is_refused_from_its_header_with_little_memory(tmp_path: Path) -> None:
    bomb = png_of_zeros(tmp_path / "bomb.png", 13000, 13000)
    assert bomb.stat().st_size < 1 << 20  # under Pillow's own refusal (2 x 89.5 M pixels): it would only warn
    result = read_in_fresh_process(bomb, png_of_zeros(tmp_path / "small.png", 64, 64))
    assert result["error"] == "ImageTooLargeError"
    assert "13000x13000" in result["message"] and "max_pixels" in result["message"]
    assert result["growth_mb"] < GROWTH_MB and result["seconds"] < 2


def test_deflated_dicom_of_zeros_is_refused_before_its_pixels_are_inflated(tmp_path: Path) -> None:
    bomb = deflated_dicom(tmp_path / "bomb.dcm", 12000, 12000)  # 288 MB of pixel data
    assert bomb.stat().st_size < 1 << 20
    result = read_in_fresh_process(bomb, deflated_dicom(tmp_path / "small.dcm", 64, 64))
    assert result["error"] == "ImageTooLargeError"
    assert "12000x12000" in result["message"]
    assert result["growth_mb"] < GROWTH_MB and result["seconds"] < 2


def test_pixel_data_longer_than_declared_is_refused_native_and_deflated(tmp_path: Path) -> None:
    declared = 64 * 64 * 2
    native = native_dicom(tmp_path / "native.dcm", 64, 64, bytes(3 * declared))
    with pytest.raises(OverlongPixelDataError, match=f"{3 * declared:,} bytes of Pixel Data, the header declares {declared:,}"):
        read_dicom(native)
    deflated = deflated_dicom(tmp_path / "deflated.dcm", 64, 64, pixel_bytes=3 * declared)
    with pytest.raises(OverlongPixelDataError):
        read_dicom(deflated)


def test_padding_shorter_than_a_frame_is_not_refused(tmp_path: Path) -> None:
    """pydicom trims excess padding of less than a frame; some writers leave it, and such files are real."""
    padded = native_dicom(tmp_path / "padded.dcm", 64, 64, bytes(64 * 64 * 2 + 64 * 2))
    assert read_dicom(padded).pixels.shape == (64, 64, 1)


def test_a_deflated_stream_that_inflates_past_its_header_is_refused(tmp_path: Path) -> None:
    """A small image whose deflate stream goes on (here 64 MiB of trailing zeros) is cut off at what it declared."""
    liar = deflated_dicom(tmp_path / "liar.dcm", 64, 64, trailing_zeros=64 << 20)
    with pytest.raises(OverlongPixelDataError, match="inflates past"):
        read_dicom(liar)


def test_a_deflated_file_within_the_budget_reads_as_its_uncompressed_twin(tmp_path: Path) -> None:
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    plain = tmp_path / "plain.dcm"
    ds.save_as(plain, enforce_file_format=True)
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    deflated = tmp_path / "deflated.dcm"
    ds.save_as(deflated, enforce_file_format=True)
    a, b = read_dicom(plain), read_dicom(deflated)
    np.testing.assert_array_equal(a.pixels, b.pixels)
    assert b.meta["transfer_syntax_uid"] == DeflatedExplicitVRLittleEndian
    assert {k: v for k, v in a.meta.items() if k not in ("source", "transfer_syntax_uid")} == \
           {k: v for k, v in b.meta.items() if k not in ("source", "transfer_syntax_uid")}


def test_the_default_passes_large_real_images_and_refuses_the_probes() -> None:
    assert current_budget() == ImageBudget(DEFAULT_MAX_PIXELS)
    clip = read_dicom(get_testdata_file("color3d_jpeg_baseline.dcm"))  # 120-frame 480x640 RGB ultrasound
    assert clip.meta["n_frames"] == 120
    assert len(read_dicom_frames(get_testdata_file("color3d_jpeg_baseline.dcm"))) == 120
    for rows, cols, spp in ((5928, 4728, 1),   # the largest full-field mammogram detectors
                            (8192, 8192, 1),   # the default's edge
                            (3024, 4032, 3)):  # a 12-megapixel RGB photograph
        header = image_header(rows, cols)
        header.SamplesPerPixel = spp
        check_dicom(header)
    for rows, cols in ((8193, 8192), (12000, 12000)):
        with pytest.raises(ImageTooLargeError):
            check_dicom(image_header(rows, cols))


def test_one_setting_budgets_every_reader(tmp_path: Path, budget: None) -> None:
    dicom = native_dicom(tmp_path / "x.dcm", 128, 128, bytes(128 * 128 * 2))
    png = png_of_zeros(tmp_path / "x.png", 128, 128)
    nifti = tmp_path / "x.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((128, 128, 3), np.int16), np.eye(4)), nifti)
    for path in (dicom, png, nifti):
        read_image(path)
    set_max_pixels(100 * 100)
    for path in (dicom, png, nifti):
        with pytest.raises(ImageTooLargeError, match="10,000"):
            read_image(path)
    set_max_pixels(None)
    read_image(dicom)


def test_reading_every_frame_at_once_is_budgeted_by_bytes(budget: None) -> None:
    path = get_testdata_file("emri_small.dcm")  # 10 frames of 64x64
    set_max_pixels(5000)  # a frame (4096 samples) passes; 10 frames as float32 (163,840 bytes) exceed 80,000
    assert read_dicom(path).pixels.shape == (64, 64, 1)
    with pytest.raises(ImageTooLargeError, match="10 frames"):
        read_dicom_frames(path)


def nifti_header_only(path: Path, shape: tuple[int, ...], dtype: type) -> Path:
    """A single-file NIfTI-1 that declares ``shape`` and holds no voxels."""
    header = nib.Nifti1Header()
    header.set_data_shape(shape)
    header.set_data_dtype(dtype)
    header["magic"], header["vox_offset"] = b"n+1", 352
    data = header.binaryblock + b"\x00" * 4
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def test_nifti_header_is_checked_before_any_voxel_is_read(tmp_path: Path) -> None:
    huge = nifti_header_only(tmp_path / "huge.nii", (12000, 12000, 3), np.uint8)
    with pytest.raises(ImageTooLargeError, match="slice"):
        read_nifti(huge)


def test_a_compressed_volume_may_not_inflate_past_the_byte_cap(tmp_path: Path) -> None:
    # slices of 2048x2048 are within the budget; the volume is 10 GB of float64
    volume = nifti_header_only(tmp_path / "volume.nii.gz", (2048, 2048, 300), np.float64)
    with pytest.raises(ImageTooLargeError, match="volume"):
        read_nifti(volume)


def test_npz_images_are_budgeted_from_the_array_header(tmp_path: Path, budget: None) -> None:
    path = tmp_path / "set.npz"
    np.savez_compressed(path, train_images=np.zeros((4, 28, 28), np.uint8), train_labels=np.zeros((4, 1), np.uint8))
    assert len(load_npz(path, "train")) == 4
    set_max_pixels(28 * 28 - 1)
    with pytest.raises(ImageTooLargeError, match="train_images"):
        load_npz(path, "train")
