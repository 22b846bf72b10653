"""Append-only, hash-chained audit log of who read or changed what, when, from where.

Each event stores ``prev_hash`` (the previous event's hash) and
``hash = HMAC-SHA256(key, prev_hash || canonical JSON of the event)`` (``scheme``
"hmac-sha256"; the key is outside the database, :mod:`medsight.serve.audit_key`).
Editing any field of any row changes its hash; deleting a row breaks the link of the
next one; recomputing the hashes needs the key; so :func:`verify` finds all three.
Events written before the key existed keep ``hash = SHA-256(prev_hash || canonical)``
(``scheme`` NULL) and still verify. Appends are serialised (SQLite: the ``BEGIN
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
import hmac
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.orm import Session

from medsight.serve.db import AuditEvent, utcnow

GENESIS = "0" * 64
KEYED = "hmac-sha256"
#: ``Session.info`` entries through which a session's audit appends and checks find the key
KEY_INFO, UNKEYED_THROUGH_INFO = "audit_key", "audit_unkeyed_through"
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


def chain_hash(prev_hash: str, canonical_row: str, key: bytes | None = None) -> str:
    data = (prev_hash + canonical_row).encode()
    return hashlib.sha256(data).hexdigest() if key is None else hmac.new(key, data, hashlib.sha256).hexdigest()


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
    key = session.info.get(KEY_INFO)
    ev.scheme = KEYED if key else None
    ev.hash = chain_hash(prev, canonical(ev), key)
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
    """Walk the chain in insertion order; report every edited, deleted or reordered row.

    With the session's key (``Session.info``), an unkeyed event after ``unkeyed_through`` is reported:
    a chain rewritten without the key. Without it, keyed events cannot be checked and are reported.
    """
    key, unkeyed_through = session.info.get(KEY_INFO), session.info.get(UNKEYED_THROUGH_INFO, 0)
    prev, n, problems = GENESIS, 0, []
    rows = session.execute(select(AuditEvent).order_by(AuditEvent.id).execution_options(yield_per=1000)).scalars()
    for ev in rows:
        n += 1
        if ev.prev_hash != prev:
            problems.append(f"event {ev.id}: previous-hash link broken (a row before it was deleted or altered)")
        if ev.scheme == KEYED and key is None:
            problems.append(f"event {ev.id}: keyed hash, but no audit key was given (cannot check it)")
        elif ev.scheme not in (None, KEYED):
            problems.append(f"event {ev.id}: unknown hash scheme {ev.scheme!r}")
        elif ev.scheme is None and key is not None and ev.id > unkeyed_through:
            problems.append(f"event {ev.id}: unkeyed hash after the keyed chain began (the chain was rewritten)")
        elif chain_hash(ev.prev_hash, canonical(ev), key if ev.scheme == KEYED else None) != ev.hash:
            problems.append(f"event {ev.id}: content does not match its hash (the row was edited)")
        prev = ev.hash
        if len(problems) >= max_problems:
            problems.append("... stopped after too many problems")
            break
    if expect_head is not None and prev != expect_head:
        problems.append(f"head is {prev}, expected {expect_head} (events were removed from the end or added)")
    return VerifyReport(not problems, n, prev, problems)
