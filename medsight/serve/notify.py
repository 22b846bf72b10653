"""Critical-result notifications: a webhook POST, delivered by the job queue with retry.

A critical result enqueues a ``notify`` job in the same transaction that stores
the result, so the notification cannot be lost if the worker dies right after.
Delivery is at-least-once (a worker can die after the receiver got the POST but
before the job is marked done); every POST carries an ``Idempotency-Key``
header, stable across retries, so a receiver can drop duplicates. Failures are
retried with exponential backoff (``backoff_base_s * 2**(attempt-1)``, capped).
"""

from __future__ import annotations

from typing import Any

import httpx

from medsight.serve.config import WebhookSettings
from medsight.serve.db import Study


def critical_payload(study: Study, public_url: str) -> dict[str, Any]:
    """What a receiver (pager, chat bridge, RIS) needs to act; no patient identifiers."""
    return {
        "event": "critical_result",
        "study_id": study.id,
        "study_uid": study.study_uid,
        "accession_number": study.accession_number,
        "modality": study.modality,
        "model": study.model,
        "finding": study.finding,
        "critical_probability": round(study.critical_probability or 0.0, 4),
        "requested_priority": study.requested_priority,
        "refer": study.refer,
        "url": f"{public_url.rstrip('/')}/studies/{study.id}",
        "analysed_at": study.analysed_at.isoformat() + "Z" if study.analysed_at else None,
    }


def backoff_seconds(cfg: WebhookSettings, attempt: int) -> float:
    return min(cfg.backoff_base_s * (2 ** max(attempt - 1, 0)), cfg.backoff_max_s)


class DeliveryError(Exception):
    pass


def deliver(cfg: WebhookSettings, url: str, payload: dict[str, Any], idempotency_key: str,
            client: httpx.Client | None = None) -> int:
    """POST once; return the HTTP status, raise :class:`DeliveryError` on a network error or non-2xx reply."""
    headers = {"Idempotency-Key": idempotency_key, "User-Agent": "medsight-notify/1"}
    own = client is None
    client = client or httpx.Client(timeout=cfg.timeout_s)
    try:
        r = client.post(url, json=payload, headers=headers)
    except httpx.HTTPError as e:
        raise DeliveryError(f"{type(e).__name__}: {e}") from e
    finally:
        if own:
            client.close()
    if not 200 <= r.status_code < 300:
        raise DeliveryError(f"receiver answered HTTP {r.status_code}")
    return r.status_code
