"""DICOM de-identification: PS3.15 Annex E Basic Profile with three options, keyed by a site secret.

Profile: Basic Application Level Confidentiality Profile + Retain Longitudinal
Temporal Information with Modified Dates + Retain Patient Characteristics +
Clean Descriptors (the action table is in :mod:`medsight.integration.profile`).

Why keyed (HMAC-SHA256 with a per-site secret) rather than random:

* UIDs map to ``2.25.<128-bit int>``; the same original UID always maps to
  the same new one for a site, so a study de-identified in two batches, or a
  prior and a follow-up, still reference each other correctly. Without the key
  the mapping cannot be recomputed or reversed.
* Dates are shifted by a whole number of days derived from the patient's
  original ID, so intervals between a patient's studies survive (the Modified
  Dates option) while calendar dates do not. Whole days keep the time of day
  and the weekday-free arithmetic simple; times are therefore retained.
* Patient ID and Name become a keyed pseudonym (allowed by action Z, which
  permits "a dummy value consistent with the VR"), so a research set can still
  group images by patient.

Pixel data is never touched: the Basic Profile does not clean pixels, and an
image whose Burned In Annotation is YES is refused unless explicitly allowed.
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import os
import re
import secrets
import stat
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence

from medsight.integration.files import atomic_write_dataset
from medsight.integration.profile import (
    PATIENT_ID,
    PATIENT_NAME,
    TABLE_EDITION,
    ConfidentialityProfile,
    ProfileOptions,
    resolve,
)
from medsight.errors import BurnedInAnnotationError, DeidentificationError, ImageTooLargeError, SiteKeyError
from medsight.io.deflate import dcmread

MIN_KEY_BYTES = 16
KEY_ENV = "MEDSIGHT_DEID_KEY_FILE"
DEFAULT_KEY_FILE = Path("~/.config/medsight/deid.key")

_TEXT_VRS = frozenset({"SH", "LO", "ST", "LT", "UT", "UC", "PN"})
_MAX_LEN = {"SH": 16, "LO": 64, "ST": 1024, "LT": 10240, "PN": 64, "CS": 16, "AE": 16}
_BINARY_VRS = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_NUMERIC_VRS = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "SV", "UV", "AT"})
_DUMMY_TEXT = "ANONYMIZED"
_DUMMY = {"DA": "19000101", "TM": "000000", "DT": "19000101000000", "AS": "000D", "IS": "0", "DS": "0",
          "UR": "urn:medsight:anonymized"}

# File Meta attributes that name the sending system (not patient data, but
# they identify the site's network nodes, which a de-identified export should not).
_META_TO_REMOVE = (0x00020016, 0x00020017, 0x00020018, 0x00020026, 0x00020027, 0x00020028, 0x00020100, 0x00020102)

# PS3.16 CID 7050 De-identification Method codes for what this module does.
_CID_7050 = {
    "basic": ("113100", "Basic Application Confidentiality Profile"),
    "clean_descriptors": ("113105", "Clean Descriptors Option"),
    "retain_longitudinal_modified_dates": ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"),
    "retain_patient_characteristics": ("113108", "Retain Patient Characteristics Option"),
}


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DeidConfig:
    """What to do, and the site secret that makes UIDs, pseudonyms and date shifts reproducible.

    ``key`` must stay secret and stable: with it the same patient always maps
    to the same pseudonym, UIDs and date shift; without it nothing can be
    linked back. Build one with :func:`load_key`.
    """

    key: bytes = field(repr=False)
    options: ProfileOptions = ProfileOptions()
    allow_burned_in: bool = False
    max_shift_days: int = 3650
    pseudonym_prefix: str = "MS"

    def __post_init__(self) -> None:
        if not isinstance(self.key, bytes | bytearray) or len(self.key) < MIN_KEY_BYTES:
            raise SiteKeyError(f"de-identification key must be at least {MIN_KEY_BYTES} bytes of secret material")
        if self.max_shift_days < 1:
            raise ValueError("max_shift_days must be >= 1")


def load_key(path: str | Path | None = None, create: bool = False) -> bytes:
    """Read the site key from ``path`` (else $MEDSIGHT_DEID_KEY_FILE, else ~/.config/medsight/deid.key).

    With ``create`` a missing file is created with 32 random bytes (hex), mode 0600.
    """
    p = Path(path or os.environ.get(KEY_ENV) or DEFAULT_KEY_FILE).expanduser()
    if not p.exists():
        if not create:
            raise SiteKeyError(f"{p}: key file does not exist (create it once with 'medsight deid ... --create-key' and keep it secret)")
        new_key_file(p)
    try:
        text = p.read_bytes().strip()
    except OSError as exc:
        raise SiteKeyError(f"{p}: cannot read key file: {exc.strerror}") from exc
    if len(text) < MIN_KEY_BYTES:
        raise SiteKeyError(f"{p}: key file holds {len(text)} bytes, at least {MIN_KEY_BYTES} are needed")
    return bytes(text)


def new_key_file(path: str | Path) -> Path:
    """Create a fresh random site key readable only by its owner; never overwrites an existing key."""
    p = Path(path).expanduser()
    p.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    except FileExistsError as exc:
        raise SiteKeyError(f"{p}: refusing to overwrite an existing key (it would change every mapping)") from exc
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32) + "\n")
    return p


# --------------------------------------------------------------------------- keyed mappings


def _mac(key: bytes, purpose: str, value: str) -> bytes:
    return hmac.new(key, f"{purpose}\x00{value}".encode(), hashlib.sha256).digest()


def remap_uid(key: bytes, uid: str) -> str:
    """``2.25.<int>`` from the first 128 bits of HMAC(key, uid): stable per site, not reversible."""
    uid = str(uid).strip().rstrip("\x00")
    if not uid:
        return uid
    return "2.25." + str(int.from_bytes(_mac(key, "uid", uid)[:16], "big"))


def date_shift_days(key: bytes, patient_key: str, max_days: int = 3650) -> int:
    """Days to subtract from every date of this patient: 1..max_days, never 0."""
    return 1 + int.from_bytes(_mac(key, "date-shift", patient_key)[:8], "big") % max_days


def pseudonym(key: bytes, patient_key: str, prefix: str = "MS") -> str:
    return prefix + _mac(key, "patient", patient_key).hex()[:12].upper()


def patient_key_of(ds: Dataset) -> str:
    """What identifies the patient for keyed mappings: Patient ID, else name + birth date.

    Files without any of these share one mapping (nothing better can be known).
    """
    pid = _str(ds, "PatientID")
    if pid:
        return "id:" + pid
    name, birth = _str(ds, "PatientName"), _str(ds, "PatientBirthDate")
    return f"name:{name}|{birth}" if (name or birth) else ""


def _str(ds: Dataset, keyword: str) -> str:
    try:
        value = ds.get(keyword)
    except Exception:
        return ""
    return "" if value is None else str(value).strip()


# --------------------------------------------------------------------------- dates


def _shift_da(value: str, days: int) -> str:
    digits = value.strip().replace(".", "")  # ACR-NEMA wrote YYYY.MM.DD
    if not re.fullmatch(r"\d{8}", digits):
        return ""  # reduced precision or malformed: cannot shift, so drop it
    try:
        d = dt.date(int(digits[:4]), int(digits[4:6]), int(digits[6:]))
    except ValueError:
        return ""
    try:
        return (d - dt.timedelta(days=days)).strftime("%Y%m%d")
    except OverflowError:
        return ""


def _shift_dt(value: str, days: int) -> str:
    m = re.fullmatch(r"(\d{8})(\d{0,6}(?:\.\d{1,6})?(?:[+-]\d{4})?)", value.strip())
    if not m:
        return ""
    date = _shift_da(m.group(1), days)
    return date + m.group(2) if date else ""


# --------------------------------------------------------------------------- descriptor cleaning


_PATTERNS = (
    r"\b\d{4}[-./]\d{1,2}[-./]\d{1,2}\b",            # 2023-01-31
    r"\b\d{1,2}[-./]\d{1,2}[-./]\d{2,4}\b",          # 31.01.2023, 1/31/23
    r"\b(?:19|20)\d{2}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])\b",  # 20230131
    r"\b\d{6,}\b",                                    # record numbers
    r"[\w.+-]+@[\w-]+\.[\w.-]+",                      # e-mail
    r"\+?\d[\d ()-]{7,}\d",                           # phone numbers
)


class DescriptorCleaner:
    """Clean (action C): keep a descriptor's meaning, remove what could identify the patient.

    Removes every identifier the data set itself carries (patient and staff
    names, IDs, accession number, birth date, institution, station) plus
    generic patterns (dates, long numbers, e-mail, phone). No library offers
    this for DICOM free text; it is written here on purpose and is
    conservative: a removed word costs a little meaning, a kept name is a leak.
    """

    _NAME_KEYWORDS = ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
                      "ReferringPhysicianName", "PerformingPhysicianName", "NameOfPhysiciansReadingStudy",
                      "OperatorsName", "PhysiciansOfRecord", "RequestingPhysician", "ResponsiblePerson")
    _VALUE_KEYWORDS = ("PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID", "InstitutionName",
                       "InstitutionAddress", "StationName", "PatientAddress", "PatientTelephoneNumbers",
                       "MedicalRecordLocator", "AdmissionID", "InstitutionalDepartmentName")

    def __init__(self, ds: Dataset):
        terms: set[str] = set()
        for kw in self._NAME_KEYWORDS:
            for value in _values(ds, kw):
                terms.update(t for t in re.split(r"[\^=\s,]+", value) if len(t) >= 2)
        for kw in self._VALUE_KEYWORDS:
            terms.update(v for v in _values(ds, kw) if len(v) >= 2)
        birth = _str(ds, "PatientBirthDate")
        if re.fullmatch(r"\d{8}", birth):
            y, m, d = birth[:4], birth[4:6], birth[6:]
            terms.update({birth, f"{y}-{m}-{d}", f"{d}.{m}.{y}", f"{m}/{d}/{y}", f"{d}/{m}/{y}"})
        alternatives = [re.escape(t) for t in sorted(terms, key=len, reverse=True)] + list(_PATTERNS)
        self._regex = re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)" if terms else "|".join(_PATTERNS),
                                 re.IGNORECASE)

    def clean(self, text: str) -> str:
        return self._regex.sub("*", text)


def _values(ds: Dataset, keyword: str) -> Iterator[str]:
    try:
        value = ds.get(keyword)
    except Exception:
        return
    if value is None:
        return
    items = value if isinstance(value, MultiValue | list) else [value]
    for v in items:
        s = str(v).strip()
        if s:
            yield s


# --------------------------------------------------------------------------- the engine


@dataclass
class DeidReport:
    """What was done to one data set (no original values: this is safe to log)."""

    date_shift_days: int
    actions: Counter = field(default_factory=Counter)
    private_removed: int = 0


class _Run:
    """State of one data set's de-identification (the cleaner needs the *original* identifiers)."""

    def __init__(self, ds: Dataset, config: DeidConfig, profile: ConfidentialityProfile):
        self.config = config
        self.profile = profile
        pkey = patient_key_of(ds)
        self.shift = date_shift_days(config.key, pkey, config.max_shift_days)
        self.pseudonym = pseudonym(config.key, pkey, config.pseudonym_prefix)
        self.cleaner = DescriptorCleaner(ds)
        self.report = DeidReport(date_shift_days=self.shift)

    # -- walking ------------------------------------------------------------
    def apply(self, ds: Dataset, clean_text: bool = False) -> None:
        for tag in list(ds.keys()):
            if tag.is_private:
                del ds[tag]
                self.report.private_removed += 1
                continue
            if tag.element == 0 and tag.group > 0x0002:  # group lengths would be wrong after editing
                del ds[tag]
                continue
            try:
                elem = ds[tag]
            except Exception:  # a value pydicom cannot even decode: keep only what the profile keeps
                if self.profile.action(tag) not in (None, "K"):
                    del ds[tag]
                    self.report.actions["X"] += 1
                continue
            self._element(ds, elem, clean_text)

    def _element(self, ds: Dataset, elem: DataElement, clean_text: bool) -> None:
        tag, vr = elem.tag, elem.VR
        listed = self.profile.action(tag)
        if listed is None:
            if vr == "SQ":
                self._recurse(elem, clean_text)
            elif clean_text and vr in _TEXT_VRS:
                self._clean(elem)
            return
        action = resolve(listed, vr)
        self.report.actions[action] += 1
        if tag in (PATIENT_ID, PATIENT_NAME) and action in ("Z", "D"):
            elem.value = self.pseudonym
        elif action == "X":
            del ds[tag]
        elif action == "Z":
            elem.value = Sequence([]) if vr == "SQ" else None
        elif action == "D":
            elem.value = self._dummy(elem)
        elif action == "U":
            elem.value = self._uids(elem.value)
        elif action == "U*" or (action == "K" and vr == "SQ"):
            self._recurse(elem, clean_text)
        elif action == "C":
            self._clean(elem)
        # K on a plain attribute: keep

    def _recurse(self, elem: DataElement, clean_text: bool) -> None:
        for item in elem.value or []:
            self.apply(item, clean_text)

    # -- actions ------------------------------------------------------------
    def _uids(self, value):
        key = self.config.key
        if isinstance(value, MultiValue | list):
            return [remap_uid(key, v) for v in value]
        return remap_uid(key, value) if value else value

    def _dummy(self, elem: DataElement):
        vr = elem.VR
        if vr == "UI":
            return self._uids(elem.value) or remap_uid(self.config.key, f"dummy:{elem.tag}")
        if vr in _BINARY_VRS:
            return b"\x00\x00"
        if vr in _NUMERIC_VRS:
            return 0
        if vr in ("FL", "FD"):
            return 0.0
        return _DUMMY.get(vr, _DUMMY_TEXT)

    def _clean(self, elem: DataElement) -> None:
        vr = elem.VR
        if vr == "SQ":
            self._recurse(elem, clean_text=True)
        elif vr == "DA":
            elem.value = self._map_text(elem.value, lambda v: _shift_da(v, self.shift))
        elif vr == "DT":
            elem.value = self._map_text(elem.value, lambda v: _shift_dt(v, self.shift))
        elif vr == "TM":
            pass  # whole-day shift: time of day is retained
        elif vr in _TEXT_VRS:
            limit = _MAX_LEN.get(vr)
            elem.value = self._map_text(elem.value, lambda v: self.cleaner.clean(v)[:limit] if limit else self.cleaner.clean(v))
        elif vr in _BINARY_VRS:
            elem.value = b"\x00\x00"  # opaque bytes cannot be cleaned, only replaced
        # numbers and code strings carry no free text: kept

    @staticmethod
    def _map_text(value, fn):
        if value is None:
            return None
        if isinstance(value, MultiValue | list):
            return [fn(str(v)) for v in value]
        return fn(str(value))


