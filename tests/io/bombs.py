"""Files that are small on disk and declare (or inflate to) huge images, made without holding them in memory.

Shared by the budget tests of tests/io, tests/serve and tests/gateway.
"""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

_ZEROS = bytes(1 << 20)


def image_header(rows: int, cols: int, study_uid: str | None = None) -> Dataset:
    """A 16-bit MONOCHROME2 Secondary Capture without its Pixel Data."""
    ds = Dataset()
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid or generate_uid(), generate_uid()
    ds.Modality, ds.PatientID = "OT", "BUDGET-TEST"
    ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = rows, cols, 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    return ds


def _zeros(n: int):
    while n:
        k = min(n, len(_ZEROS))
        yield _ZEROS[:k]
        n -= k


def deflated_dataset(ds: Dataset, pixel_bytes: int, trailing_zeros: int = 0) -> bytes:
    """``ds`` + a Pixel Data element of ``pixel_bytes`` zeros (+ a Trailing Padding element), deflated as streamed."""
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    z = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    out = [z.compress(buf.getvalue() + struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, pixel_bytes))]
    out += [z.compress(chunk) for chunk in _zeros(pixel_bytes)]
    if trailing_zeros:
        out.append(z.compress(struct.pack("<HH2sHL", 0xFFFC, 0xFFFC, b"OB", 0, trailing_zeros)))
        out += [z.compress(chunk) for chunk in _zeros(trailing_zeros)]
    out.append(z.flush())
    return b"".join(out)


def _part10(path: Path, ds: Dataset, transfer_syntax: str, body: bytes) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = transfer_syntax
    head = DicomBytesIO()
    write_file_meta_info(head, meta, enforce_standard=True)
    path.write_bytes(b"\x00" * 128 + b"DICM" + head.getvalue() + body)
    return path


def deflated_dicom(path: Path, rows: int, cols: int, pixel_bytes: int | None = None, trailing_zeros: int = 0,
                   study_uid: str | None = None) -> Path:
    """A Deflated Explicit VR Little Endian file of ``rows`` x ``cols`` zeros (or ``pixel_bytes`` of them)."""
    ds = image_header(rows, cols, study_uid)
    n = rows * cols * 2 if pixel_bytes is None else pixel_bytes
    return _part10(path, ds, DeflatedExplicitVRLittleEndian, deflated_dataset(ds, n, trailing_zeros))


def native_dicom(path: Path, rows: int, cols: int, pixel_bytes: bytes, study_uid: str | None = None) -> Path:
    """An Explicit VR Little Endian file whose Pixel Data is exactly ``pixel_bytes``."""
    ds = image_header(rows, cols, study_uid)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    element = struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, len(pixel_bytes))
    return _part10(path, ds, ExplicitVRLittleEndian, buf.getvalue() + element + pixel_bytes)


def png_of_zeros(path: Path, width: int, height: int) -> Path:
    """An 8-bit grayscale PNG of zeros, compressed row by row."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">L", len(data)) + kind + data + struct.pack(">L", zlib.crc32(kind + data) & 0xFFFFFFFF)

    z = zlib.compressobj(9)
    row = bytes(1 + width)  # filter type 0, then the row
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">LLBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", idat) + chunk(b"IEND", b""))
    return path
