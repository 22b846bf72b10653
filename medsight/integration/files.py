"""Writing DICOM files so that a crash or a full disk never leaves half a file behind."""

from __future__ import annotations

import io
import os
import tempfile
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian


def ensure_file_meta(ds: Dataset) -> None:
    """Give a data set read without a File Meta header (or received over the network) a valid one.

    The transfer syntax is taken from how the data set was encoded, which is
    what keeps encapsulated (compressed) pixel data bytes valid on write.
    """
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    if not meta.get("TransferSyntaxUID"):
        implicit, little = ds.original_encoding
        if implicit is None or little is None:
            implicit, little = True, True
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    if "SOPClassUID" in ds:
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def encode_part10(ds: Dataset) -> bytes:
    """The data set as a DICOM Part 10 file (preamble, File Meta, data set) in memory."""
    ensure_file_meta(ds)
    buf = io.BytesIO()
    complete = "SOPClassUID" in ds and "SOPInstanceUID" in ds
    ds.save_as(buf, enforce_file_format=complete)
    return buf.getvalue()


def atomic_write_bytes(data: bytes, path: str | Path) -> Path:
    """Write to a temporary file in the target folder, fsync, then rename over ``path``.

    ``os.replace`` within one file system is atomic: readers see either the
    old file or the complete new one, never a partial write.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".partial-", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_dataset(ds: Dataset, path: str | Path) -> Path:
    return atomic_write_bytes(encode_part10(ds), path)


__all__ = ["ensure_file_meta", "encode_part10", "atomic_write_bytes", "atomic_write_dataset"]
