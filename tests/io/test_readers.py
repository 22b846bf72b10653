"""Format sniffing, folder-walk helpers, and a walk over every public DICOM test file."""

from __future__ import annotations

import gzip
import shutil
from collections import Counter
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file, get_testdata_files

import data_store
from medsight.errors import EmptyFileError, ImageReadError, NoPixelDataError, NotAnImageError
from medsight.io import SUPPORTED_SUFFIXES, is_probably_image, read_frames, read_image
from medsight.io.dicom import PIXEL_TAGS

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DATA_STORE = Path(data_store.__file__).parent / "data"
MAX_BYTES = 50 * 1024 * 1024


def all_public_test_files() -> list[Path]:
    """pydicom-data plus pydicom's own test files (DICOM and not), deduplicated."""
    found = {Path(p).resolve() for p in get_testdata_files()}
    found |= {p.resolve() for p in DATA_STORE.rglob("*")}
    return sorted(p for p in found if p.is_file() and p.stat().st_size <= MAX_BYTES)


def has_pixel_data(path: Path) -> bool:
    """Independent of our reader: does pydicom find a pixel data element at all?"""
    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception:
        return False
    return any(tag in ds for tag in PIXEL_TAGS)


def test_every_public_test_file_loads_or_fails_with_a_specific_error():
    files = all_public_test_files()
    assert len(files) > 200  # both packages were found
    loaded, failed, other = [], {}, Counter()
    for path in files:
        try:
            image = read_image(path)
        except ImageReadError as exc:
            assert type(exc) is not ImageReadError, f"{path}: base class raised, not a specific subclass"
            assert str(path) in str(exc)
            # Truncation can hide the pixel element from pydicom too; it still had pixels.
            if not isinstance(exc, (NoPixelDataError, NotAnImageError)) or has_pixel_data(path):
                failed[path.name] = f"{type(exc).__name__}: {exc.detail}"
            else:
                other[type(exc).__name__] += 1
            continue
        assert has_pixel_data(path), path
        px = image.pixels
        assert px.dtype == np.float32 and px.ndim == 3 and px.shape[2] in (1, 3), path
        assert np.isfinite(px).all() and px.min() >= 0.0 and px.max() <= 1.0, path
        loaded.append(path.name)

    with_pixels = len(loaded) + len(failed)
    reasons = Counter(reason.split(":")[0] for reason in failed.values())
    summary = (
        f"{len(files)} files: {len(loaded)} loaded; {len(failed)} with pixel data failed {dict(reasons)}; "
        f"without pixel data / not images: {dict(other)}\n"
        + "\n".join(f"  {name}: {reason}" for name, reason in sorted(failed.items()))
    )
    print(summary)
    assert with_pixels > 100, summary
    assert len(loaded) >= 0.85 * with_pixels, summary


# --------------------------------------------------------------------------- sniffing


def test_png_named_dcm_is_read_as_png(tmp_path):
    path = tmp_path / "really_a_png.dcm"
    Image.fromarray(np.full((4, 5), 77, dtype=np.uint8)).save(path, format="PNG")
    image = read_image(path)
    assert image.meta["format"] == "png" and image.pixels.shape == (4, 5, 1)


def test_dicom_without_suffix_and_with_uid_name(tmp_path):
    for name in ("IM0001", "1.2.840.113619.2.55.3.2831"):
        path = tmp_path / name
        shutil.copy(get_testdata_file("CT_small.dcm"), path)
        assert read_image(path).meta["format"] == "dicom"
        assert is_probably_image(path)


def test_preamble_less_dicom_without_suffix_is_found_by_forced_parse(tmp_path):
    path = tmp_path / "face"
    shutil.copy(DATA_STORE / "OT-PAL-8-face.dcm", path)
    assert read_image(path).channels == 3
    assert not is_probably_image(path)  # no DICM marker: a walk only finds it by suffix


