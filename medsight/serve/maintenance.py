"""Storage upkeep: remove blobs no row points at, and check that every referenced blob is intact.

The service writes files before the rows that reference them (see
:mod:`medsight.serve.storage`), so a transaction that fails after its files
were written leaves unreferenced blobs behind. They are harmless but take
disk space; :func:`collect_garbage` removes them. A blob younger than
``min_age_s`` is never removed, because an upload or analysis may have
written it a moment ago and not committed its rows yet.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select

from medsight.serve.context import ServiceContext
from medsight.serve.db import Instance, Job, Result


def referenced_blobs(ctx: ServiceContext) -> set[str]:
    """Every content address the database points at (instances, derived images, queued deliveries)."""
    refs: set[str] = set()
    with ctx.db.session() as s:
        refs.update(s.execute(select(Instance.file_sha256)).scalars())
        for row in s.execute(select(Result.display_sha256, Result.overlay_sha256, Result.heatmap_sha256)):
            refs.update(v for v in row if v)
        for payload in s.execute(select(Job.payload).where(Job.kind == "deliver")).scalars():
            refs.update((payload or {}).get("blobs", []))
    return refs


def stored_blobs(root: Path) -> dict[str, Path]:
    """Blobs on disk by content address (the two-level fan-out folders; ``.tmp`` is not a blob)."""
    out = {}
    for path in root.glob("??/??/*"):
        if path.is_file() and len(path.name) == 64 and path.parent.parent.name == path.name[:2]:
            out[path.name] = path
    return out


@dataclass
class GcReport:
    removed: int = 0
    removed_bytes: int = 0
    kept_recent: int = 0  # unreferenced but younger than min_age_s
    referenced: int = 0
    temp_removed: int = 0
    dry_run: bool = False
    examples: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "examples"}


def collect_garbage(ctx: ServiceContext, min_age_s: float = 24 * 3600, dry_run: bool = False,
                    now: float | None = None) -> GcReport:
    now = time.time() if now is None else now
    report = GcReport(dry_run=dry_run)
    on_disk = stored_blobs(ctx.store.root)
    refs = referenced_blobs(ctx)  # read after listing: a blob written in between is young, so kept
    for sha, path in on_disk.items():
        if sha in refs:
            report.referenced += 1
            continue
        stat = path.stat()
        if now - stat.st_mtime < min_age_s:
            report.kept_recent += 1
            continue
        report.removed += 1
        report.removed_bytes += stat.st_size
        if len(report.examples) < 5:
            report.examples.append(sha)
        if not dry_run:
            path.unlink(missing_ok=True)
    for tmp in ctx.store.tmp_dir.glob("*"):  # leftovers of writes interrupted by a crash
        if tmp.is_file() and now - tmp.stat().st_mtime >= min_age_s:
            report.temp_removed += 1
            if not dry_run:
                tmp.unlink(missing_ok=True)
    return report


@dataclass
class VerifyReport:
    checked: int = 0
    missing: list[str] = field(default_factory=list)
    corrupt: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.missing and not self.corrupt


def verify_storage(ctx: ServiceContext) -> VerifyReport:
    """Re-hash every referenced blob: detects deleted files, bit rot and tampering."""
    report = VerifyReport()
    for sha in sorted(referenced_blobs(ctx)):
        report.checked += 1
        if not ctx.store.path_for(sha).is_file():
            report.missing.append(sha)
        elif not ctx.store.verify(sha):
            report.corrupt.append(sha)
    return report


__all__ = ["collect_garbage", "verify_storage", "referenced_blobs", "GcReport", "VerifyReport"]
