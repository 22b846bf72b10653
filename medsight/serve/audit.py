"""Append-only, hash-chained audit log of who read or changed what, when, from where.

Each event stores ``prev_hash`` (the previous event's hash) and
``hash = SHA-256(prev_hash || canonical JSON of the event)``. Editing any field of
any row changes its hash; deleting a row breaks the link of the next one; so
:func:`verify` finds both. Appends are serialised (SQLite: the ``BEGIN
IMMEDIATE`` write lock; PostgreSQL: a transaction-scoped advisory lock) and
``prev_hash`` is unique, so concurrent writers cannot fork the chain.

Truncating the *tail* of the log leaves a valid, shorter chain; to detect that,
keep the head hash that ``medsight audit verify`` prints somewhere else (a
ticket, a WORM store) and pass it back with ``--expect-head``.

Hand-written because no maintained Python library offers a tamper-evident log
inside an existing SQL database; the construction is the standard hash chain.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from medsight.serve.db import AuditEvent, utcnow

GENESIS = "0" * 64
_PG_LOCK_KEY = 0x4D53_4155  # "MSAU": arbitrary constant naming the audit-append lock


@dataclass(frozen=True)
class Actor:
    """Who acts: a logged-in user, a worker process, or a command-line operator."""

    name: str
    role: str | None = None
    user_id: int | None = None
    client_ip: str | None = None


def canonical(ev: AuditEvent | dict[str, Any]) -> str:
    get = ev.get if isinstance(ev, dict) else lambda k: getattr(ev, k)
    ts = get("ts")
    body = {
        "ts": ts.isoformat(timespec="microseconds") if isinstance(ts, datetime) else str(ts),
        "actor": get("actor"), "role": get("role"), "action": get("action"),
        "object_type": get("object_type"), "object_id": get("object_id"),
        "client_ip": get("client_ip"), "detail": get("detail") or {},
    }
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=str)


def chain_hash(prev_hash: str, canonical_row: str) -> str:
    return hashlib.sha256((prev_hash + canonical_row).encode()).hexdigest()


def record(session: Session, actor: Actor, action: str, object_type: str, object_id: object = None,
           **detail: Any) -> AuditEvent:
    """Append one event inside the caller's transaction (it commits or rolls back with the work it describes)."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _PG_LOCK_KEY})
    head = session.execute(select(AuditEvent.hash).order_by(AuditEvent.id.desc()).limit(1)).scalar_one_or_none()
    prev = head or GENESIS
    ev = AuditEvent(
        ts=utcnow(), actor=actor.name, role=actor.role, action=action, object_type=object_type,
        object_id=None if object_id is None else str(object_id), client_ip=actor.client_ip,
        detail=json.loads(json.dumps(detail, default=str)), prev_hash=prev,
    )
    ev.hash = chain_hash(prev, canonical(ev))
    session.add(ev)
    session.flush()
    return ev


@dataclass(frozen=True)
class Auditor:
    """``record`` bound to one transaction and the actor doing the work in it.

    A request gets one (``medsight.serve.deps.Audit``), so a handler or use case names
    only what it did: ``audit("study.read", "study", study_id)``. ``actor`` overrides the
    bound one where nobody is logged in yet (a login attempt).
    """

    session: Session
    actor: Actor | None = None

    def __call__(self, action: str, object_type: str, object_id: object = None, *, actor: Actor | None = None,
                 **detail: Any) -> AuditEvent:
        who = actor or self.actor
        if who is None:
            raise RuntimeError(f"audit {action!r}: no actor (the route has no role gate and none was given)")
        return record(self.session, who, action, object_type, object_id, **detail)


@dataclass
class VerifyReport:
    ok: bool
    checked: int
    head: str
    problems: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "checked": self.checked, "head": self.head, "problems": self.problems}


def verify(session: Session, expect_head: str | None = None, max_problems: int = 50) -> VerifyReport:
    """Walk the chain in insertion order; report every edited, deleted or reordered row."""
    prev, n, problems = GENESIS, 0, []
    rows = session.execute(select(AuditEvent).order_by(AuditEvent.id).execution_options(yield_per=1000)).scalars()
    for ev in rows:
        n += 1
        if ev.prev_hash != prev:
            problems.append(f"event {ev.id}: previous-hash link broken (a row before it was deleted or altered)")
        if chain_hash(ev.prev_hash, canonical(ev)) != ev.hash:
            problems.append(f"event {ev.id}: content does not match its hash (the row was edited)")
        prev = ev.hash
        if len(problems) >= max_problems:
            problems.append("... stopped after too many problems")
            break
    if expect_head is not None and prev != expect_head:
        problems.append(f"head is {prev}, expected {expect_head} (events were removed from the end or added)")
    return VerifyReport(not problems, n, prev, problems)