def test_structured_report_without_preamble_has_no_pixel_data(tmp_path):
    path = tmp_path / "rtstruct"
    shutil.copy(get_testdata_file("rtstruct.dcm"), path)
    with pytest.raises(NoPixelDataError):
        read_image(path)


def test_nifti_found_by_header_or_gzip_plus_suffix(tmp_path):
    volume = np.arange(4 * 5 * 3, dtype=np.float32).reshape(4, 5, 3)
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "vol.nii")
    nib.save(nib.Nifti1Image(volume, np.eye(4)), tmp_path / "vol.nii.gz")
    shutil.copy(tmp_path / "vol.nii", tmp_path / "no_suffix")
    for name in ("vol.nii", "vol.nii.gz", "no_suffix"):
        assert read_image(tmp_path / name).meta["format"] == "nifti", name
    assert read_image(tmp_path / "vol.nii", frame=0).meta["slice_index"] == 0


def test_unknown_content_is_not_an_image(tmp_path):
    text = tmp_path / "notes.txt"
    text.write_text("no image here\n" * 50)
    other_gzip = tmp_path / "archive.gz"
    other_gzip.write_bytes(gzip.compress(b"x" * 1000))
    for path in (text, other_gzip, Path(get_testdata_file("zipMR.gz"))):
        with pytest.raises(NotAnImageError) as info:
            read_image(path)
        assert str(path) in str(info.value)


def test_empty_file(tmp_path):
    path = tmp_path / "empty"
    path.touch()
    with pytest.raises(EmptyFileError):
        read_image(path)
    with pytest.raises(EmptyFileError):
        read_frames(path)


def test_frame_argument(tmp_path):
    path = get_testdata_file("emri_small.dcm")
    assert read_image(path).meta["frame_index"] == 5
    assert read_image(path, frame=2).meta["frame_index"] == 2
    png = tmp_path / "x.png"
    Image.new("L", (3, 3)).save(png)
    assert read_image(png, frame=0).channels == 1
    with pytest.raises(IndexError):
        read_image(png, frame=1)


def test_read_frames():
    assert len(read_frames(get_testdata_file("emri_small.dcm"))) == 10
    assert len(read_frames(get_testdata_file("CT_small.dcm"))) == 1


def test_read_frames_non_dicom_is_one_image(tmp_path):
    path = tmp_path / "x.tif"
    Image.new("RGB", (3, 2)).save(path)
    frames = read_frames(path)
    assert len(frames) == 1 and frames[0].pixels.shape == (2, 3, 3)


# --------------------------------------------------------------------------- folder walking


def test_is_probably_image(tmp_path):
    for name in ("a.dcm", "b.PNG", "c.jpeg", "d.tif", "e.nii.gz", "f.nii", "g.bmp"):
        (tmp_path / name).write_bytes(b"x")
        assert is_probably_image(tmp_path / name), name
    for name in ("notes.txt", "data.csv", "archive.gz", "._a.dcm", ".hidden.png", "no_suffix_text"):
        (tmp_path / name).write_bytes(b"x" * 200)
        assert not is_probably_image(tmp_path / name), name
    (tmp_path / "folder.dcm").mkdir()
    assert not is_probably_image(tmp_path / "folder.dcm")


def test_supported_suffixes():
    assert isinstance(SUPPORTED_SUFFIXES, tuple)
    assert {".dcm", ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".nii", ".nii.gz"} <= set(SUPPORTED_SUFFIXES)
    assert all(s == s.lower() and s.startswith(".") for s in SUPPORTED_SUFFIXES)


def test_walk_finds_suffixless_dicom_by_marker_and_skips_dicomdir():
    root = Path(get_testdata_file("CT_small.dcm")).parent / "dicomdirtests"
    found = {p.name for p in root.rglob("*") if is_probably_image(p)}
    assert {"6154", "17106", "4467", "IM000000"} <= found
    assert not {"DICOMDIR", "README.txt"} & found  # a DICOMDIR is an index of the media, never an image
