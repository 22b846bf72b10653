"""NIfTI reader: slice choice, orientation from the affine, robust scaling, errors."""

from __future__ import annotations

import gzip

import nibabel as nib
import numpy as np
import pytest

from medsight.errors import EmptyFileError, NotAnImageError, TruncatedPixelDataError
from medsight.io import read_nifti

RNG = np.random.default_rng(3)


def robust(x: np.ndarray) -> np.ndarray:
    lo, hi = np.percentile(x, [0.5, 99.5])
    return np.clip((x - lo) / (hi - lo), 0.0, 1.0)


def radiological(slice_xy: np.ndarray) -> np.ndarray:
    """RAS-stored axial slice -> rows anterior..posterior, columns patient right..left."""
    return slice_xy.T[::-1, ::-1]


@pytest.fixture()
def volume() -> np.ndarray:
    return RNG.normal(100.0, 20.0, (12, 10, 7)).astype(np.float32)


def save(data: np.ndarray, path, affine=None):
    nib.save(nib.Nifti1Image(data, np.eye(4) if affine is None else affine), path)
    return path


@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_middle_axial_slice_of_a_3d_volume(tmp_path, volume, name):
    image = read_nifti(save(volume, tmp_path / name))
    assert image.pixels.shape == (10, 12, 1)
    assert image.meta == {
        "source": str(tmp_path / name), "format": "nifti", "n_slices": 7, "slice_index": 3, "shape": (12, 10, 7),
    }
    np.testing.assert_allclose(image.pixels[..., 0], radiological(robust(volume[:, :, 3])), atol=1e-5)


def test_explicit_slice_index_and_out_of_range(tmp_path, volume):
    path = save(volume, tmp_path / "vol.nii")
    np.testing.assert_allclose(read_nifti(path, slice_index=0).pixels[..., 0], radiological(robust(volume[:, :, 0])), atol=1e-5)
    with pytest.raises(IndexError):
        read_nifti(path, slice_index=7)


def test_axial_axis_comes_from_the_affine_not_storage_order(tmp_path, volume):
    """The same anatomy stored slice-first (voxel i = superior axis) gives the same picture."""
    stored = np.ascontiguousarray(volume.transpose(2, 0, 1))  # (z, x, y)
    affine = np.array([[0, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)
    image = read_nifti(save(stored, tmp_path / "zfirst.nii", affine))
    assert image.meta["n_slices"] == 7
    np.testing.assert_allclose(image.pixels, read_nifti(save(volume, tmp_path / "ras.nii")).pixels, atol=1e-6)


def test_left_right_flipped_storage_gives_the_same_picture(tmp_path, volume):
    affine = np.diag([-1.0, 1.0, 1.0, 1.0])  # x runs toward the patient's left (LAS)
    flipped = read_nifti(save(np.ascontiguousarray(volume[::-1]), tmp_path / "las.nii", affine))
    np.testing.assert_allclose(flipped.pixels, read_nifti(save(volume, tmp_path / "ras.nii")).pixels, atol=1e-6)


def test_4d_uses_first_volume(tmp_path, volume):
    series = np.stack([volume, volume * 0 + 5.0], axis=-1)
    image = read_nifti(save(series, tmp_path / "4d.nii.gz"))
    np.testing.assert_allclose(image.pixels[..., 0], radiological(robust(volume[:, :, 3])), atol=1e-5)


def test_2d_image_is_returned_as_stored(tmp_path):
    flat = RNG.integers(0, 1000, (9, 5)).astype(np.int16)
    image = read_nifti(save(flat, tmp_path / "flat.nii"))
    assert image.meta["n_slices"] == 1
    np.testing.assert_allclose(image.pixels[..., 0], robust(flat.astype(np.float64)), atol=1e-5)


def test_hot_voxels_do_not_crush_the_contrast(tmp_path):
    data = np.tile(np.linspace(0.0, 100.0, 400, dtype=np.float32).reshape(20, 20, 1), (1, 1, 3))
    data[0, 0, 1] = 1e6
    middle = read_nifti(save(data, tmp_path / "hot.nii")).pixels
    assert 0.4 < float(np.median(middle)) < 0.6


def test_integer_volume_with_scaling(tmp_path):
    img = nib.Nifti1Image(RNG.integers(0, 4000, (6, 6, 3)).astype(np.int16), np.eye(4))
    img.header.set_slope_inter(0.5, -100.0)
    nib.save(img, tmp_path / "scaled.nii")
    pixels = read_nifti(tmp_path / "scaled.nii").pixels
    assert pixels.dtype == np.float32 and 0.0 <= pixels.min() and pixels.max() <= 1.0


def _raises(error, path):
    with pytest.raises(error) as info:
        read_nifti(path)
    assert str(path) in str(info.value)


def test_empty_file(tmp_path):
    (tmp_path / "empty.nii.gz").touch()
    _raises(EmptyFileError, tmp_path / "empty.nii.gz")


def test_text_named_nii(tmp_path):
    (tmp_path / "notes.nii").write_text("hello " * 100)
    _raises(NotAnImageError, tmp_path / "notes.nii")


@pytest.mark.parametrize("name", ["vol.nii", "vol.nii.gz"])
def test_truncated_volume(tmp_path, volume, name):
    full = save(volume, tmp_path / name).read_bytes()
    cut = tmp_path / f"cut_{name}"
    cut.write_bytes(full[: len(full) // 2])
    _raises(TruncatedPixelDataError, cut)


def test_gzip_that_is_not_nifti(tmp_path):
    path = tmp_path / "text.nii.gz"
    path.write_bytes(gzip.compress(b"plain text, not a NIfTI header " * 20))
    _raises(NotAnImageError, path)
