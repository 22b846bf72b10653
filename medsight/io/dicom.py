"""DICOM reading: from a file on disk to display-ready :class:`MedImage` frames.

A DICOM pixel value is not a brightness. It has to go through the same chain a
PACS viewer applies before a model sees what a radiologist sees:

1. decode (native, JPEG, JPEG-LS, JPEG 2000, RLE; YCbCr is turned into RGB by
   the decoder pipeline of pydicom 3, so we never convert it a second time),
2. Modality LUT / Rescale Slope+Intercept (raw values -> e.g. Hounsfield units),
3. VOI LUT or Window Center/Width (the contrast the acquiring site chose),
4. MONOCHROME1 inversion (for those images low values are displayed white),
5. PALETTE COLOR lookup into RGB,

then scale to ``[0, 1]`` float32. Enhanced (multi-frame) objects keep their
rescale and window inside functional group sequences, so those are honoured
per frame too.

Every failure is mapped onto one :class:`~medsight.errors.ImageReadError`
subclass, because callers walking a folder of hospital exports need to know
*why* a file was skipped (empty, not DICOM, a structured report without
pixels, a truncated transfer, a codec we lack) rather than a stack trace.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space, get_decoder
from pydicom.pixels.utils import as_pixel_options, get_nr_frames
from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000, JPEG2000Lossless

from medsight.errors import (
    DecoderUnavailableError,
    EmptyFileError,
    ImageReadError,
    NoPixelDataError,
    NotAnImageError,
    TruncatedPixelDataError,
    UnsupportedImageError,
)
from medsight.io.budget import check_dicom
from medsight.io.deflate import dcmread
from medsight.io.image import MedImage

log = logging.getLogger(__name__)

#: Decoder plugin tried first per transfer syntax (pydicom's order otherwise: gdcm, pillow, pylibjpeg).
#: For JPEG 2000, Pillow's OpenJPEG is multi-threaded through OPJ_NUM_THREADS (below) and was the
#: faster decoder, with less CPU time in all (benchmarks/throughput, docs/performance.md). It gives
#: the same pixels as GDCM and pylibjpeg on every JPEG 2000 file of pydicom-data it can read; for any
#: file it cannot, the other plugins are tried in pydicom's order, so nothing becomes unreadable.
PREFERRED_PLUGIN = {JPEG2000Lossless: "pillow", JPEG2000: "pillow"}

# OpenJPEG (inside Pillow) decodes code-blocks in OPJ_NUM_THREADS threads; it reads the variable at
# every decode and defaults to one thread. Use the cores this process may run on, unless the user
# set it (e.g. to 1 where many decode threads already share the cores).
try:
    os.environ.setdefault("OPJ_NUM_THREADS", str(max(1, len(os.sched_getaffinity(0)))))
except AttributeError:  # pragma: no cover - not Linux
    os.environ.setdefault("OPJ_NUM_THREADS", str(os.cpu_count() or 1))

#: (7FE0,0010) Pixel Data, (7FE0,0008) Float Pixel Data, (7FE0,0009) Double Float Pixel Data
PIXEL_TAGS = (0x7FE00010, 0x7FE00008, 0x7FE00009)

# Elements that only a real DICOM data set has; used to tell a preamble-less
# DICOM file from arbitrary bytes that pydicom happily "parses" with force=True.
_DICOM_EVIDENCE = (0x00080016, 0x00080018, 0x00080060, 0x0020000D, 0x00280010, *PIXEL_TAGS)

# The grayscale pipeline elements a functional group may override per frame.
_PIPELINE_KEYWORDS = (
    "PhotometricInterpretation", "BitsStored", "PixelRepresentation",
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "VOILUTSequence", "WindowCenter", "WindowWidth", "VOILUTFunction",
)


def read_dicom(path: str | Path, frame: int | None = None) -> MedImage:
    """Read one frame (default: the middle one) of a DICOM file.

    Only the requested frame is decoded, so picking the key image of a
    120-frame ultrasound clip costs one JPEG decode, not 120. The middle frame
    is the default because for cine loops and multi-frame volumes it is the
    frame most likely to show the anatomy of interest.
    """
    ds = _open(path)
    with _malformed(path):
        n_frames = _frame_count(ds, path)
    index = n_frames // 2 if frame is None else frame
    if not 0 <= index < n_frames:
        raise IndexError(f"{path}: frame {frame} out of range, file has {n_frames} frame(s)")
    with _malformed(path):
        arr, photometric = _decode(ds, path, index)
        return _to_image(arr, ds, photometric, path, index, n_frames)


def read_dicom_frames(path: str | Path) -> list[MedImage]:
    """Read every frame of a DICOM file, each scaled on its own to ``[0, 1]``.

    Frames are scaled independently so that a frame read here is identical to
    the same frame read with :func:`read_dicom` (which decodes just one frame
    and cannot know the others' range).
    """
    ds = _open(path, all_frames=True)
    with _malformed(path):
        n_frames = _frame_count(ds, path)
        return [
            _to_image(arr, ds, photometric, path, i, n_frames)
            for i, (arr, photometric) in enumerate(_decode_frames(ds, path))
        ]


# --------------------------------------------------------------------------- opening


def _open(path: str | Path, all_frames: bool = False) -> Dataset:
    """Parse the file and make sure it holds decodable-looking pixel data within the pixel budget.

    ``force=True`` is only a fallback: with it pydicom will "parse" any bytes,
    so a forced read is accepted only when it produced elements a real data set
    has. Files that lack a (0002,0010) Transfer Syntax UID (no file meta) get
    one inferred from how the data set was actually encoded, which is only
    possible when the pixel data is not compressed. The budget
    (:mod:`medsight.io.budget`) is checked on the header, before any decoding;
    a deflated data set is checked before its pixels are even inflated.
    """
    path = Path(path)
    if path.stat().st_size == 0:
        raise EmptyFileError(path)
    try:
        ds = dcmread(path)
    except InvalidDicomError:
        ds = _force_read(path)
    except ImageReadError:
        raise
    except Exception as exc:  # corrupt header: pydicom raises many types
        raise NotAnImageError(path, f"DICOM header could not be parsed: {exc}") from exc

    if len(ds) == 0:
        # When a file ends inside an undefined-length element (in practice
        # encapsulated pixel data cut off in transfer) pydicom warns and
        # returns an empty data set; a complete file never has zero elements.
        raise TruncatedPixelDataError(path, "file ends before its data set does")
    if not any(tag in ds for tag in PIXEL_TAGS):
        sop = _text(ds, "SOPClassUID") or _text(ds.file_meta, "MediaStorageSOPClassUID")
        raise NoPixelDataError(path, f"SOP class {UID(sop).name}" if sop else None)
    with _malformed(path):
        _ensure_transfer_syntax(ds, path)
        check_dicom(ds, path, all_frames=all_frames)
    return ds


@contextmanager
def _malformed(path: str | Path) -> Iterator[None]:
    """pydicom converts header values lazily, on first access, so a corrupt
    element can raise almost anything far from the parse; report it as what
    it is instead of letting a bare exception escape a folder walk."""
    try:
        yield
    except ImageReadError:
        raise
    except Exception as exc:
        raise UnsupportedImageError(path, f"malformed DICOM: {type(exc).__name__}: {_first_line(str(exc))}") from exc


def _force_read(path: Path) -> Dataset:
    try:
        ds = dcmread(path, force=True)
    except ImageReadError:
        raise
    except Exception as exc:
        raise NotAnImageError(path, "no DICOM preamble and content does not parse as DICOM") from exc
    if not any(tag in ds for tag in _DICOM_EVIDENCE):
        raise NotAnImageError(path, "no DICOM preamble and content does not parse as DICOM")
    return ds


def _ensure_transfer_syntax(ds: Dataset, path: Path) -> None:
    if getattr(ds, "file_meta", None) is None:
        ds.file_meta = FileMetaDataset()
    if ds.file_meta.get("TransferSyntaxUID"):
        return
    tag = next(t for t in PIXEL_TAGS if t in ds)
    if ds[tag].is_undefined_length:
        raise DecoderUnavailableError(path, "compressed pixel data but no (0002,0010) Transfer Syntax UID")
    implicit, little = ds.original_encoding
    if implicit is None or little is None:
        implicit, little = True, True
    ds.file_meta.TransferSyntaxUID = (
        ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian if little else ExplicitVRBigEndian
    )


def _frame_count(ds: Dataset, path: str | Path) -> int:
    try:
        return max(1, int(get_nr_frames(ds, warn=False)))
    except (TypeError, ValueError) as exc:
        raise UnsupportedImageError(path, f"invalid (0028,0008) Number of Frames: {exc}") from exc


# --------------------------------------------------------------------------- decoding


def _decode(ds: Dataset, path: str | Path, index: int) -> tuple[np.ndarray, str]:
    """Decode one frame; return it and its photometric interpretation *after* decoding.

    pydicom 3 converts YBR_FULL/YBR_FULL_422 to RGB and JPEG 2000 decoders undo
    YBR_ICT/YBR_RCT themselves; the returned interpretation tells us which of
    those happened, which is how double conversion is avoided.
    """
    decoder, ts_name = _decoder(ds, path)
    plugin = PREFERRED_PLUGIN.get(ds.file_meta.TransferSyntaxUID)
    if plugin in getattr(decoder, "available_plugins", ()):
        try:
            arr, props = decoder.as_array(ds, index=index, validate=True, raw=False, decoding_plugin=plugin, **as_pixel_options(ds))
            return np.asarray(arr), _photometric(ds, props)
        except Exception as exc:  # any plugin failure: let every plugin try, as pydicom does, and report that
            log.debug("%s: %s plugin failed (%s); trying all plugins", path, plugin, _first_line(str(exc)))
    with _decode_errors(path, ts_name):
        arr, props = decoder.as_array(ds, index=index, validate=True, raw=False, **as_pixel_options(ds))
    return np.asarray(arr), _photometric(ds, props)


def _decode_frames(ds: Dataset, path: str | Path) -> Iterator[tuple[np.ndarray, str]]:
    """Decode frame after frame, so memory holds one decoded frame, not the whole clip.

    (Decoding a 120-frame YBR ultrasound clip in one go costs ~1 GB of
    temporaries for the colour conversion alone.)
    """
    decoder, ts_name = _decoder(ds, path)
    with _decode_errors(path, ts_name):
        for arr, props in decoder.iter_array(ds, validate=True, raw=False, **as_pixel_options(ds)):
            yield np.asarray(arr), _photometric(ds, props)


def _decoder(ds: Dataset, path: str | Path) -> tuple[Any, str]:
    tsyntax = ds.file_meta.TransferSyntaxUID
    ts_name = f"{tsyntax.name} ({tsyntax})" if tsyntax.is_valid else str(tsyntax)
    spp = ds.get("SamplesPerPixel", 1)
    if spp not in (1, 3):
        raise UnsupportedImageError(path, f"SamplesPerPixel={spp}, only 1 or 3 are supported")
    try:
        return get_decoder(tsyntax), ts_name
    except NotImplementedError as exc:
        raise DecoderUnavailableError(path, f"transfer syntax {ts_name} is not supported by pydicom") from exc


def _photometric(ds: Dataset, props: dict[str, Any]) -> str:
    return str(props.get("photometric_interpretation") or ds.get("PhotometricInterpretation", ""))


@contextmanager
def _decode_errors(path: str | Path, ts_name: str) -> Iterator[None]:
    """Translate pydicom's decoding exceptions into our specific error classes."""
    try:
        yield
    except RuntimeError as exc:
        msg = str(exc)
        if "missing dependencies" in msg:
            raise DecoderUnavailableError(path, f"{ts_name}: {_first_line(msg)}") from exc
        if re.search(r"truncat|too short|insufficient|end of (the )?(file|stream|data)", msg, re.I):
            raise TruncatedPixelDataError(path, f"{ts_name}: {_squash(msg)}") from exc
        raise UnsupportedImageError(path, f"installed decoders failed on {ts_name} data: {_squash(msg)}") from exc
    except ValueError as exc:
        if "less than expected" in str(exc):
            raise TruncatedPixelDataError(path, _first_line(str(exc))) from exc
        raise UnsupportedImageError(path, _first_line(str(exc))) from exc
    except (AttributeError, KeyError, TypeError, IndexError, NotImplementedError) as exc:
        raise UnsupportedImageError(path, f"{type(exc).__name__}: {_first_line(str(exc))}") from exc


def _first_line(msg: str) -> str:
    return msg.strip().splitlines()[0] if msg.strip() else msg


def _squash(msg: str) -> str:
    return " | ".join(line.strip() for line in msg.splitlines() if line.strip())


# --------------------------------------------------------------------------- pixels


def _to_image(arr: np.ndarray, ds: Dataset, photometric: str, path: str | Path, index: int, n_frames: int) -> MedImage:
    """Turn one decoded frame (H, W) or (H, W, 3) into a display-ready MedImage."""
    if arr.ndim == 3 and arr.shape[-1] == 3:
        pixels = _color_to_unit(arr, ds, photometric, path)
    elif arr.ndim == 2:
        if photometric == "PALETTE COLOR":
            pixels = _palette_to_unit(arr, ds, path)
        else:
            pixels = _gray_to_unit(arr, _frame_view(ds, index), photometric)
    else:
        raise UnsupportedImageError(path, f"decoded frame has shape {arr.shape}, expected (rows, columns[, 3])")
    return MedImage(pixels.astype(np.float32), _meta(ds, path, index, n_frames))


def _color_to_unit(arr: np.ndarray, ds: Dataset, photometric: str, path: str | Path) -> np.ndarray:
    if photometric.startswith("YBR_FULL"):  # only if a decoder left it in YCbCr
        arr = convert_color_space(arr, photometric, "RGB")
    elif photometric != "RGB":
        raise UnsupportedImageError(path, f"3-sample photometric interpretation {photometric!r}")
    bits = int(ds.get("BitsStored") or arr.dtype.itemsize * 8)
    if arr.dtype.kind == "f":
        return _minmax(arr)
    return np.clip(arr.astype(np.float64) / float(2**bits - 1), 0.0, 1.0)


def _palette_to_unit(arr: np.ndarray, ds: Dataset, path: str | Path) -> np.ndarray:
    """Look indices up in the palette; scale by the largest entry the LUT can hold.

    The bit depth is taken from the LUT contents, not only its descriptor,
    because a known vendor quirk stores 8-bit values in a 16-bit LUT.
    """
    try:
        rgb = apply_color_lut(arr, ds)[..., :3]
        desc = ds.RedPaletteColorLookupTableDescriptor
        first, n = int(desc[1]), int(desc[0]) or 2**16
        table = apply_color_lut(np.arange(first, first + n), ds)[..., :3]
    except (ValueError, AttributeError, TypeError, IndexError, KeyError) as exc:
        raise UnsupportedImageError(path, f"palette colour lookup table unusable: {exc}") from exc
    top = 255.0 if table.max() <= 255 else 65535.0
    return np.clip(rgb.astype(np.float64) / top, 0.0, 1.0)


def _gray_to_unit(arr: np.ndarray, view: Dataset, photometric: str) -> np.ndarray:
    """Modality LUT, then VOI (LUT, else window, else min-max), then MONOCHROME1 inversion."""
    try:
        values = arr if arr.dtype.kind == "f" else apply_modality_lut(arr, view)
        unit = _voi_to_unit(values, view)
    except (ValueError, TypeError, AttributeError, KeyError, IndexError):
        # A malformed Modality LUT or rescale: a window defined in rescaled
        # units would be meaningless on raw values, so show the stored range.
        values, unit = arr, None
    if unit is None:
        unit = _minmax(values)
    if photometric == "MONOCHROME1":
        unit = 1.0 - unit
    return unit


def _voi_to_unit(values: np.ndarray, view: Dataset) -> np.ndarray | None:
    """Apply the VOI transform and map its *output range* (not the image's) to [0, 1].

    Scaling by the output range keeps the chosen window meaningful: a dark
    image stays dark instead of being stretched. Returns ``None`` when the
    file carries no usable VOI, so the caller falls back to min-max.
    """
    if view.get("VOILUTSequence"):
        try:
            item = view.VOILUTSequence[0]
            n, first = int(item.LUTDescriptor[0]) or 2**16, int(item.LUTDescriptor[1])
            ints = np.rint(values).astype(np.int64)
            out = apply_voi_lut(ints, view, prefer_lut=True).astype(np.float64)
            table = apply_voi_lut(np.arange(first, first + n), view, prefer_lut=True)
            return _scale(out, float(table.min()), float(table.max()))
        except (ValueError, TypeError, AttributeError, KeyError, IndexError, NotImplementedError):
            pass
    if view.get("WindowCenter") is not None and view.get("WindowWidth") is not None:
        try:
            with np.errstate(over="ignore"):
                out = apply_voi_lut(np.asarray(values, dtype=np.float64), view, prefer_lut=False)
                lo, hi = apply_voi_lut(np.array([-1e300, 1e300]), view, prefer_lut=False)
            return _scale(out, float(lo), float(hi))
        except (ValueError, TypeError, AttributeError, KeyError, IndexError):
            return None
    return None


def _scale(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi == lo or not np.isfinite(hi - lo):
        return np.zeros(x.shape, dtype=np.float64)
    return np.clip((np.asarray(x, dtype=np.float64) - lo) / (hi - lo), 0.0, 1.0)


def _minmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    finite = np.isfinite(x)
    if not finite.any():
        return np.zeros(x.shape, dtype=np.float64)
    x = np.where(finite, x, np.nan)
    return np.nan_to_num(_scale(x, float(np.nanmin(x)), float(np.nanmax(x))), nan=0.0)


def _frame_view(ds: Dataset, index: int) -> Dataset:
    """The data set as the grayscale pipeline should see it for frame ``index``.

    Enhanced multi-frame objects (enhanced CT/MR, ...) put Rescale and Window
    in Shared/Per-frame Functional Group sequences, where pydicom's
    ``apply_modality_lut``/``apply_voi_lut`` do not look; copy them up.
    """
    groups = []
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        groups.append(shared[0])
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        groups.append(per_frame[index])
    overrides = [
        elem
        for group in groups
        for seq in ("PixelValueTransformationSequence", "FrameVOILUTSequence")
        if group.get(seq)
        for elem in group[seq][0]
        if elem.keyword in _PIPELINE_KEYWORDS
    ]
    if not overrides:
        return ds
    view = Dataset()
    view.file_meta = ds.file_meta
    for keyword in _PIPELINE_KEYWORDS:
        if keyword in ds:
            view.add(ds[keyword])
    for elem in overrides:
        view.add(elem)
    return view


# --------------------------------------------------------------------------- metadata


def _meta(ds: Dataset, path: str | Path, index: int, n_frames: int) -> dict[str, Any]:
    """Technical and study identifiers only: no patient name, ID or birth date."""
    return {
        "source": str(path),
        "format": "dicom",
        "modality": _text(ds, "Modality"),
        "body_part": _text(ds, "BodyPartExamined"),
        "study_instance_uid": _text(ds, "StudyInstanceUID"),
        "series_instance_uid": _text(ds, "SeriesInstanceUID"),
        "sop_instance_uid": _text(ds, "SOPInstanceUID"),
        "sop_class_uid": _text(ds, "SOPClassUID"),
        "patient_sex": _text(ds, "PatientSex"),
        "patient_age": parse_age(_text(ds, "PatientAge")),
        "photometric_interpretation": _text(ds, "PhotometricInterpretation"),
        "n_frames": n_frames,
        "frame_index": index,
        "rows": _int(ds, "Rows"),
        "columns": _int(ds, "Columns"),
        "transfer_syntax_uid": _text(ds.file_meta, "TransferSyntaxUID"),
    }


def _text(ds: Dataset, keyword: str) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception:  # a malformed value must not make the image unreadable
        return None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _int(ds: Dataset, keyword: str) -> int | None:
    try:
        return int(ds.get(keyword))
    except Exception:
        return None


_AGE = re.compile(r"^\s*(\d{1,3})\s*([DWMY]?)\s*$", re.I)
_PER_YEAR = {"D": 365, "W": 52, "M": 12, "Y": 1, "": 1}


def parse_age(value: str | None) -> int | None:
    """DICOM Age String ("045Y", "006M", "012W", "003D") to whole years, else ``None``."""
    match = _AGE.match(value or "")
    if not match:
        return None
    return int(match.group(1)) // _PER_YEAR[match.group(2).upper()]


__all__ = ["read_dicom", "read_dicom_frames", "parse_age", "PIXEL_TAGS"]
