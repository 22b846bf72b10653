"""Deflated Explicit VR Little Endian, inflated in chunks and never past what its header declares.

pydicom inflates a deflated data set in one call, so a 280 KB file of zeros is 288 MB in memory
before anything can look at it. Here the data set is inflated on demand: first only as far as
the Pixel Data element, so the header can be checked against the pixel budget
(:mod:`medsight.io.budget`), then at most as far as that header declares (plus room for
trailing elements), and never past the budget's byte cap.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from medsight.errors import ImageReadError, ImageTooLargeError, OverlongPixelDataError
from medsight.io.budget import ImageBudget, Source, check_dicom, current_budget, expected_pixel_bytes

_IN_CHUNK = 1 << 16
_OUT_CHUNK = 1 << 20
#: Elements after Pixel Data (e.g. Data Set Trailing Padding) may add this much to what the header declares.
TRAILING_BYTES = 1 << 20
#: (7FE0,0010) Pixel Data, (7FE0,0008) Float Pixel Data, (7FE0,0009) Double Float Pixel Data
_PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)
_UNDEFINED = 0xFFFFFFFF


class InflatingReader(io.RawIOBase):
    """A seekable view of a raw deflate stream, inflated only as far as it is read, up to ``limit`` bytes."""

    def __init__(self, source: BinaryIO, limit: int, refusal: Callable[[int], ImageReadError]):
        super().__init__()
        self._source, self.limit, self._refusal = source, limit, refusal
        self._z = zlib.decompressobj(-zlib.MAX_WBITS)
        self._buf = bytearray()
        self._pos = 0
        self._done = False

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        if whence == io.SEEK_END:
            self._fill(None)
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._buf)}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos

    def read(self, size: int | None = -1) -> bytes:
        end = None if size is None or size < 0 else self._pos + size
        self._fill(end)
        data = bytes(self._buf[self._pos:end])
        self._pos += len(data)
        return data

    def readinto(self, b) -> int:  # noqa: ANN001 - any writable buffer
        data = self.read(len(b))
        b[: len(data)] = data
        return len(data)

    def getbuffer(self) -> memoryview:
        """Everything the stream inflates to (within the limit), as :class:`io.BytesIO` offers it."""
        self._fill(None)
        return memoryview(self._buf)

    def _fill(self, upto: int | None) -> None:
        while not self._done and (upto is None or len(self._buf) < upto):
            data = self._z.unconsumed_tail or self._source.read(_IN_CHUNK)
            if not data:
                self._buf += self._z.flush()
                self._done = True
            else:
                want = _OUT_CHUNK if upto is None else max(upto - len(self._buf), _OUT_CHUNK)
                self._buf += self._z.decompress(data, min(want, self.limit + 1 - len(self._buf)))
                self._done = self._z.eof
            if len(self._buf) > self.limit:
                raise self._refusal(self.limit)


def open_deflated(source: BinaryIO, where: Source = None, budget: ImageBudget | None = None) -> InflatingReader:
    """The inflated data set that follows in ``source``, rewound to its start, its header already checked.

    Raises :class:`~medsight.errors.ImageTooLargeError` when a frame is over the budget or the
    data set would inflate past the byte cap, and :class:`~medsight.errors.OverlongPixelDataError`
    when Pixel Data declares more bytes than its rows, columns and frames need.
    """
    from pydicom.filereader import read_dataset

    budget = budget or current_budget()
    stream = InflatingReader(source, budget.max_bytes, lambda n: ImageTooLargeError(
        where, f"the deflated data set inflates past {n:,} bytes, the limit (16 x max_pixels)"))
    header = read_dataset(stream, is_implicit_VR=False, is_little_endian=True, stop_when=_at_pixels)
    start = stream.tell()
    length = _pixel_length(stream)
    if length is not None:
        check_dicom(header, where, pixel_length=None if length == _UNDEFINED else length, budget=budget)
        expected = expected_pixel_bytes(header)
        if expected is not None:
            budget.check_bytes(expected, "the declared pixel data", where)
        if length != _UNDEFINED:
            declared = start + 12 + length + TRAILING_BYTES
            if declared < stream.limit:
                stream.limit = declared
                stream._refusal = lambda n: OverlongPixelDataError(
                    where, f"the deflated data set inflates past the {n:,} bytes its header declares")
    stream.seek(0)
    return stream


def _at_pixels(tag, vr, length) -> bool:  # noqa: ANN001 - pydicom's stop_when signature
    return int(tag) in _PIXEL_TAGS


def _pixel_length(stream: InflatingReader) -> int | None:
    """Value length of the pixel element at the stream's position (explicit VR, little endian), or ``None``."""
    at = stream.tell()
    head = stream.read(12)
    stream.seek(at)
    if len(head) < 12:
        return None
    group, element = struct.unpack("<HH", head[:4])
    if (group << 16 | element) not in _PIXEL_TAGS:
        return None
    return struct.unpack("<L", head[8:12])[0]


def dcmread(path: str | Path, *, force: bool = False, stop_before_pixels: bool = False):  # noqa: ANN201 - FileDataset
    """:func:`pydicom.dcmread`, except that a deflated data set is inflated through :func:`open_deflated`."""
    import pydicom
    from pydicom.dataset import FileDataset
    from pydicom.filereader import _read_file_meta_info, read_dataset, read_preamble
    from pydicom.uid import DeflatedExplicitVRLittleEndian

    with open(path, "rb") as fh:
        try:
            preamble = read_preamble(fh, force)
            file_meta = _read_file_meta_info(fh)
        except Exception:  # no preamble, bad meta: pydicom decides, with its own errors
            file_meta = None
        if file_meta is None or file_meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
            fh.seek(0)
            return pydicom.dcmread(fh, force=force, stop_before_pixels=stop_before_pixels)
        stream = open_deflated(fh, path)
        dataset = read_dataset(stream, is_implicit_VR=False, is_little_endian=True,
                               stop_when=_at_pixels if stop_before_pixels else None)
    ds = FileDataset(str(path), dataset, preamble, file_meta, is_implicit_VR=False, is_little_endian=True)
    ds.set_original_encoding(False, True, dataset._character_set)
    return ds


__all__ = ["InflatingReader", "open_deflated", "dcmread", "TRAILING_BYTES"]
