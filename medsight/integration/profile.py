"""PS3.15 Annex E Table E.1-1: which action the confidentiality profile takes on each attribute.

The **Basic Profile** column comes from ``dicom-anonymizer`` (Kitware), which
ships it transcribed per standard edition (we use the newest, 2026c) and
tracks new editions. We only use its table, not its executor: the executor
draws random UIDs from a module-global dict, writes "00010101" instead of
removing dates, and knows none of the profile options.

The three **option columns** we implement (Retain Longitudinal Temporal
Information with Modified Dates, Retain Patient Characteristics, Clean
Descriptors) are transcribed here by hand from Table E.1-1, because no
maintained library that works with pydicom 3 ships them (``idiscore`` does,
but pins pydicom < 3; ``dicognito`` and ``deid`` implement their own
recipes, not the table).

Action codes are the standard's: X remove, Z zero-length (or consistent
dummy), D dummy, U remap UID, K keep, C clean, and the compound codes
"X/Z", "X/D", "Z/D", "X/Z/D", "X/Z/U*" that the standard resolves by the
attribute's Type in the IOD (see :func:`resolve`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from dicomanonymizer.dicom_anonymization_databases import dicomfields_2026c as _basic
from pydicom.datadict import dictionary_VR
from pydicom.tag import BaseTag, Tag

TABLE_EDITION = "2026c"

_BASIC_CATEGORIES = {
    "D_TAGS": "D", "Z_TAGS": "Z", "X_TAGS": "X", "U_TAGS": "U", "Z_D_TAGS": "Z/D",
    "X_Z_TAGS": "X/Z", "X_D_TAGS": "X/D", "X_Z_D_TAGS": "X/Z/D", "X_Z_U_STAR_TAGS": "X/Z/U*",
}

# --- Rtn. Pat. Chars. Opt. column (hand-transcribed, see module docstring) ---
PATIENT_CHARACTERISTICS_KEEP = frozenset(Tag(t) for t in (
    0x00101010,  # Patient's Age
    0x00100040,  # Patient's Sex
    0x00102203,  # Patient's Sex Neutered
    0x00101020,  # Patient's Size
    0x00101030,  # Patient's Weight
    0x00102160,  # Ethnic Group
    0x001021A0,  # Smoking Status
    0x001021C0,  # Pregnancy Status
))
PATIENT_CHARACTERISTICS_CLEAN = frozenset(Tag(t) for t in (
    0x00102110,  # Allergies
    0x00380500,  # Patient State
    0x00400012,  # Pre-Medication
    0x00380050,  # Special Needs
))

# --- Clean Desc. Opt. column (hand-transcribed, see module docstring) ---
CLEAN_DESCRIPTORS = frozenset(Tag(t) for t in (
    0x00184000, 0x00181400, 0x001811BB, 0x00189424, 0x001021B0, 0x00081084, 0x00081080, 0x00102110,
    0x300A00C3, 0x300A00DD, 0x00120072, 0x00120051, 0x00400310, 0x00400280, 0x300A02EB, 0x3010000F,
    0x30100017, 0x0040051A, 0x00180010, 0x0018A003, 0x0018937F, 0x00082111, 0x0016004B, 0x00380040,
    0x300A0016, 0x30100037, 0x30100035, 0x30100038, 0x30100036, 0x300A0676, 0x300A0196, 0x3010007F,
    0x300A0072, 0x00209158, 0x00084000, 0x00204000, 0x00402400, 0x40080300, 0x300A0742, 0x300A0783,
    0x40080115, 0x4008010B, 0x22000002, 0x00500021, 0x0016002B, 0x00102000, 0x0018937B, 0x00102180,
    0x00104000, 0x00380500, 0x00400254, 0x300A000E, 0x3010007B, 0x30100081, 0x30100061, 0x00181030,
    0x300A0619, 0x300A0623, 0x300A067D, 0x300A067C, 0x300C0113, 0x0040100A, 0x00321030, 0x3010005C,
    0x00402001, 0x00401002, 0x00321066, 0x00321067, 0x00400275, 0x00321070, 0x00401400, 0x00321060,
    0x00189937, 0x00189185, 0x40084000, 0x30060028, 0x30060038, 0x30060026, 0x30060088, 0x30060085,
    0x3010005A, 0x300A0004, 0x300A0002, 0x300A0003, 0x30100054, 0x300A062A, 0x30100056, 0x00400007,
    0x0008103E, 0x00380062, 0x300A01B2, 0x300A01A6, 0x00400602, 0x00400600, 0x30060006, 0x30060002,
    0x30060004, 0x00324000, 0x00081030, 0x300A0608, 0x30100077, 0x3010007A, 0x300A0734, 0x30100033,
    0x30100034, 0x00384000,
))

# --- Rtn. Long. Modif. Dates Opt. column ---
# In Table E.1-1 this column holds "C" for every date, time and date-time row
# except the patient's birth date and time (and Timezone Offset From UTC,
# which a whole-day shift leaves valid, so it is kept). Deriving it from the
# rows' VR instead of listing ~120 tags keeps it right as editions add rows.
_TEMPORAL_VRS = frozenset({"DA", "DT", "TM"})
_NEVER_SHIFTED = frozenset(Tag(t) for t in (0x00100030, 0x00100032, 0x00100033))  # birth date/time/datetime
TIMEZONE_OFFSET = Tag(0x00080201)

PATIENT_NAME, PATIENT_ID = Tag(0x00100010), Tag(0x00100020)


@dataclass(frozen=True)
class ProfileOptions:
    """Which Annex E options are on. The defaults are what a research export needs."""

    retain_longitudinal_modified_dates: bool = True
    retain_patient_characteristics: bool = True
    clean_descriptors: bool = True


@dataclass(frozen=True)
class _Masked:
    group: int
    element: int
    group_mask: int
    element_mask: int
    action: str

    def matches(self, tag: BaseTag) -> bool:
        return (tag.group & self.group_mask) == (self.group & self.group_mask) and (
            tag.element & self.element_mask) == (self.element & self.element_mask)


class ConfidentialityProfile:
    """Looks up the action of the Basic Profile plus the chosen options for one attribute."""

    def __init__(self, options: ProfileOptions = ProfileOptions()):
        self.options = options
        exact: dict[BaseTag, str] = {}
        masked: list[_Masked] = []
        for category, action in _BASIC_CATEGORIES.items():
            for entry in getattr(_basic, category):
                if len(entry) == 2:
                    exact[Tag(entry)] = action
                else:
                    masked.append(_Masked(*entry, action=action))
        self.basic: dict[BaseTag, str] = exact
        self.masked: tuple[_Masked, ...] = tuple(masked)

    @cached_property
    def temporal_rows(self) -> frozenset[BaseTag]:
        rows = set()
        for tag in self.basic:
            try:
                vr = dictionary_VR(tag)
            except KeyError:
                continue
            if vr in _TEMPORAL_VRS and tag not in _NEVER_SHIFTED:
                rows.add(tag)
        return frozenset(rows)

    def basic_action(self, tag: BaseTag) -> str | None:
        """The Basic Profile column for ``tag`` (``None``: not in the table, retained)."""
        if tag in self.basic:
            return self.basic[tag]
        for m in self.masked:
            if m.matches(tag):
                return m.action
        return None

    def action(self, tag: BaseTag) -> str | None:
        """Basic Profile action overridden by the options that are on, as the standard specifies."""
        tag = Tag(tag)
        action = self.basic_action(tag)
        if action is None:
            return None
        o = self.options
        if o.retain_patient_characteristics:
            if tag in PATIENT_CHARACTERISTICS_KEEP:
                return "K"
            if tag in PATIENT_CHARACTERISTICS_CLEAN:
                return "C"
        if o.retain_longitudinal_modified_dates:
            if tag == TIMEZONE_OFFSET:
                return "K"
            if tag in self.temporal_rows:
                return "C"
        if o.clean_descriptors and tag in CLEAN_DESCRIPTORS:
            return "C"
        return action

    def rows(self) -> dict[BaseTag, str]:
        """Every exact-tag row with its effective action (for tests and documentation)."""
        return {tag: self.action(tag) for tag in self.basic}  # type: ignore[misc]


def resolve(action: str, vr: str) -> str:
    """Pick one alternative of a compound action.

    The standard chooses by the attribute's Type in the object's IOD (Type 3
    may be removed, Type 2 must stay present, Type 1 must stay non-empty).
    Working out the IOD of every object is what a validator does, not a
    de-identifier; every alternative removes the original value, so we pick
    the one that is valid whatever the Type: D for a plain attribute
    ("X/Z/D", "X/D", "Z/D" -> D; "X/Z" -> Z), and for a sequence, whose
    "dummy" has no meaningful content, an empty sequence (Z), except
    "X/Z/U*", whose items are kept with every UID inside remapped.
    """
    if action in ("X", "Z", "D", "U", "K", "C"):
        if vr == "SQ" and action == "D":
            return "Z"
        return action
    if action == "X/Z/U*":
        return "U*" if vr == "SQ" else "U" if vr == "UI" else "Z"
    if vr == "SQ":
        return "Z"
    if action == "X/Z":
        return "Z"
    return "D"  # X/D, Z/D, X/Z/D


__all__ = ["ConfidentialityProfile", "ProfileOptions", "resolve", "TABLE_EDITION", "CLEAN_DESCRIPTORS",
           "PATIENT_CHARACTERISTICS_KEEP", "PATIENT_CHARACTERISTICS_CLEAN"]
