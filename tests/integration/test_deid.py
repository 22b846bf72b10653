"""De-identification over every file of pydicom-data, checked against the profile table and the originals.

The checks read the *original* file independently and compare value by value:
an attribute the profile removes, empties, replaces or remaps must not keep
its original value anywhere in the output, pixel data bytes must be
identical, and the output must re-read as a DICOM Part 10 file.
"""

from __future__ import annotations

import datetime as dt
import os
import stat
import warnings
from collections import defaultdict
from pathlib import Path

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import UID
from typer.testing import CliRunner

import data_store
from medsight.integration.deid import (
    DeidConfig,
    DescriptorCleaner,
    date_shift_days,
    deidentify_dataset,
    deidentify_file,
    deidentify_path,
    load_key,
    new_key_file,
    remap_uid,
)
from medsight.integration.profile import ConfidentialityProfile, ProfileOptions, resolve
from medsight.errors import BurnedInAnnotationError, DeidentificationError, SiteKeyError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

DATA = Path(data_store.__file__).parent / "data"
MAX_BYTES = 20_000_000
FILES = sorted(f for f in DATA.glob("*.dcm") if f.stat().st_size <= MAX_BYTES)
KEY_A, KEY_B = b"site-A-secret-key-0123456789abcdef", b"site-B-secret-key-0123456789abcdef"
PROFILE = ConfidentialityProfile(ProfileOptions())
PIXEL_KEYWORDS = ("PixelData", "FloatPixelData", "DoubleFloatPixelData")


def _read(path: Path) -> Dataset:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return pydicom.dcmread(path, force=True)


def _walk(ds: Dataset):
    """Every data element at every depth, skipping values pydicom cannot decode."""
    for tag in list(ds.keys()):
        try:
            elem = ds[tag]
        except Exception:
            continue
        yield elem
        if elem.VR == "SQ" and elem.value:
            for item in elem.value:
                yield from _walk(item)


def _text(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, list | pydicom.multival.MultiValue):
        return [str(v) for v in value if str(v)]
    return [str(value)] if str(value) else []


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """De-identify the whole data store three times: key A twice (separate folders), key B once."""
    out = {}
    for name, key in (("a1", KEY_A), ("a2", KEY_A), ("b", KEY_B)):
        dst = tmp_path_factory.mktemp(f"deid-{name}")
        outcomes = {}
        for f in FILES:
            target = dst / f.name
            try:
                deidentify_file(f, target, DeidConfig(key=key, allow_burned_in=True))
                outcomes[f.name] = target
            except DeidentificationError as exc:
                outcomes[f.name] = exc
        out[name] = outcomes
    return out


def test_data_store_is_there() -> None:
    assert len(FILES) >= 60, "pydicom-data should ship ~68 DICOM files"


def test_every_readable_file_is_deidentified_and_only_unreadable_ones_refused(runs: dict) -> None:
    for f in FILES:
        result = runs["a1"][f.name]
        readable = len(_read(f)) > 0
        if readable:
            assert isinstance(result, Path), f"{f.name}: {result}"
        else:  # pydicom itself gets no element out of it (truncated encapsulated pixel data)
            assert isinstance(result, DeidentificationError) and "truncated" in str(result)
    done = [r for r in runs["a1"].values() if isinstance(r, Path)]
    assert len(done) >= len(FILES) - 2


def test_output_rereads_as_part10_and_is_marked(runs: dict) -> None:
    for name, out in runs["a1"].items():
        if not isinstance(out, Path):
            continue
        ds = pydicom.dcmread(out)  # no force: preamble + File Meta must be right
        assert ds.PatientIdentityRemoved == "YES", name
        codes = {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}
        assert codes == {"113100", "113105", "113107", "113108"}, name
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        if "SOPInstanceUID" in ds:
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert "SourceApplicationEntityTitle" not in ds.file_meta


