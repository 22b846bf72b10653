"""Turn uploaded files into a stored study with a queued analysis job, or refuse them whole.

Order of operations is what makes "nothing stored half-way" true:

1. expand zip archives into a private temporary folder (member count, sizes, compression
   ratio and names checked from the central directory before anything is extracted),
2. read every image with the core reader (this is the validation: a corrupt file,
   a non-image, a DICOM without pixel data fails here with the reader's reason),
3. decide study identity, modality and model (may fail: mixed studies, unknown
   model, unsupported modality, study already received),
4. only then copy the files into content-addressed storage (atomic writes), and
5. insert study + instances + job + audit event in ONE transaction.

A study no installed model applies to (routing's decision, docs/routing.md) is stored all the same,
with status ``not_analysed`` and the reason, audited as ``study.not_analysed`` and given no analysis
job: it reaches the worklist to be read without AI instead of being lost at the door.

A failure in 1-3 leaves nothing behind; a failure in 4-5 leaves at most
unreferenced blobs, never a row pointing at a missing or partial file.
"""

from __future__ import annotations

import shutil
import tempfile
import zipfile
import zlib
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path, PurePosixPath

from pydicom.uid import generate_uid
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from medsight.errors import (
    DuplicateStudyError,
    ImageReadError,
    ImageTooLargeError,
    NotAnImageError,
    UnsupportedModalityError,
    UploadError,
    UploadTooLargeError,
)
from medsight.io.deflate import dcmread
from medsight.io.readers import read_image, sniff
from medsight.models.applicability import StudyAttributes
from medsight.serve.audit import Actor, record
from medsight.serve.config import KNOWN_MODALITIES, PRIORITIES
from medsight.serve.context import ServiceContext
from medsight.serve.db import Instance, Study, utcnow
from medsight.serve.triage import base_score

JOB_PRIORITY = {"stat": 2, "urgent": 1, "routine": 0}
_ZIP_MAGIC = b"PK\x03\x04"
_SKIP_NAMES = ("dicomdir", ".ds_store", "thumbs.db")
#: A zip member that inflates more than this many times its stored size (to a mebibyte or more) is
#: refused as a zip bomb; real DICOM, PNG and JPEG files compress far less (flat synthetic colour
#: bars, about 200:1, are the extreme among pydicom's test files).
MAX_COMPRESSION_RATIO = 500
_RATIO_FLOOR = 1 << 20
#: Entries the end-of-central-directory record may list per allowed file (a folder entry and a macOS
#: "._" twin can come with each) before the archive is refused without parsing its directory.
_ENTRIES_PER_FILE = 3


@dataclass
class UploadRequest:
    files: list[tuple[str, Path]]  # (name as uploaded, temporary path)
    modality: str | None = None
    model: str | None = None
    priority: str = "routine"
    accession_number: str | None = None
    description: str | None = None
    #: run the requested ``model`` although it does not apply (an operator's decision; audited; docs/routing.md)
    override_applicability: bool = False
    #: store a study no model applies to as "not analysed" (True), or refuse it (False). Default: store it unless
    #: the uploader asked for a ``model`` (they are there to choose another, or to override); a study from the
    #: DICOM listener is always stored (:func:`ingest_files`): nobody is there to read a refusal
    keep_not_analysed: bool | None = None


@dataclass
class _Checked:
    name: str
    path: Path
    format: str
    rows: int
    columns: int
    meta: dict = field(default_factory=dict)


def normalise_priority(priority: str | None) -> str:
    p = (priority or "routine").strip().lower()
    if p not in PRIORITIES:
        raise UploadError(f"priority must be one of {', '.join(p.upper() for p in PRIORITIES)}, not {priority!r}")
    return p