def deidentify_dataset(ds: Dataset, config: DeidConfig, inplace: bool = False,
                       profile: ConfidentialityProfile | None = None) -> Dataset:
    """The de-identified data set (a copy unless ``inplace``); the service calls this on arrival.

    Raises :class:`BurnedInAnnotationError` for Burned In Annotation = YES
    unless ``config.allow_burned_in``. The report of what was done is in
    ``result.medsight_deid_report`` (not written to the file).
    """
    burned = _str(ds, "BurnedInAnnotation").upper()
    if burned == "YES" and not config.allow_burned_in:
        raise BurnedInAnnotationError(
            "Burned In Annotation is YES: identifying text may be in the pixels, which the Basic Profile does not "
            "clean; pass --allow-burned-in (allow_burned_in=True) only if the pixels were checked")
    out = ds if inplace else copy.deepcopy(ds)
    run = _Run(out, config, profile or ConfidentialityProfile(config.options))
    _retain_age(out, config)
    run.apply(out)
    _clean_file_meta(out)
    _mark(out, config, burned == "YES")
    out.medsight_deid_report = run.report  # plain Python attribute, never encoded
    return out


def _retain_age(ds: Dataset, config: DeidConfig) -> None:
    """Retain Patient Characteristics keeps the age; derive it from birth date first if it is missing."""
    if not config.options.retain_patient_characteristics or _str(ds, "PatientAge"):
        return
    birth = _str(ds, "PatientBirthDate")
    when = _str(ds, "StudyDate") or _str(ds, "AcquisitionDate") or _str(ds, "ContentDate")
    if not (re.fullmatch(r"\d{8}", birth) and re.fullmatch(r"\d{8}", when)):
        return
    try:
        b = dt.date(int(birth[:4]), int(birth[4:6]), int(birth[6:]))
        w = dt.date(int(when[:4]), int(when[4:6]), int(when[6:]))
    except ValueError:
        return
    years = w.year - b.year - ((w.month, w.day) < (b.month, b.day))
    if 0 <= years <= 999:
        ds.PatientAge = f"{years:03d}Y"