def test_no_removed_or_replaced_attribute_keeps_its_original_value(runs: dict) -> None:
    checked = 0
    for f in FILES:
        out = runs["a1"][f.name]
        if not isinstance(out, Path):
            continue
        original, result = _read(f), _read(out)
        survivors = defaultdict(set)
        for elem in _walk(result):
            survivors[elem.tag].update(_text(elem.value) if elem.VR != "SQ" else [])
        for elem in _walk(original):
            listed = PROFILE.action(elem.tag)
            if listed is None or elem.VR == "SQ":
                continue
            action = resolve(listed, elem.VR)
            if action not in ("X", "Z", "D", "U"):
                continue
            for value in _text(elem.value):
                if value.strip() in ("", "ANONYMIZED"):
                    continue
                assert value not in survivors[elem.tag], f"{f.name}: {elem.tag} {elem.keyword} kept {value!r} (action {action})"
                checked += 1
        top_removed = [e.tag for e in original if PROFILE.action(e.tag) and resolve(PROFILE.action(e.tag), e.VR) == "X"]
        assert not [t for t in top_removed if t in result], f"{f.name}: X attributes still present"
    assert checked > 500  # the data store carries plenty of identifying attributes


def test_uids_are_remapped_consistently_to_2_25(runs: dict) -> None:
    for f in FILES:
        out = runs["a1"][f.name]
        if not isinstance(out, Path):
            continue
        original, result = _read(f), _read(out)
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID"):
            if kw in original and original[kw].value:
                new = result[kw].value
                assert new == remap_uid(KEY_A, original[kw].value)
                assert new.startswith("2.25.") and len(new) <= 64 and UID(new).is_valid
        # well-known UIDs (what the object is, how it is encoded) are not patient data and stay
        if "SOPClassUID" in original:
            assert result.SOPClassUID == original.SOPClassUID


def test_private_tags_are_removed_at_every_depth(runs: dict) -> None:
    had_private = 0
    for f in FILES:
        out = runs["a1"][f.name]
        if not isinstance(out, Path):
            continue
        had_private += any(e.tag.is_private for e in _walk(_read(f)))
        assert not any(e.tag.is_private for e in _walk(_read(out))), f.name
    assert had_private >= 5


def test_pixel_data_bytes_are_unchanged(runs: dict) -> None:
    compared = 0
    for f in FILES:
        out = runs["a1"][f.name]
        if not isinstance(out, Path):
            continue
        original, result = _read(f), pydicom.dcmread(out)
        for kw in PIXEL_KEYWORDS:
            if kw in original:
                assert result[kw].value == original[kw].value, f"{f.name}: {kw} changed"
                compared += 1
        if original.file_meta.get("TransferSyntaxUID"):  # compressed pixel bytes stay valid only with the same syntax
            assert result.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert compared >= 60


def test_patient_name_id_and_birth_date_appear_nowhere(runs: dict) -> None:
    for f in FILES:
        out = runs["a1"][f.name]
        if not isinstance(out, Path):
            continue
        original = _read(f)
        secrets_ = set()
        for kw in ("PatientName", "PatientID", "PatientBirthDate", "OtherPatientIDs", "AccessionNumber"):
            secrets_.update(v for v in _text(original[kw].value if kw in original else None) if len(v.strip()) >= 4)
        if "PatientName" in original:
            secrets_.update(p for p in str(original.PatientName).split("^") if len(p) >= 5)
        # CS holds defined terms ("PERFUSION" in Image Type is not the test patient "Perfusion^MCA Stroke")
        result = _read(out)
        del result.DeidentificationMethod, result.DeidentificationMethodCodeSequence  # our own fixed wording
        texts = [t for e in _walk(result) if e.VR not in ("SQ", "OB", "OW", "UN", "CS") for t in _text(e.value)]
        for s in secrets_:
            assert not any(s.strip().lower() in t.lower() for t in texts), f"{f.name}: {s!r} survived"


def test_dates_are_shifted_per_patient_keeping_intervals(runs: dict) -> None:
    shifted = 0
    for f in FILES:
        out = runs["a1"][f.name]
        if not isinstance(out, Path):
            continue
        original, result = _read(f), _read(out)
        pid = str(original.get("PatientID", "") or "").strip()
        if not pid:
            continue
        days = date_shift_days(KEY_A, "id:" + pid)
        for kw in ("StudyDate", "SeriesDate", "AcquisitionDate", "ContentDate"):
            value = str(original.get(kw, "") or "")
            if len(value) == 8 and value.isdigit():
                expect = (dt.date(int(value[:4]), int(value[4:6]), int(value[6:])) - dt.timedelta(days=days)).strftime("%Y%m%d")
                assert result[kw].value == expect, f"{f.name} {kw}"
                shifted += 1
        if "StudyTime" in original:  # whole-day shift keeps the time of day
            assert result.StudyTime == original.StudyTime
        assert not str(result.get("PatientBirthDate", "") or "")  # birth date is not retained by any option here
    assert shifted > 30


