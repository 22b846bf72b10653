"""Login protection: slow down guessing per client and per account, and keep argon2 from starving the service.

Three independent brakes, checked in this order so a flood is rejected before any password hash:

* per client (address): after ``free_failures`` failed logins in ``window_s`` the client waits
  ``base_s * 2**k`` (capped) before its next try is even looked at; in memory, bounded in size, so a
  spoofed-address flood cannot grow it without limit;
* per account (stored on the user row, so it holds across restarts and every process, and an admin's
  ``medsight users unlock`` from another process clears it): after ``free_failures`` consecutive
  failures the account is locked for ``base_s * 2**k`` (capped);
* argon2 is deliberately CPU-heavy: at most ``hash_slots`` verifications run at once; a login that
  cannot get a slot in ``hash_wait_s`` is answered "busy, retry" instead of queueing behind a flood.

No maintained library does this for a FastAPI service without an external store (slowapi and
fastapi-limiter count requests per route, not failures per account, and the latter needs Redis).
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta


@dataclass(frozen=True)
class Backoff:
    """``free_failures`` failures are free; the next ones wait ``base_s``, ``2 * base_s`` ... at most ``max_s``."""

    free_failures: int
    base_s: float
    max_s: float

    def wait_after(self, failures: int) -> float:
        extra = failures - self.free_failures
        if extra < 0:
            return 0.0
        return min(self.max_s, self.base_s * 2.0 ** min(extra, 40))


class ClientThrottle:
    """Failed logins per client address, forgotten ``window_s`` after the last one; at most ``max_clients`` kept."""

    def __init__(self, backoff: Backoff = Backoff(10, 1.0, 300.0), window_s: float = 900.0, max_clients: int = 100_000,
                 clock=time.monotonic):  # noqa: ANN001
        self.backoff = backoff
        self.window_s = window_s
        self.max_clients = max_clients
        self._clock = clock
        self._lock = threading.Lock()
        self._state: OrderedDict[str, tuple[int, float]] = OrderedDict()  # client -> (failures, last failure)

    def retry_after(self, client: str) -> float:
        """Seconds the client must still wait (0: it may try now)."""
        with self._lock:
            got = self._state.get(client)
            if got is None:
                return 0.0
            failures, last = got
            now = self._clock()
            if now - last > self.window_s:
                del self._state[client]
                return 0.0
            return max(0.0, last + self.backoff.wait_after(failures) - now)

    def failed(self, client: str) -> int:
        with self._lock:
            failures, last = self._state.pop(client, (0, 0.0))
            now = self._clock()
            failures = 1 if now - last > self.window_s else failures + 1
            self._state[client] = (failures, now)
            while len(self._state) > self.max_clients:
                self._state.popitem(last=False)  # the least recently failing client
            return failures

    def succeeded(self, client: str) -> None:
        with self._lock:
            self._state.pop(client, None)


def account_retry_after(locked_until: datetime | None, now: datetime) -> float:
    return 0.0 if locked_until is None else max(0.0, (locked_until - now).total_seconds())


def account_failure(failed_logins: int, now: datetime, backoff: Backoff) -> tuple[int, datetime | None]:
    """(new failure count, locked-until or None) after one more failed password for the account."""
    failures = failed_logins + 1
    wait = backoff.wait_after(failures)
    return failures, (now + timedelta(seconds=wait)) if wait > 0 else None


class HashSlots:
    """At most ``slots`` password verifications at once; others wait ``wait_s`` and then give up."""

    def __init__(self, slots: int = 2, wait_s: float = 2.0):
        self._sem = threading.BoundedSemaphore(max(1, slots))
        self.wait_s = wait_s

    @contextmanager
    def slot(self) -> Iterator[bool]:
        """``with slots.slot() as got:`` -- ``got`` is False when no slot freed up in time."""
        got = self._sem.acquire(timeout=self.wait_s)
        try:
            yield got
        finally:
            if got:
                self._sem.release()


@dataclass
class LoginGuard:
    """The three brakes of one web process, built from the service settings."""

    clients: ClientThrottle
    account: Backoff
    slots: HashSlots

    @classmethod
    def from_settings(cls, cfg) -> LoginGuard:  # noqa: ANN001 - ServiceSettings
        return cls(ClientThrottle(Backoff(cfg.client_free_failures, 1.0, cfg.client_backoff_max_s)),
                   Backoff(cfg.login_free_failures, cfg.login_lock_base_s, cfg.login_lock_max_s),
                   HashSlots(cfg.hash_slots, cfg.hash_wait_s))


class RepeatReads:
    """Which (session, view) reads were audited within the last ``interval_s``: a page's auto-refresh and a
    polling client repeat the same read every few seconds, and one audit row per interval says the same."""

    def __init__(self, interval_s: float, max_keys: int = 100_000, clock=time.monotonic):  # noqa: ANN001
        self.interval_s, self.max_keys, self._clock = interval_s, max_keys, clock
        self._lock = threading.Lock()
        self._seen: OrderedDict[tuple, float] = OrderedDict()

    def due(self, key: tuple) -> bool:
        """True (and remembered) when ``key`` was not audited within the interval."""
        now = self._clock()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last < self.interval_s:
                return False
            self._seen.pop(key, None)
            self._seen[key] = now
            while len(self._seen) > self.max_keys:
                self._seen.popitem(last=False)
            return True