def _clean_file_meta(ds: Dataset) -> None:
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        return
    for tag in _META_TO_REMOVE:
        if tag in meta:
            del meta[tag]
    if "SOPInstanceUID" in ds:
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


def _mark(ds: Dataset, config: DeidConfig, burned_in: bool) -> None:
    used = ["basic"] + [name for name in ("retain_longitudinal_modified_dates", "retain_patient_characteristics",
                                          "clean_descriptors") if getattr(config.options, name)]
    ds.PatientIdentityRemoved = "YES"
    methods = [f"MedSight PS3.15 E.1-1 ({TABLE_EDITION})"] + [_CID_7050[u][1][:64] for u in used]
    if burned_in:
        methods.append("Burned-in annotation allowed, pixels not cleaned")
    ds.DeidentificationMethod = methods
    seq = []
    for u in used:
        item = Dataset()
        item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = _CID_7050[u][0], "DCM", _CID_7050[u][1]
        seq.append(item)
    ds.DeidentificationMethodCodeSequence = seq
    if config.options.retain_longitudinal_modified_dates:
        ds.LongitudinalTemporalInformationModified = "MODIFIED"
    else:
        ds.LongitudinalTemporalInformationModified = "REMOVED"


# --------------------------------------------------------------------------- files and folders


@dataclass
class DeidOutcome:
    source: str
    output: str | None = None
    error: str | None = None
    kind: str | None = None  # error class name
    actions: dict[str, int] | None = None  # profile action -> number of attributes it was applied to
    private_removed: int | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if v is not None}