def test_patient_characteristics_are_retained(runs: dict) -> None:
    kept = 0
    for f in FILES:
        out = runs["a1"][f.name]
        if not isinstance(out, Path):
            continue
        original, result = _read(f), _read(out)
        for kw in ("PatientSex", "PatientAge", "PatientWeight", "PatientSize"):
            if kw in original and original[kw].value not in (None, ""):
                assert result[kw].value == original[kw].value, f"{f.name} {kw}"
                kept += 1
    assert kept > 20


def test_same_key_gives_same_mapping_and_different_key_a_different_one(runs: dict) -> None:
    by_study = defaultdict(set)
    for f in FILES:
        a1, a2, b = runs["a1"][f.name], runs["a2"][f.name], runs["b"][f.name]
        if not isinstance(a1, Path):
            continue
        da1, da2, db = _read(a1), _read(a2), _read(b)
        for kw in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            if kw in da1:
                assert da1[kw].value == da2[kw].value, f"{f.name}: {kw} differs between two runs with one key"
                assert da1[kw].value != db[kw].value, f"{f.name}: {kw} equal under two different keys"
        if _read(f).get("PatientID"):
            assert da1.PatientID == da2.PatientID != db.PatientID
        if "StudyInstanceUID" in da1:
            by_study[_read(f).StudyInstanceUID].add(da1.StudyInstanceUID)
    # one original study -> one new study, across files and runs; distinct studies stay distinct
    assert all(len(v) == 1 for v in by_study.values())
    news = [next(iter(v)) for v in by_study.values()]
    assert len(set(news)) == len(news)
    assert any(len([f for f in FILES if isinstance(runs["a1"][f.name], Path) and _read(f).get("StudyInstanceUID") == s]) > 1
               for s in by_study), "the data store should hold at least one multi-file study"


def test_burned_in_annotation_is_refused_unless_allowed(tmp_path: Path) -> None:
    ds = _read(DATA / "SC_rgb.dcm")
    ds.BurnedInAnnotation = "YES"
    src = tmp_path / "burned.dcm"
    ds.save_as(src)
    with pytest.raises(BurnedInAnnotationError, match="Burned In Annotation"):
        deidentify_file(src, tmp_path / "out.dcm", DeidConfig(key=KEY_A))
    assert not (tmp_path / "out.dcm").exists()
    out = deidentify_file(src, tmp_path / "out.dcm", DeidConfig(key=KEY_A, allow_burned_in=True))
    assert any("Burned-in" in m for m in pydicom.dcmread(out).DeidentificationMethod)


def test_clean_descriptors_removes_identifiers_but_keeps_meaning() -> None:
    ds = Dataset()
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Smith^Johanna", "MRN4711", "19700102"
    ds.StudyDescription = "CT head Smith Johanna MRN4711 born 1970-01-02 call +44 20 7946 0958"
    ds.SeriesDescription = "AX T2 FLAIR"
    ds.ImageComments = "seen by dr. Smith on 12.03.2021, record 98765432"
    cleaned = deidentify_dataset(ds, DeidConfig(key=KEY_A))
    for leak in ("Smith", "Johanna", "MRN4711", "1970-01-02", "7946", "12.03.2021", "98765432"):
        assert leak not in cleaned.StudyDescription + cleaned.ImageComments
    assert cleaned.StudyDescription.startswith("CT head")
    assert cleaned.SeriesDescription == "AX T2 FLAIR"
    assert ds.PatientName == "Smith^Johanna"  # the caller's data set is not modified
    assert DescriptorCleaner(Dataset()).clean("PA chest 2 views") == "PA chest 2 views"


