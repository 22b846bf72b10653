"""One entry point for any supported file: decide the format from its bytes.

Hospital exports are full of misleading names: DICOM files without suffix
or named after their UID ("1.2.840.113619.2.55.3.2831"), PNGs saved as
".dcm", JPEGs called ".jpg.dcm". So the first bytes decide; the suffix is only
a tie-breaker for formats without a reliable signature (preamble-less DICOM,
gzip-compressed NIfTI).
"""

from __future__ import annotations

from pathlib import Path

from medsight.errors import EmptyFileError, ImageNotFoundError, NotAnImageError
from medsight.io.image import MedImage

SUPPORTED_SUFFIXES: tuple[str, ...] = (
    ".dcm", ".dicom", ".dic",
    ".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp",
    ".nii", ".nii.gz",
)

_RASTER_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"BM")
_GZIP_MAGIC = b"\x1f\x8b"
_DICOM_SUFFIXES = (".dcm", ".dicom", ".dic")
_NIFTI_SUFFIXES = (".nii", ".nii.gz")


def sniff(path: str | Path) -> str:
    """Return "dicom", "raster", "nifti" or "unknown" from content, then suffix."""
    path = Path(path)
    if not path.is_file():
        raise ImageNotFoundError(path)
    with open(path, "rb") as fh:
        head = fh.read(348)
    if not head:
        raise EmptyFileError(path)
    name = path.name.lower()
    if head[128:132] == b"DICM":
        return "dicom"
    if head.startswith(_RASTER_MAGIC):
        return "raster"
    if _is_nifti_header(head) or (head.startswith(_GZIP_MAGIC) and name.endswith(".nii.gz")):
        return "nifti"
    if name.endswith(_DICOM_SUFFIXES):
        return "dicom"  # preamble-less DICOM; the reader checks the content
    if name.endswith(_NIFTI_SUFFIXES):
        return "nifti"
    return "unknown"


def _is_nifti_header(head: bytes) -> bool:
    """Uncompressed NIfTI-1 (magic at 344) or NIfTI-2 (magic at 4)."""
    return head[344:348] in (b"n+1\x00", b"ni1\x00") or head[4:8] in (b"n+2\x00", b"ni2\x00")


def read_image(path: str | Path, frame: int | None = None) -> MedImage:
    """Read any supported file as one 2-D image.

    ``frame`` picks a DICOM frame or a NIfTI slice (``None``: the middle one);
    raster files have a single image, so only ``None`` or ``0`` is valid.
    Files of unknown type get one last chance as preamble-less DICOM (old
    modalities and some PACS exports write no preamble), then raise
    :class:`~medsight.errors.NotAnImageError`.
    """
    # each reader is imported when its format is met: a folder of JPEGs never loads pydicom or nibabel
    kind = sniff(path)
    if kind == "raster":
        from medsight.io.raster import read_raster

        if frame not in (None, 0):
            raise IndexError(f"{path}: frame {frame} out of range, file has 1 frame")
        return read_raster(path)
    if kind == "nifti":
        from medsight.io.nifti import read_nifti

        return read_nifti(path, frame)
    from medsight.io.dicom import read_dicom

    if kind == "dicom":
        return read_dicom(path, frame)
    if Path(path).name.lower().endswith(".gz"):
        raise NotAnImageError(path, "gzip-compressed file that is not .nii.gz")
    try:
        return read_dicom(path, frame)
    except NotAnImageError:
        raise NotAnImageError(path) from None


def read_frames(path: str | Path) -> list[MedImage]:
    """Every frame of a DICOM file; a one-element list for any other format."""
    from medsight.io.dicom import read_dicom_frames

    kind = sniff(path)
    if kind == "dicom":
        return read_dicom_frames(path)
    if kind == "unknown" and not Path(path).name.lower().endswith(".gz"):
        try:
            return read_dicom_frames(path)
        except NotAnImageError:
            raise NotAnImageError(path) from None
    return [read_image(path)]


def is_probably_image(path: str | Path) -> bool:
    """Cheap filter for folder walking: worth handing this file to :func:`read_image`?

    True for a supported suffix, and for suffix-less or UID-named files
    ("1.2.840.10008.5.1.4") that carry the DICOM "DICM" marker at byte 128.
    Skipped: hidden files (macOS leaves "._name.dcm" metadata twins next to
    every file copied from its disks) and DICOMDIR, the media index that the
    standard requires under exactly that name and that never holds pixels.
    """
    path = Path(path)
    name = path.name.lower()
    if name.startswith(".") or name == "dicomdir" or not path.is_file():
        return False
    if name.endswith(SUPPORTED_SUFFIXES):
        return True
    if path.suffix == "" or path.suffix[1:].isdigit():
        try:
            with open(path, "rb") as fh:
                fh.seek(128)
                return fh.read(4) == b"DICM"
        except OSError:
            return False
    return False
