"""The audit chain's secret: an HMAC key kept in a file outside the database.

With a plain hash chain, whoever can write the database can edit an event and recompute
every later hash; ``medsight audit verify`` would pass. Keyed (HMAC-SHA256) hashes cannot
be recomputed without the key, which lives in a 0600 file beside (not inside) the data
directory, so a copy or a rewrite of the database alone does not carry it.

The file also records ``unkeyed_through``: the last audit event id written before the key
existed (0 for a new database). Those events keep their plain SHA-256 hashes and still
verify; an unkeyed event *after* it is reported, so a rewrite of the whole table as an
unkeyed chain is caught too.
"""

from __future__ import annotations

import json
import os
import secrets
from dataclasses import dataclass
from pathlib import Path

from medsight.errors import MedSightError


class AuditKeyError(MedSightError):
    """The audit key file exists but cannot be read as one."""


@dataclass(frozen=True)
class AuditKey:
    key: bytes
    unkeyed_through: int


def write_private(path: Path, text: str) -> bool:
    """Create ``path`` with mode 0600 holding ``text``; False (nothing written) if it already exists."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    with os.fdopen(fd, "w") as f:
        f.write(text)
    return True


def load_audit_key(path: Path) -> AuditKey:
    try:
        data = json.loads(path.read_text())
        return AuditKey(bytes.fromhex(data["key"]), int(data["unkeyed_through"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise AuditKeyError(f"audit key file {path} is unreadable ({e}); restore it from the backup") from e


def load_or_create_audit_key(path: Path, last_event_id: int) -> AuditKey:
    """The key in ``path``, created on first start (``last_event_id``: the newest event already in the database).

    Several processes may start at once: the file is created exclusively and the loser reads the winner's key.
    """
    if not path.exists():
        write_private(path, json.dumps({"scheme": "hmac-sha256", "key": secrets.token_hex(32),
                                        "unkeyed_through": last_event_id}))
    return load_audit_key(path)
