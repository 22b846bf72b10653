"""Keep the service's worker processes alive: ``medsight serve`` restarts one that dies.

A worker killed by the kernel's OOM killer, a segfault in a codec or ``kill -9`` must not
leave a service that accepts studies and never analyses them. The supervisor polls its
children; a dead one is restarted after an exponential backoff (1, 2, 4 ... s, capped) so
a worker that crashes at start-up does not spin, and the backoff resets once a worker has
stayed up for a while. Every restart is audited with the exit code.

Written here rather than taken from a process manager (supervisord, systemd) because the
service must keep its workers on a clinic's laptop too, where neither is configured; a site
that runs workers under systemd starts ``medsight serve --workers 0`` instead.
"""

from __future__ import annotations

import logging
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

log = logging.getLogger("medsight.serve.supervisor")

#: a worker that ran this long before dying starts again after the shortest backoff
STABLE_AFTER_S = 60.0


@dataclass
class _Slot:
    index: int
    proc: subprocess.Popen | None = None
    started: float = 0.0
    backoff_s: float = 1.0
    restart_at: float | None = None


class WorkerSupervisor:
    """Runs ``count`` copies of ``argv`` and restarts any that exits while the supervisor runs.

    ``on_restart(slot, exit_code, backoff_s)`` is called (from the supervisor's thread) when a
    dead worker is scheduled for restart; the service audits it there.
    """

    def __init__(self, argv: Sequence[str], count: int, max_backoff_s: float = 60.0, poll_s: float = 0.5, base_backoff_s: float = 1.0,
                 on_restart: Callable[[int, int, float], None] | None = None,
                 popen: Callable[..., subprocess.Popen] = subprocess.Popen):
        if count < 0:
            raise ValueError("count must be 0 or more")
        self.argv = list(argv)
        self.max_backoff_s = max_backoff_s
        self.base_backoff_s = min(base_backoff_s, max_backoff_s)
        self.poll_s = poll_s
        self.on_restart = on_restart
        self._popen = popen
        self._slots = [_Slot(i, backoff_s=self.base_backoff_s) for i in range(count)]
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.restarts = 0

    @property
    def pids(self) -> list[int | None]:
        return [s.proc.pid if s.proc is not None and s.proc.poll() is None else None for s in self._slots]

    def start(self) -> "WorkerSupervisor":
        for slot in self._slots:
            self._spawn(slot)
        if self._slots:
            self._thread = threading.Thread(target=self._watch, name="medsight-supervisor", daemon=True)
            self._thread.start()
        return self

    def _spawn(self, slot: _Slot) -> None:
        slot.proc = self._popen(self.argv)
        slot.started = time.monotonic()
        slot.restart_at = None

    def _watch(self) -> None:
        while not self._stop.wait(self.poll_s):
            now = time.monotonic()
            for slot in self._slots:
                if slot.restart_at is not None:
                    if now >= slot.restart_at and not self._stop.is_set():
                        self._spawn(slot)
                    continue
                code = slot.proc.poll() if slot.proc is not None else None
                if code is None:
                    continue
                if now - slot.started >= STABLE_AFTER_S:
                    slot.backoff_s = self.base_backoff_s
                delay = slot.backoff_s
                slot.backoff_s = min(self.max_backoff_s, slot.backoff_s * 2)
                slot.restart_at = now + delay
                self.restarts += 1
                log.warning("worker %d (pid %s) exited with code %s; restarting in %.0f s", slot.index, slot.proc.pid, code, delay)
                if self.on_restart is not None:
                    try:
                        self.on_restart(slot.index, code, delay)
                    except Exception:  # auditing must not kill the supervisor; the log line above remains
                        log.exception("could not record the restart of worker %d", slot.index)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop supervising, then terminate the workers (kill those that do not stop in ``timeout``)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        procs = [s.proc for s in self._slots if s.proc is not None]
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