def expand_archives(files: list[tuple[str, Path]], work: Path, max_bytes: int, max_files: int) -> list[tuple[str, Path]]:
    """Replace each zip by its members; refuse archives whose contents exceed the limits (zip bombs).

    Everything is decided from the central directory before a byte is written: the number of
    members, their declared sizes, each one's compression ratio and name. Members are then
    extracted streaming, under the same byte limit (zipfile stops each at its declared size).
    """
    out: list[tuple[str, Path]] = []
    total = 0
    for name, path in files:
        with open(path, "rb") as fh:
            is_zip = fh.read(4) == _ZIP_MAGIC
        if not is_zip:
            out.append((name, path))
            continue
        try:
            _check_entry_count(name, path, max_files - len(out), max_files)
            with zipfile.ZipFile(path) as zf:
                members = _checked_members(name, zf, max_bytes - total, max_files - len(out), max_files)
                dest = work / f"zip{len(out)}_{path.stem}"
                dest.mkdir(parents=True)
                for k, m in enumerate(members):
                    target = dest / f"{k:05d}"  # never use member names as paths (no traversal)
                    with zf.open(m) as src, open(target, "wb") as dst:
                        n = _copy_limited(src, dst, max_bytes - total, name)
                    total += n
                    out.append((f"{name}/{m.filename}", target))
        except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError) as e:
            raise UploadError(f"{name}: not a readable zip archive ({e})") from None
        if len(out) > max_files:
            raise UploadTooLargeError(f"upload holds more than {max_files} files")
    if not out:
        raise UploadError("the upload holds no files")
    if len(out) > max_files:
        raise UploadTooLargeError(f"upload holds {len(out)} files, limit is {max_files}")
    return out


def _check_entry_count(name: str, path: Path, room: int, max_files: int) -> None:
    """The end-of-central-directory record says how many entries follow: refuse a flood before zipfile parses them."""
    with open(path, "rb") as fh:
        end = zipfile._EndRecData(fh)  # the record zipfile itself reads first
    entries = end[zipfile._ECD_ENTRIES_TOTAL] if end else 0
    if entries > _ENTRIES_PER_FILE * room:
        raise UploadTooLargeError(f"{name}: archive lists {entries} entries; an upload may hold {max_files} files")


def _checked_members(name: str, zf: zipfile.ZipFile, room_bytes: int, room_files: int, max_files: int) -> list[zipfile.ZipInfo]:
    """The members to extract, once the central directory shows that all of them are safe to."""
    entries = zf.infolist()
    for m in entries:
        if _unsafe(m.filename):
            raise UploadError(f"{name}: member {m.filename!r} has an unsafe path (absolute or with '..')")
    members = [m for m in entries if not m.is_dir() and not _skipped(m.filename)]
    if len(members) > room_files:
        raise UploadTooLargeError(f"{name}: archive holds {len(members)} files; an upload may hold {max_files}")
    for m in members:
        if m.flag_bits & 0x1:
            raise UploadError(f"{name}: member {m.filename!r} is encrypted")
        if m.file_size >= _RATIO_FLOOR and m.file_size > MAX_COMPRESSION_RATIO * max(m.compress_size, 1):
            raise UploadTooLargeError(f"{name}: member {m.filename!r} inflates {m.file_size // max(m.compress_size, 1)} times "
                                      f"(to {m.file_size} bytes); the limit is {MAX_COMPRESSION_RATIO}:1")
    declared = sum(m.file_size for m in members)
    if declared > room_bytes:
        raise UploadTooLargeError(f"{name}: archive expands to {declared} bytes; {room_bytes} of the upload limit remain")
    return members


def _unsafe(member: str) -> bool:
    path = member.replace("\\", "/")
    return path.startswith("/") or ".." in PurePosixPath(path).parts or (len(path) > 1 and path[1] == ":")


def _skipped(member: str) -> bool:
    base = member.rsplit("/", 1)[-1].lower()
    return base.startswith(".") or base in _SKIP_NAMES or member.startswith("__MACOSX/")


def _copy_limited(src, dst, budget: int, name: str) -> int:  # noqa: ANN001
    n = 0
    for chunk in iter(lambda: src.read(1 << 20), b""):
        n += len(chunk)
        if n > budget:
            raise UploadTooLargeError(f"{name}: archive contents exceed the upload limit")
        dst.write(chunk)
    return n


