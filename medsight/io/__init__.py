"""File readers: every supported format becomes a display-ready :class:`MedImage`.

The names below are imported from their submodules on first use (PEP 562), so importing one
submodule (``medsight.io.image``) does not load pydicom, nibabel and Pillow with it.
"""

from __future__ import annotations

import importlib

#: public name -> submodule of this package that defines it
_WHERE = {
    "MedImage": "image", "SUPPORTED_SUFFIXES": "readers", "is_probably_image": "readers", "read_dicom": "dicom",
    "read_dicom_frames": "dicom", "read_frames": "readers", "read_image": "readers", "read_nifti": "nifti",
    "read_raster": "raster",
}
__all__ = sorted(_WHERE)


def __getattr__(name: str):  # noqa: ANN202 - PEP 562
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
