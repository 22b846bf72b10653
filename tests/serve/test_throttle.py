"""Login brakes by hand: backoff arithmetic, per-client memory bound, account lock, hash slots."""

from __future__ import annotations

import threading
from datetime import datetime, timedelta

from medsight.serve.throttle import Backoff, ClientThrottle, HashSlots, account_failure, account_retry_after


def test_backoff_is_free_then_doubles_then_caps():
    b = Backoff(free_failures=3, base_s=2.0, max_s=10.0)
    assert [b.wait_after(n) for n in range(1, 8)] == [0.0, 0.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    assert b.wait_after(10_000) == 10.0  # no overflow


def test_client_throttle_waits_forgets_and_resets():
    now = [1000.0]
    t = ClientThrottle(Backoff(2, 1.0, 60.0), window_s=100.0, clock=lambda: now[0])
    assert t.retry_after("a") == 0.0
    t.failed("a")
    assert t.retry_after("a") == 0.0
    t.failed("a")  # second failure: the first that costs
    assert t.retry_after("a") == 1.0
    t.failed("a")
    assert t.retry_after("a") == 2.0 and t.retry_after("b") == 0.0
    now[0] += 1.5
    assert t.retry_after("a") == 0.5
    now[0] += 200  # past the window: forgotten
    assert t.retry_after("a") == 0.0
    t.failed("a"), t.failed("a")
    t.succeeded("a")
    assert t.retry_after("a") == 0.0


def test_client_state_is_bounded_under_a_spoofed_flood():
    t = ClientThrottle(Backoff(1, 1.0, 60.0), max_clients=100)
    for i in range(10_000):
        t.failed(f"10.0.{i // 256}.{i % 256}")
    assert len(t._state) == 100
    assert t.retry_after("10.0.39.15") > 0  # the most recent are kept


def test_account_lock_after_free_failures():
    now = datetime(2026, 12, 1, 12, 0, 0)
    b = Backoff(5, 30.0, 900.0)
    n, until = 0, None
    for _ in range(4):
        n, until = account_failure(n, now, b)
    assert n == 4 and until is None
    n, until = account_failure(n, now, b)
    assert n == 5 and until == now + timedelta(seconds=30)
    assert account_retry_after(until, now + timedelta(seconds=10)) == 20.0
    assert account_retry_after(None, now) == 0.0


def test_hash_slots_admit_at_most_n_and_others_give_up():
    slots = HashSlots(slots=2, wait_s=0.05)
    inside, release = threading.Barrier(3), threading.Event()

    def hold():
        with slots.slot() as got:
            assert got
            inside.wait()
            release.wait()

    threads = [threading.Thread(target=hold) for _ in range(2)]
    for th in threads:
        th.start()
    inside.wait()
    with slots.slot() as got:
        assert got is False
    release.set()
    for th in threads:
        th.join()
    with slots.slot() as got:
        assert got is True