def read_dicom_dataset(path: str | Path) -> Dataset:
    """A deflated data set is inflated under the pixel budget (:mod:`medsight.io.deflate`), not all at once."""
    try:
        ds = dcmread(path, force=True)
    except ImageTooLargeError:
        raise
    except Exception as exc:
        raise DeidentificationError(f"{path}: not readable as DICOM ({type(exc).__name__}: {exc})") from exc
    if not len(ds):
        # pydicom returns an empty data set when e.g. encapsulated pixel data ends early
        raise DeidentificationError(f"{path}: no data element could be read (truncated or malformed file)")
    if not any(k in ds for k in ("SOPClassUID", "PatientID", "StudyInstanceUID", "Modality")):
        raise DeidentificationError(f"{path}: not a DICOM data set")
    return ds


def deidentify_file(src: str | Path, dst: str | Path, config: DeidConfig,
                    profile: ConfidentialityProfile | None = None) -> Path:
    """De-identify one file into ``dst`` (written atomically; the source is never modified)."""
    src, dst = Path(src), Path(dst)
    if dst.exists() and dst.resolve() == src.resolve():
        raise DeidentificationError(f"{src}: refusing to overwrite the original with its de-identified copy")
    ds = deidentify_dataset(read_dicom_dataset(src), config, inplace=True, profile=profile)
    try:
        return atomic_write_dataset(ds, dst)
    except Exception as exc:
        raise DeidentificationError(f"{src}: de-identified data set cannot be written ({type(exc).__name__}: {exc})") from exc


