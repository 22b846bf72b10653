"""File readers: every supported format becomes a display-ready :class:`MedImage`."""

from medsight.io.dicom import read_dicom, read_dicom_frames
from medsight.io.image import MedImage
from medsight.io.nifti import read_nifti
from medsight.io.raster import read_raster
from medsight.io.readers import SUPPORTED_SUFFIXES, is_probably_image, read_frames, read_image

__all__ = [
    "MedImage",
    "SUPPORTED_SUFFIXES",
    "is_probably_image",
    "read_dicom",
    "read_dicom_frames",
    "read_frames",
    "read_image",
    "read_nifti",
    "read_raster",
]
