"""Content-addressed file storage: a file's name is the SHA-256 of its bytes.

Writes go to a temporary file in the same folder, are fsync'ed, then renamed
into place with ``os.replace`` (atomic on POSIX) and the folder is fsync'ed, so
a crash leaves either no file or the complete file under its final name. The
service writes files *before* the database rows that point at them, so the
database can never reference a half-written file; a crash between the two
leaves only an unreferenced blob, which is harmless (and identical content is
stored once).
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

from medsight.errors import MedSightError


class StorageError(MedSightError):
    """A stored blob is missing or does not match its content address."""


class FileStore:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.tmp_dir = self.root / ".tmp"
        self.tmp_dir.mkdir(exist_ok=True)

    def path_for(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise StorageError(f"not a SHA-256 content address: {sha256!r}")
        return self.root / sha256[:2] / sha256[2:4] / sha256

    def put_bytes(self, data: bytes) -> str:
        return self.put_stream(io.BytesIO(data))

    def put_file(self, path: Path) -> str:
        with open(path, "rb") as f:
            return self.put_stream(f)

    def put_stream(self, stream: io.RawIOBase | io.BufferedIOBase) -> str:
        """Store a stream; returns its SHA-256. Idempotent for identical content."""
        h = hashlib.sha256()
        fd, tmp = tempfile.mkstemp(dir=self.tmp_dir, prefix="put-")
        try:
            with os.fdopen(fd, "wb") as out:
                for chunk in iter(lambda: stream.read(1 << 20), b""):
                    h.update(chunk)
                    out.write(chunk)
                out.flush()
                os.fsync(out.fileno())
            digest = h.hexdigest()
            final = self.path_for(digest)
            if final.exists() and final.stat().st_size == os.path.getsize(tmp):
                os.unlink(tmp)
                return digest
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, final)
            _fsync_dir(final.parent)
            return digest
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def open(self, sha256: str):  # noqa: ANN201 - binary file object
        path = self.path_for(sha256)
        if not path.is_file():
            raise StorageError(f"stored file {sha256} is missing from {self.root}")
        return open(path, "rb")

    def read_bytes(self, sha256: str) -> bytes:
        with self.open(sha256) as f:
            return f.read()

    def verify(self, sha256: str) -> bool:
        """True when the blob exists and still hashes to its name (detects bit rot or tampering)."""
        h = hashlib.sha256()
        try:
            with self.open(sha256) as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
        except StorageError:
            return False
        return h.hexdigest() == sha256


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
