"""NIfTI (.nii, .nii.gz) reading: one 2-D slice of a research volume.

Classifiers in MedSight take 2-D images, so a volume is reduced to one axial
slice (the middle one unless asked otherwise). "Axial" is decided from the
affine, not from the storage order, because volumes are routinely stored
sagittally or coronally; the slice is then laid out the way a radiologist
looks at an axial CT (anterior up, patient's right on the image's left).

NIfTI carries no display window, so intensities are scaled between the 0.5th
and 99.5th percentiles of the slice: MR intensities are arbitrary and a few
hot voxels would otherwise crush the contrast of everything else.

The header's dimensions are checked against the pixel budget (:mod:`medsight.io.budget`)
before any voxel is read: the slice against ``max_pixels``, and for a gzip-compressed
file the volume it inflates to against the byte cap.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import nibabel as nib
import numpy as np

from medsight.errors import EmptyFileError, NotAnImageError, TruncatedPixelDataError, UnsupportedImageError
from medsight.io.budget import current_budget
from medsight.io.image import MedImage


def read_nifti(path: str | Path, slice_index: int | None = None) -> MedImage:
    """Read a 2-D image, or one axial slice of a 3-D volume (first volume of 4-D).

    ``slice_index`` counts along the volume's inferior-superior axis in
    storage order; ``None`` means the middle slice. A 2-D image is returned
    as stored: it has no through-plane axis from which to infer orientation.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise EmptyFileError(path)
    try:
        img = _load_image(path)
    except FileNotFoundError:
        raise
    except Exception as exc:  # nibabel signals a bad header with many exception types
        raise NotAnImageError(path, f"not readable as NIfTI: {exc}") from exc

    shape = tuple(int(s) for s in img.shape)
    while len(shape) > 3 and shape[-1] == 1:  # trailing singleton dims (e.g. 5-D with one component)
        shape = shape[:-1]
    if any(s <= 0 for s in shape):
        raise UnsupportedImageError(path, f"invalid NIfTI dimensions {img.shape}")
    if len(shape) < 2 or len(shape) > 4:
        raise UnsupportedImageError(path, f"NIfTI with {len(shape)} dimensions {img.shape}")
    if len(shape) == 2:
        if slice_index not in (None, 0):
            raise IndexError(f"{path}: slice {slice_index} out of range, image is 2-D")
        _check_budget(img, path, shape, None)
        data, n_slices, index = _load(img, path, ...), 1, 0
    else:
        x_axis, y_axis, z_axis, flips = _axial_layout(img.affine)
        _check_budget(img, path, shape, z_axis)
        n_slices = shape[z_axis]
        index = n_slices // 2 if slice_index is None else slice_index
        if not 0 <= index < n_slices:
            raise IndexError(f"{path}: slice {slice_index} out of range, volume has {n_slices} slices")
        selector: list = [slice(None)] * 3 + [0] * (img.ndim - 3)  # 4-D: first volume
        selector[z_axis] = index
        data = _load(img, path, tuple(selector))
        data = _radiological(data, x_axis, y_axis, z_axis, flips)
    return MedImage(
        _robust_unit(data)[..., None],
        {"source": str(path), "format": "nifti", "n_slices": n_slices, "slice_index": index, "shape": shape},
    )


def _load_image(path: Path):
    """``nib.load`` picks the format by suffix; files without one are opened by header magic."""
    if path.name.lower().endswith((".nii", ".nii.gz")):
        return nib.load(path)
    with open(path, "rb") as fh:
        head = fh.read(348)
    klass = nib.Nifti2Image if head[4:8] in (b"n+2\x00", b"ni2\x00") else nib.Nifti1Image
    return klass.from_file_map(klass.make_file_map({"image": str(path), "header": str(path)}))


def _check_budget(img, path: Path, shape: tuple[int, ...], z_axis: int | None) -> None:
    """The slice read (``z_axis`` None: the whole 2-D image) and, if gzip-compressed, the volume inflated to reach it."""
    spatial = shape[:3]
    volume = int(np.prod(spatial, dtype=np.int64))
    in_plane = volume // spatial[z_axis] if z_axis is not None else volume
    budget = current_budget()
    budget.check_pixels(in_plane, f"a slice of the {'x'.join(map(str, shape))} NIfTI image", path)
    if path.name.lower().endswith(".gz"):
        itemsize = np.dtype(img.get_data_dtype()).itemsize
        budget.check_bytes(volume * itemsize, f"the compressed {'x'.join(map(str, spatial))} volume", path)


def _load(img, path: Path, selector) -> np.ndarray:
    """Read only the voxels asked for; map I/O failures onto our error types."""
    try:
        data = np.asarray(img.dataobj[selector])
    except EOFError as exc:
        raise TruncatedPixelDataError(path, str(exc)) from exc
    except (ValueError, OSError, zlib.error) as exc:
        if "not enough data" in str(exc).lower():
            raise TruncatedPixelDataError(path, str(exc)) from exc
        raise UnsupportedImageError(path, f"voxel data could not be read: {exc}") from exc
    if data.dtype.names or np.iscomplexobj(data):
        raise UnsupportedImageError(path, f"voxel type {data.dtype} (RGB / complex NIfTI)")
    return data


def _axial_layout(affine: np.ndarray) -> tuple[int, int, int, tuple[bool, bool]]:
    """Storage axes closest to the patient's x (R-L), y (A-P), z (I-S) directions.

    Returns the axes and whether x, y run in the positive RAS direction. An
    unusable affine (all zeros, NaN) falls back to the storage order.
    """
    try:
        ornt = nib.orientations.io_orientation(affine)
        axes = {int(ornt[i, 0]): (i, ornt[i, 1] > 0) for i in range(3)}
        (xa, xpos), (ya, ypos), (za, _) = axes[0], axes[1], axes[2]
        return xa, ya, za, (xpos, ypos)
    except (KeyError, ValueError, IndexError):
        return 0, 1, 2, (True, True)


def _radiological(slab: np.ndarray, x_axis: int, y_axis: int, z_axis: int, flips: tuple[bool, bool]) -> np.ndarray:
    """Lay a 2-D slice out as rows = anterior->posterior, columns = patient right->left."""
    remaining = [a for a in range(3) if a != z_axis]  # storage order of the two in-plane axes
    img = slab if remaining.index(y_axis) == 0 else slab.T  # rows follow y, columns follow x
    x_pos, y_pos = flips
    if y_pos:  # y increases anteriorly: top row must be the most anterior
        img = img[::-1, :]
    if x_pos:  # x increases to the patient's right: first column must be the rightmost
        img = img[:, ::-1]
    return np.ascontiguousarray(img)


def _robust_unit(data: np.ndarray) -> np.ndarray:
    data = np.asarray(data, dtype=np.float64)
    finite = data[np.isfinite(data)]
    if finite.size == 0:
        return np.zeros(data.shape, dtype=np.float32)
    lo, hi = np.percentile(finite, [0.5, 99.5])
    if hi <= lo:
        lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        return np.zeros(data.shape, dtype=np.float32)
    out = np.clip((np.nan_to_num(data, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    return out.astype(np.float32)
