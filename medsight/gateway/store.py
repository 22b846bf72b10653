"""Received instances: validate, store atomically under a content-addressed path, group by study.

:meth:`InstanceStore.ingest` is the one function that turns bytes received
over the network into a stored file or a DIMSE status; it is pure apart from
the file writes, which is what lets the fuzz tests hammer it directly.

Layout under ``data_dir``::

    instances/<sha256[:2]>/<sha256>.dcm       the Part 10 files, named by content
    studies/<StudyInstanceUID>/<SOPInstanceUID>.json   index: which file holds that instance

An instance file is written (temp file + ``os.replace``) before its index
entry, so a crash can leave at most an unreferenced file, never an index
entry pointing at half a file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.filereader import read_dataset
from pydicom.uid import UID

from medsight.integration.files import atomic_write_bytes, encode_part10
from medsight.errors import ImageTooLargeError, MedSightError
from medsight.io.budget import check_dicom
from medsight.io.deflate import open_deflated

log = logging.getLogger("medsight.gateway.store")

# DIMSE status codes (PS3.7 Annex C and C.4.2.1.4 for C-STORE).
SUCCESS = 0x0000
DUPLICATE_SOP_INSTANCE = 0x0111  # same SOP Instance UID, different content
NOT_AUTHORIZED = 0x0124  # refused by policy (burned-in annotation when de-identifying on arrival)
OUT_OF_RESOURCES = 0xA700
DOES_NOT_MATCH_SOP_CLASS = 0xA900
CANNOT_UNDERSTAND = 0xC210

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
MAX_INSTANCE_BYTES = 1 << 31


@dataclass
class StoreResult:
    status: int
    reason: str
    study_uid: str | None = None
    sop_instance_uid: str | None = None
    path: Path | None = None
    duplicate: bool = False

    @property
    def ok(self) -> bool:
        return self.status == SUCCESS


def valid_uid(value: object) -> bool:
    text = str(value or "")
    return 0 < len(text) <= 64 and bool(_UID.match(text))


def decode_dataset(raw: bytes, transfer_syntax: str) -> Dataset:
    """Decode a data set as received in P-DATA (no preamble, no File Meta) and force every value.

    pydicom converts values lazily; touching every element here means a
    corrupt value fails now, with a status, instead of later inside analysis.
    The pixel budget (:mod:`medsight.io.budget`) is checked on the header: a deflated
    data set is inflated in chunks, its pixels only once its header has passed.
    """
    ts = UID(transfer_syntax)
    fp: io.BytesIO = io.BytesIO(raw)
    if ts.is_deflated:
        fp = open_deflated(fp)
    ds = read_dataset(fp, is_implicit_VR=ts.is_implicit_VR, is_little_endian=ts.is_little_endian)
    if fp.tell() < len(fp.getbuffer()):
        raise ValueError(f"{len(fp.getbuffer()) - fp.tell()} trailing bytes after the data set")
    for elem in ds._dict.values():  # pydicom silently returns a short value when the bytes run out
        length, value = getattr(elem, "length", None), getattr(elem, "value", None)
        if isinstance(value, bytes) and length is not None and length != 0xFFFFFFFF and len(value) < length:
            raise ValueError(f"element {elem.tag} declares {length} bytes but only {len(value)} were received")
    for _ in ds.iterall():
        pass
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ts
    ds.set_original_encoding(ts.is_implicit_VR, ts.is_little_endian)
    check_dicom(ds)
    return ds


def check_pixel_data(ds: Dataset) -> str | None:
    """Why this image's pixel data is unusable, or ``None``."""
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        return "no pixel data"
    if "PixelData" not in ds:
        return None
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
        spp, bits = int(ds.get("SamplesPerPixel", 1)), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except (AttributeError, TypeError, ValueError) as exc:
        return f"image pixel description incomplete ({type(exc).__name__}: {exc})"
    if min(rows, cols, spp, bits, frames) <= 0:
        return "Rows, Columns, Samples per Pixel, Bits Allocated and Number of Frames must be positive"
    data = ds.PixelData
    if ds["PixelData"].is_undefined_length or ds.file_meta.TransferSyntaxUID.is_encapsulated:
        try:
            n = sum(1 for _ in generate_frames(data, number_of_frames=frames))
        except Exception as exc:
            return f"encapsulated pixel data is malformed ({type(exc).__name__}: {exc})"
        return None if n >= 1 else "encapsulated pixel data holds no frame"
    expected = rows * cols * spp * frames * bits // 8 if bits != 1 else (rows * cols * spp * frames + 7) // 8
    if len(data) < expected:
        return f"pixel data is truncated: {len(data)} bytes, header declares {expected}"
    return None