def deidentify_on_arrival(files: list[tuple[str, Path]], work: Path, key_file: Path) -> list[tuple[str, Path]]:
    """Replace every DICOM file by its de-identified copy (in ``work``) before anything is stored.

    Files the DICOM listener already de-identified with the site key are kept
    as they are (de-identifying twice would remap UIDs twice). A file the
    profile refuses (e.g. Burned In Annotation = YES) refuses the whole upload.
    The uploaded file names are replaced too: they often hold patient names.
    """
    from medsight.integration.deid import DeidConfig, deidentify_file, load_key
    from medsight.errors import MedSightError

    try:
        config = DeidConfig(key=load_key(key_file))
    except MedSightError as e:
        raise UploadError(f"de-identification on arrival is configured but unusable: {e}") from None
    out = []
    for k, (name, path) in enumerate(files):
        if sniff(path) != "dicom" or _deidentified_by_us(path):
            out.append((name, path))
            continue
        target = work / f"deid_{k:05d}.dcm"
        try:
            deidentify_file(path, target, config)
        except ImageTooLargeError as e:
            e.args = (str(e).replace(str(path), name),)
            raise
        except MedSightError as e:
            raise UploadError(f"{name}: refused by de-identification: {str(e).replace(str(path), name)}") from None
        out.append((f"deidentified-{k + 1:04d}.dcm", target))  # upload names often hold patient names
    return out


def _deidentified_by_us(path: Path) -> bool:
    ds = dcmread(path, stop_before_pixels=True, force=True)
    methods = ds.get("DeidentificationMethod", "")
    methods = [methods] if isinstance(methods, str) else list(methods or [])
    return str(ds.get("PatientIdentityRemoved", "")).upper() == "YES" and any(str(m).startswith("MedSight PS3.15") for m in methods)


def check_file(name: str, path: Path) -> _Checked:
    """Read the image fully (decoding its pixels) so that anything unusable is refused now, not by the worker."""
    try:
        kind = sniff(path)
        if kind not in ("dicom", "raster", "unknown"):
            raise NotAnImageError(name, f"{kind} files are not accepted here; upload DICOM, PNG or JPEG")
        image = read_image(path)
    except ImageReadError as e:
        # Report the uploaded name, not our temporary path.
        e.args = (str(e).replace(str(path), name),)
        raise
    fmt = image.meta.get("format", kind)
    meta = dict(image.meta)
    if fmt == "dicom":
        ds = dcmread(path, stop_before_pixels=True, force=True)
        meta["accession_number"] = str(ds.get("AccessionNumber", "") or "").strip() or None
        meta["study_description"] = str(ds.get("StudyDescription", "") or "").strip() or None
        meta["routing"] = StudyAttributes.from_header(ds)  # what routing reads: body part, view, age, ...
    return _Checked(name, path, fmt, image.height, image.width, meta)


def plan_study(checked: list[_Checked], declared_modality: str | None) -> tuple[str, str, str]:
    """(study UID, modality, source format) for a validated upload, or a specific refusal."""
    formats = {"dicom" if c.format == "dicom" else "raster" for c in checked}
    if len(formats) > 1:
        raise UploadError("an upload is one study: do not mix DICOM files with PNG/JPEG files")
    declared = declared_modality.strip().upper() if declared_modality and declared_modality.strip() else None
    if formats == {"dicom"}:
        uids = sorted({c.meta.get("study_instance_uid") or "" for c in checked})
        if len(uids) > 1:
            raise UploadError(f"the files belong to {len(uids)} different studies ({', '.join(u or '<none>' for u in uids)}); upload one study at a time")
        mods = sorted({(c.meta.get("modality") or "").upper() for c in checked})
        if len(mods) > 1:
            raise UploadError(f"the files have different modalities: {', '.join(mods)}")
        modality = mods[0] or declared
        if not modality:
            raise UnsupportedModalityError("the DICOM files carry no Modality (0008,0060); declare one")
        if declared and mods[0] and declared != mods[0]:
            raise UploadError(f"declared modality {declared} but the DICOM header says {mods[0]}")
        return uids[0] or generate_uid(), modality, "dicom"
    if not declared:
        raise UnsupportedModalityError("PNG/JPEG images carry no modality: declare it (e.g. modality=CR)")
    if declared not in KNOWN_MODALITIES:
        raise UnsupportedModalityError(f"unknown modality {declared!r}; use a DICOM code such as {', '.join(KNOWN_MODALITIES)}")
    return generate_uid(), declared, checked[0].format