def deidentify_path(src: str | Path, dst: str | Path, config: DeidConfig) -> list[DeidOutcome]:
    """A file to a file (or into a folder), or a folder to a folder.

    Folder outputs are named ``<study>/<series>/<instance>.dcm`` after the
    *new* UIDs: original file names often contain patient names or IDs.
    """
    src, dst = Path(src), Path(dst)
    profile = ConfidentialityProfile(config.options)
    if not src.exists():
        raise DeidentificationError(f"{src}: no such file or folder")
    if src.is_file():
        target = dst
        if dst.is_dir():
            target = None
        return [_one(src, target, dst, config, profile)]
    if dst.exists() and dst.resolve() == src.resolve():
        raise DeidentificationError("output folder must differ from the input folder")
    files = [f for f in sorted(src.rglob("*")) if f.is_file() and not f.name.startswith(".") and f.name.upper() != "DICOMDIR"]
    return [_one(f, None, dst, config, profile) for f in files]


def _one(src: Path, target: Path | None, folder: Path, config: DeidConfig, profile: ConfidentialityProfile) -> DeidOutcome:
    from medsight.errors import MedSightError

    try:
        ds = deidentify_dataset(read_dicom_dataset(src), config, inplace=True, profile=profile)
        if target is None:
            parts = [_str(ds, "StudyInstanceUID") or "unknown-study", _str(ds, "SeriesInstanceUID") or "unknown-series"]
            name = _str(ds, "SOPInstanceUID") or remap_uid(config.key, f"file:{src}")
            target = folder.joinpath(*parts, name + ".dcm")
        try:
            atomic_write_dataset(ds, target)
        except Exception as exc:
            raise DeidentificationError(f"{src}: cannot write de-identified copy ({type(exc).__name__}: {exc})") from exc
        report = ds.medsight_deid_report
        return DeidOutcome(str(src), output=str(target), actions=dict(report.actions), private_removed=report.private_removed)
    except MedSightError as exc:
        return DeidOutcome(str(src), error=str(exc), kind=type(exc).__name__)


__all__ = ["DeidConfig", "DeidReport", "DeidOutcome", "summarize", "DescriptorCleaner", "deidentify_dataset", "deidentify_file",
           "deidentify_path", "load_key", "new_key_file", "remap_uid", "date_shift_days", "pseudonym", "patient_key_of"]


def summarize(outcomes: list[DeidOutcome]) -> dict:
    """Totals over a run: files done and refused (by reason), attributes per profile action, private tags removed."""
    actions: Counter = Counter()
    refused: Counter = Counter()
    for o in outcomes:
        actions.update(o.actions or {})
        if o.error:
            refused[o.kind or "error"] += 1
    return {"files": len(outcomes), "deidentified": sum(1 for o in outcomes if not o.error), "refused": dict(refused),
            "attributes_by_action": dict(sorted(actions.items())),
            "private_elements_removed": sum(o.private_removed or 0 for o in outcomes)}