@dataclass
class _Study:
    uid: str
    instances: dict[str, Path] = field(default_factory=dict)
    last_activity: float = field(default_factory=time.monotonic)
    calling_aets: set[str] = field(default_factory=set)
    dirty: bool = True  # new instances since the last completion callback


class InstanceStore:
    """Thread-safe store for one listener; also tracks which studies are still receiving."""

    def __init__(self, data_dir: str | Path, deid=None, max_instance_bytes: int = MAX_INSTANCE_BYTES):
        self.root = Path(data_dir)
        self.instances_dir = self.root / "instances"
        self.studies_dir = self.root / "studies"
        self.deid = deid
        self.max_instance_bytes = max_instance_bytes
        self._lock = threading.Lock()
        self._studies: dict[str, _Study] = {}
        self._load_index()

    # -- ingest -------------------------------------------------------------
    def ingest(self, raw: bytes, transfer_syntax: str, sop_class_uid: str | None = None,
               sop_instance_uid: str | None = None, calling_aet: str = "") -> StoreResult:
        """Validate and store one received instance; never raises, always returns a DIMSE status."""
        try:
            return self._ingest(raw, transfer_syntax, sop_class_uid, sop_instance_uid, calling_aet)
        except OSError as exc:
            return StoreResult(OUT_OF_RESOURCES, f"cannot store: {exc.strerror or exc}")
        except MemoryError:
            return StoreResult(OUT_OF_RESOURCES, "out of memory while storing")

    def _ingest(self, raw: bytes, ts: str, sop_class: str | None, sop_instance: str | None, calling_aet: str) -> StoreResult:
        if len(raw) > self.max_instance_bytes:
            return StoreResult(OUT_OF_RESOURCES, f"instance of {len(raw)} bytes exceeds the {self.max_instance_bytes}-byte limit")
        try:
            ds = decode_dataset(raw, ts)
        except ImageTooLargeError as exc:
            return StoreResult(OUT_OF_RESOURCES, str(exc))
        except Exception as exc:  # any decoding failure of untrusted bytes is "cannot understand"
            return StoreResult(CANNOT_UNDERSTAND, f"data set cannot be decoded with {ts}: {type(exc).__name__}: {_short(exc)}")
        try:
            problem = self._check(ds, sop_class, sop_instance)
        except Exception as exc:
            return StoreResult(CANNOT_UNDERSTAND, f"data set values unusable: {type(exc).__name__}: {_short(exc)}")
        if problem:
            return StoreResult(DOES_NOT_MATCH_SOP_CLASS, problem, str(ds.get("StudyInstanceUID", "")) or None)
        if self.deid is not None:
            from medsight.integration.deid import deidentify_dataset
            from medsight.errors import BurnedInAnnotationError

            try:
                ds = deidentify_dataset(ds, self.deid, inplace=True)
            except BurnedInAnnotationError as exc:
                return StoreResult(NOT_AUTHORIZED, str(exc))
            except MedSightError as exc:
                return StoreResult(CANNOT_UNDERSTAND, f"de-identification failed: {exc}")
        try:
            data = encode_part10(ds)
        except Exception as exc:
            return StoreResult(CANNOT_UNDERSTAND, f"data set cannot be re-encoded: {type(exc).__name__}: {_short(exc)}")
        study, sop = str(ds.StudyInstanceUID), str(ds.SOPInstanceUID)
        digest = hashlib.sha256(data).hexdigest()
        with self._lock:
            existing = self._existing(study, sop)
            if existing is not None:
                if existing == digest:
                    self._touch(study, calling_aet, changed=False)
                    return StoreResult(SUCCESS, "duplicate of a stored instance (not stored again)", study, sop,
                                       self._instance_path(digest), duplicate=True)
                return StoreResult(DUPLICATE_SOP_INSTANCE, "an instance with this SOP Instance UID but other content is already stored", study, sop)
            path = self._instance_path(digest)
            if not path.exists():
                atomic_write_bytes(data, path)
            atomic_write_bytes(json.dumps({"sha256": digest, "sop_class_uid": str(ds.SOPClassUID),
                                           "series_instance_uid": str(ds.get("SeriesInstanceUID", "")),
                                           "received": time.time()}).encode(),
                               self.studies_dir / study / f"{sop}.json")
            st = self._touch(study, calling_aet, changed=True)
            st.instances[sop] = path
        return StoreResult(SUCCESS, "stored", study, sop, path)

    @staticmethod
    def _check(ds: Dataset, sop_class: str | None, sop_instance: str | None) -> str | None:
        for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"):
            if not valid_uid(ds.get(kw)):
                return f"{kw} is missing or not a valid UID"
        if sop_class and str(ds.SOPClassUID) != sop_class:
            return f"SOP Class UID {ds.SOPClassUID} differs from the one in the C-STORE request ({sop_class})"
        if sop_instance and str(ds.SOPInstanceUID) != sop_instance:
            return "SOP Instance UID differs from the one in the C-STORE request"
        return check_pixel_data(ds)

    # -- study tracking -----------------------------------------------------
    def _instance_path(self, digest: str) -> Path:
        return self.instances_dir / digest[:2] / f"{digest}.dcm"

    def _existing(self, study: str, sop: str) -> str | None:
        entry = self.studies_dir / study / f"{sop}.json"
        if not entry.exists():
            return None
        try:
            return json.loads(entry.read_text())["sha256"]
        except (OSError, ValueError, KeyError):
            return None

    def _touch(self, study: str, calling_aet: str, changed: bool) -> _Study:
        st = self._studies.setdefault(study, _Study(study))
        st.last_activity = time.monotonic()
        if calling_aet:
            st.calling_aets.add(calling_aet)
        st.dirty = st.dirty or changed
        return st

    def _load_index(self) -> None:
        """After a restart, studies that never got their completion callback are pending again."""
        if not self.studies_dir.is_dir():
            return
        for folder in self.studies_dir.iterdir():
            if not folder.is_dir():
                continue
            st = _Study(folder.name, dirty=not (folder / "complete.json").exists())
            for entry in folder.glob("*.json"):
                if entry.name == "complete.json":
                    continue
                try:
                    path = self._instance_path(json.loads(entry.read_text())["sha256"])
                except (OSError, ValueError, KeyError):
                    log.warning("ignoring unreadable index entry %s", entry)
                    continue
                if path.exists():  # a missing file was released after hand-off (files are written before entries)
                    st.instances[entry.stem] = path
            self._studies[folder.name] = st

    def due_studies(self, idle_timeout: float, now: float | None = None) -> list[_Study]:
        """Studies with new instances and no activity for ``idle_timeout`` seconds; marks them clean."""
        now = time.monotonic() if now is None else now
        with self._lock:
            due = [s for s in self._studies.values() if s.dirty and s.instances and now - s.last_activity >= idle_timeout]
            for s in due:
                s.dirty = False
            return [_Study(s.uid, dict(s.instances), s.last_activity, set(s.calling_aets), False) for s in due]

    def mark_complete(self, study_uid: str, info: dict) -> None:
        atomic_write_bytes(json.dumps(info).encode(), self.studies_dir / study_uid / "complete.json")

    def release(self, study_uid: str, files: list[Path]) -> int:
        """Delete the handed-off instance files of a study; its index entries stay.

        The index entries (SOP Instance UID -> sha256) keep duplicate detection working:
        a PACS that sends the same instance again gets "duplicate" rather than a re-analysis.
        Only the files handed to the callback are removed; an instance that arrived while
        the callback ran stays, and its study is due again. Files are content-addressed and
        hold the Study Instance UID, so no other study references them.
        """
        removed, handed = 0, set(files)
        with self._lock:
            st = self._studies.get(study_uid)
            if st is not None:
                st.instances = {sop: p for sop, p in st.instances.items() if p not in handed}
            for path in handed:
                try:
                    path.unlink()
                    removed += 1
                except FileNotFoundError:
                    pass
        return removed

    def study_files(self, study_uid: str) -> list[Path]:
        with self._lock:
            st = self._studies.get(study_uid)
            return sorted(st.instances.values()) if st else []


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return text[:200]


__all__ = ["InstanceStore", "StoreResult", "decode_dataset", "check_pixel_data", "valid_uid", "SUCCESS",
           "DUPLICATE_SOP_INSTANCE", "NOT_AUTHORIZED", "OUT_OF_RESOURCES", "DOES_NOT_MATCH_SOP_CLASS", "CANNOT_UNDERSTAND"]