def test_options_off_follow_the_basic_profile_only() -> None:
    ds = Dataset()
    ds.PatientID, ds.PatientSex, ds.PatientAge, ds.StudyDate = "X1", "F", "045Y", "20200101"
    ds.StudyDescription = "Chest"
    out = deidentify_dataset(ds, DeidConfig(key=KEY_A, options=ProfileOptions(False, False, False)))
    assert "PatientAge" not in out  # Basic X
    assert out.PatientSex in ("", None)  # Basic Z
    assert out.StudyDate in ("", None)  # Basic Z
    assert "StudyDescription" not in out  # Basic X
    assert out.LongitudinalTemporalInformationModified == "REMOVED"
    assert {i.CodeValue for i in out.DeidentificationMethodCodeSequence} == {"113100"}


def test_compound_actions_resolve_to_a_conformant_alternative() -> None:
    assert resolve("X/Z/D", "LO") == "D" and resolve("X/Z", "DA") == "Z" and resolve("Z/D", "PN") == "D"
    assert resolve("X/Z/U*", "SQ") == "U*" and resolve("X/D", "SQ") == "Z" and resolve("D", "SQ") == "Z"


def test_uid_mapping_properties() -> None:
    a = remap_uid(KEY_A, "1.2.3.4")
    assert a == remap_uid(KEY_A, "1.2.3.4") != remap_uid(KEY_A, "1.2.3.5")
    assert a != remap_uid(KEY_B, "1.2.3.4")
    assert a.startswith("2.25.") and UID(a).is_valid and int(a[5:]) < 2**128
    assert all(1 <= date_shift_days(KEY_A, f"id:{i}") <= 3650 for i in range(200))
    assert len({date_shift_days(KEY_A, f"id:{i}") for i in range(200)}) > 150  # spread, not one shift for all


def test_key_file_handling(tmp_path: Path) -> None:
    with pytest.raises(SiteKeyError, match="does not exist"):
        load_key(tmp_path / "missing.key")
    key = load_key(tmp_path / "new.key", create=True)
    assert len(key) >= 32
    assert stat.S_IMODE(os.stat(tmp_path / "new.key").st_mode) == 0o600
    assert load_key(tmp_path / "new.key") == key
    with pytest.raises(SiteKeyError, match="refusing to overwrite"):
        new_key_file(tmp_path / "new.key")
    (tmp_path / "short.key").write_text("tooshort")
    with pytest.raises(SiteKeyError, match="at least 16"):
        load_key(tmp_path / "short.key")
    with pytest.raises(SiteKeyError):
        DeidConfig(key=b"short")
    assert "secret" not in repr(DeidConfig(key=b"secret-secret-secret"))


def test_folder_output_is_named_by_new_uids(tmp_path: Path) -> None:
    src = tmp_path / "in" / "Smith_John"
    src.mkdir(parents=True)
    for name in ("MR2_UNCI.dcm", "CT_small.dcm"):
        path = DATA / name if (DATA / name).exists() else Path(pydicom.data.get_testdata_file(name))
        (src / f"Smith_John_{name}").write_bytes(path.read_bytes())
    (src / "notes.txt").write_text("not dicom")
    outcomes = deidentify_path(tmp_path / "in", tmp_path / "out", DeidConfig(key=KEY_A))
    assert sum(1 for o in outcomes if o.output) == 2
    assert [o.kind for o in outcomes if o.error] == ["DeidentificationError"]
    for o in outcomes:
        if o.output:
            assert "Smith" not in o.output and Path(o.output).name.startswith("2.25.")
    with pytest.raises(DeidentificationError, match="differ"):
        deidentify_path(tmp_path / "in", tmp_path / "in", DeidConfig(key=KEY_A))


def test_cli_deid(tmp_path: Path) -> None:
    from medsight.cli import app

    src = tmp_path / "in"
    src.mkdir()
    (src / "a.dcm").write_bytes((DATA / "US1_UNCR.dcm").read_bytes())
    (src / "broken.dcm").write_bytes(b"\x00" * 64)
    key = tmp_path / "site.key"
    runner = CliRunner()
    r = runner.invoke(app, ["deid", str(src), str(tmp_path / "out"), "--key-file", str(key)])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = runner.invoke(app, ["deid", str(src), str(tmp_path / "out"), "--key-file", str(key), "--create-key", "--json"])
    assert r.exit_code == 1, r.output  # one input was refused
    written = list((tmp_path / "out").rglob("*.dcm"))
    assert len(written) == 1 and pydicom.dcmread(written[0]).PatientIdentityRemoved == "YES"
    assert '"summary"' in r.stdout and '"deidentified": 1' in r.stdout