def ingest(ctx: ServiceContext, req: UploadRequest, actor: Actor) -> Study:
    s_cfg = ctx.settings
    priority = normalise_priority(req.priority)
    work = Path(tempfile.mkdtemp(dir=ctx.store.tmp_dir, prefix="ingest-"))
    try:
        files = expand_archives(req.files, work, s_cfg.max_upload_bytes, s_cfg.max_files_per_upload)
        if s_cfg.deid_key_file is not None:
            files = deidentify_on_arrival(files, work, s_cfg.deid_key_file)
        checked = [check_file(name, path) for name, path in files]
        study_uid, modality, fmt = plan_study(checked, req.modality)
        try:
            card = ctx.catalog.choose(modality, req.model, [c.meta["routing"] for c in checked if "routing" in c.meta],
                                      override=req.override_applicability)
        except UnsupportedModalityError as e:
            keep = req.keep_not_analysed if req.keep_not_analysed is not None else req.model is None
            if e.decision is None or not keep:  # no routing decision (an unknown modality code), or the uploader's model
                raise
            card, not_analysed = None, str(e)
        with ctx.db.session() as s:
            existing = s.execute(select(Study.id).where(Study.study_uid == study_uid)).scalar_one_or_none()
        if existing is not None:
            raise DuplicateStudyError(study_uid, existing)
        shas = [ctx.store.put_file(c.path) for c in checked]  # files first, rows after
        now = utcnow()
        first = checked[0].meta
        try:
            with ctx.db.session() as s:
                study = Study(
                    study_uid=study_uid, modality=modality, model=card.name if card else "",
                    requested_priority=priority, source_format=fmt, status="queued" if card else "not_analysed",
                    not_analysed_reason=None if card else not_analysed, uploaded_by=actor.user_id, received_at=now,
                    received_epoch=_epoch(now),
                    accession_number=(req.accession_number or first.get("accession_number") or None),
                    description=(req.description or first.get("study_description") or None),
                    priority_base=base_score(s_cfg.triage, priority, None, False),
                )
                s.add(study)
                s.flush()
                seen: set[str] = set()
                for c, sha in zip(checked, shas):
                    if sha in seen:
                        continue
                    seen.add(sha)
                    s.add(_instance_row(study.id, c, sha))
                record(s, actor, "study.create", "study", study.id, study_uid=study_uid, modality=modality,
                       model=card.name if card else None, files=len(seen), priority=priority,
                       **({"applicability_override": True} if req.override_applicability else {}))
                if card is None:
                    record_not_analysed(ctx, s, study, actor, [c.path for c in checked if c.format == "dicom"])
                else:
                    ctx.queue.enqueue(s, "analyse", study.id, {}, priority=JOB_PRIORITY[priority],
                                      max_attempts=s_cfg.max_attempts)
        except IntegrityError:
            raise DuplicateStudyError(study_uid, None) from None
        return study
    finally:
        shutil.rmtree(work, ignore_errors=True)


def record_not_analysed(ctx: ServiceContext, s: Session, study: Study, actor: Actor, sources: list[Path]) -> None:
    """A stored study no model applies to: audited with the reasons, no analysis job, and, where the site sends
    results to a PACS and wants the notice (``not_analysed_notice``), a "not analysed" SR saying why no AI
    result will come (it holds no finding: :func:`medsight.integration.sr.build_not_analysed_sr`)."""
    record(s, actor, "study.not_analysed", "study", study.id, study_uid=study.study_uid, modality=study.modality,
           reason=study.not_analysed_reason)
    outputs = ctx.settings.outputs
    if not (ctx.settings.not_analysed_notice and sources and "dicom" in outputs.channels(True)):
        return
    from medsight.integration.files import encode_part10
    from medsight.integration.sr import build_not_analysed_sr

    try:
        sr = build_not_analysed_sr([dcmread(p, stop_before_pixels=True) for p in sources], study.not_analysed_reason or "",
                                   institution_name=outputs.institution_name)
        blob = ctx.store.put_bytes(encode_part10(sr))
    except Exception as e:  # noqa: BLE001 - the study is stored and on the worklist whether or not the notice is built
        record(s, actor, "deliver.build_failed", "study", study.id, error=f"{type(e).__name__}: {e}"[:500])
        return
    ctx.queue.enqueue(s, "deliver", study.id, {"channel": "dicom", "blobs": [blob], "not_analysed": True},
                      priority=40, max_attempts=outputs.max_attempts)


def _instance_row(study_id: int, c: _Checked, sha: str) -> Instance:
    return Instance(study_id=study_id, sop_instance_uid=c.meta.get("sop_instance_uid"), file_sha256=sha,
                    file_size=c.path.stat().st_size, original_name=c.name[-256:], format=c.format, rows=c.rows,
                    columns=c.columns, patient_sex=c.meta.get("patient_sex"), patient_age=c.meta.get("patient_age"))


def _epoch(naive_utc: datetime) -> float:
    return naive_utc.replace(tzinfo=timezone.utc).timestamp()


def ingest_files(ctx: ServiceContext, paths: list[Path], actor: Actor | None = None, **request: object) -> Study:
    """Files already on disk (e.g. a study the DICOM listener has completed) become a queued study.

    The files are copied into storage; the originals are left where they are.
    ``request`` takes the :class:`UploadRequest` fields (``model``, ``priority``, ...).
    """
    req = UploadRequest([(Path(p).name, Path(p)) for p in paths], **{"keep_not_analysed": True, **request})  # type: ignore[arg-type]
    return ingest(ctx, req, actor or Actor("dicom-listener", "system"))


def add_instances(ctx: ServiceContext, paths: list[Path], actor: Actor | None = None) -> tuple[Study, int]:
    """Instances that arrive after their study was created join that study, which is analysed again.

    A modality or PACS may send an instance after the listener's idle timeout handed its study
    over (a late series, an image resent after a fix). It is validated like an upload, stored,
    added to the study's record, and a new ``analyse`` job analyses the whole study again, so the
    worklist ranks it by the result over every image; the event is audited (``study.instances_added``).
    Instances the study already holds (same SOP Instance UID or same file) are skipped: with nothing
    new, nothing is queued. Returns the study and the number of instances added. Raises
    :class:`~medsight.errors.UploadError` when the study is not in the service or the files do not
    fit it (another study, another modality), and the catalog's refusal when the study's model does
    not apply to them (docs/routing.md).
    """
    actor = actor or Actor("dicom-listener", "system")
    work = Path(tempfile.mkdtemp(dir=ctx.store.tmp_dir, prefix="late-"))
    try:
        files = [(Path(p).name, Path(p)) for p in paths]
        if ctx.settings.deid_key_file is not None:
            files = deidentify_on_arrival(files, work, ctx.settings.deid_key_file)
        checked = [check_file(name, path) for name, path in files]
        study_uid, modality, _ = plan_study(checked, None)
        with ctx.db.session() as s:
            study = s.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one_or_none()
            if study is None:
                raise UploadError(f"study {study_uid} is not in the service")
            if study.modality != modality:
                raise UploadError(f"the study is {study.modality}, the new instances are {modality}")
            study_id, priority = study.id, study.requested_priority
            known = {(i.sop_instance_uid, i.file_sha256) for i in study.instances}
        if study.model:  # a study no model applies to keeps its late instances, not analysed like the rest
            ctx.catalog.choose(modality, study.model, [c.meta["routing"] for c in checked if "routing" in c.meta])
        sops, shas = {sop for sop, _ in known}, {sha for _, sha in known}
        new = [c for c in checked if not (c.meta.get("sop_instance_uid") and c.meta.get("sop_instance_uid") in sops)]
        added = []
        for c in new:
            sha = ctx.store.put_file(c.path)  # files first, rows after
            if sha not in shas:
                shas.add(sha)
                added.append((c, sha))
        if not added:
            return study, 0
        try:
            with ctx.db.session() as s:
                row = s.get(Study, study_id)
                for c, sha in added:
                    s.add(_instance_row(row.id, c, sha))
                job = None
                if row.model:
                    # always a new job: one already queued may be claimed before this transaction commits
                    job = ctx.queue.enqueue(s, "analyse", row.id, {"reason": "late instances"},
                                            priority=JOB_PRIORITY[priority], max_attempts=ctx.settings.max_attempts)
                    row.status, row.error = "queued", None  # back on the open worklist until analysed again
                record(s, actor, "study.instances_added", "study", row.id, study_uid=study_uid, files=len(added),
                       instances=len(known) + len(added), job=job.id if job else None)
        except IntegrityError:  # another process added the same files meanwhile
            return study, 0
        return row, len(added)
    finally:
        shutil.rmtree(work, ignore_errors=True)
