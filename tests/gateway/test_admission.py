"""Nobody who can reach the listener can block it: connections that send nothing, garbage or half a request
are closed (after the ACSE timeout, or sooner when newer connections wait), associations are limited in all
and per peer, each such connection is logged in one line and no thread dies with a traceback.

The probe this answers: ten connections that opened and closed at once made every association fail with
"Local Limit Exceeded" for 59 s, and a truncated A-ASSOCIATE-RQ held its slot for ever.
"""

from __future__ import annotations

import logging
import random
import socket
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, sop_class
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context

from medsight.gateway.listener import ListenerConfig, StorageSCP

from tests.integration.conftest import tool, wait_for

pytestmark = [pytest.mark.filterwarnings("ignore::UserWarning"),  # pydicom warns about the mutated UIDs it decodes
              pytest.mark.filterwarnings("error::pytest.PytestUnhandledThreadExceptionWarning")]


def association_request(calling: str, called: str = "MEDSIGHT") -> bytes:
    """A well-formed A-ASSOCIATE-RQ PDU proposing Verification, as a requestor sends it."""
    prim = A_ASSOCIATE()
    prim.application_context_name = "1.2.840.10008.3.1.1.1"
    prim.calling_ae_title, prim.called_ae_title = calling, called
    max_length = MaximumLengthNotification()
    max_length.maximum_length_received = 16382
    implementation = ImplementationClassUIDNotification()
    implementation.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
    prim.user_information = [max_length, implementation]
    cx = build_context(sop_class.Verification)
    cx.context_id = 1
    prim.presentation_context_definition_list = [cx]
    pdu = A_ASSOCIATE_RQ()
    pdu.from_primitive(prim)
    return pdu.encode()


INTRUDER_RQ = association_request("INTRUDER")  # an attacker who does not know a configured AE title


def mutate(data: bytes, rnd: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rnd.randint(1, 8)):
        buf[rnd.randrange(len(buf))] = rnd.randrange(256)
    return bytes(buf)


def junk_connections(port: int, n: int, seed: int = 13) -> list[socket.socket]:
    """``n`` connections from one peer, in turn: open-and-close, open-and-hold-silent, random bytes, a truncated
    and a mutated A-ASSOCIATE-RQ. Returns the sockets left open (the caller holds them, then closes them)."""
    rnd, held = random.Random(seed), []
    for k in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        kind = k % 5
        if kind == 0:
            s.close()
            continue
        if kind == 2:
            s.sendall(rnd.randbytes(rnd.randint(1, 300)))
        elif kind == 3:
            s.sendall(INTRUDER_RQ[: rnd.randint(1, len(INTRUDER_RQ) - 1)])  # the header promises more
        elif kind == 4:
            s.sendall(mutate(INTRUDER_RQ, rnd))
        held.append(s)
    return held


def echoscu(port: int, called: str = "MEDSIGHT") -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    r = subprocess.run([tool("echoscu"), "-to", "5", "-ta", "5", "-aet", "ECHOSCU", "-aec", called, "127.0.0.1", str(port)],
                       capture_output=True, text=True, timeout=30)
    return r, time.monotonic() - start


def pynetdicom_echo(port: int, bind: str = "127.0.0.1", calling: str = "ECHOSCU"):  # noqa: ANN201
    """(status or None, association) of a C-ECHO from ``bind``; the association is left open for the caller."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.add_requested_context(sop_class.Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title="MEDSIGHT", bind_address=(bind, 0))
    return (assoc.send_c_echo() if assoc.is_established else None), assoc


def connection_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    """The one line per connection that ended without an association (dropped, closed or rejected)."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("medsight.gateway")
            and r.getMessage().startswith(("connection from", "association rejected", "association from"))]


def tracebacks(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or "Traceback" in r.getMessage()]


def gate_listener(tmp_path: Path, **config) -> StorageSCP:
    cfg = ListenerConfig(port=0, data_dir=tmp_path / "scp", allowed_calling_aets=("ECHOSCU", "FUZZER"), idle_timeout=3600,
                         **config)
    return StorageSCP(cfg)


def test_a_hundred_junk_connections_from_one_peer_do_not_block_echo(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    with gate_listener(tmp_path) as scp:  # the defaults: what an operator gets without tuning anything
        held = junk_connections(scp.port, 100)
        try:
            r, took = echoscu(scp.port)
            assert r.returncode == 0, r.stderr
            assert took < 2.0, f"echoscu took {took:.1f} s"
            start = time.monotonic()
            status, assoc = pynetdicom_echo(scp.port)
            assoc.release()
            assert status is not None and status.Status == 0x0000
            assert time.monotonic() - start < 2.0
        finally:
            for s in held:
                s.close()
        # one line per junk connection, however it ended; the echoes' associations are not among them
        wait_for(lambda: len(connection_lines(caplog)) >= 100, timeout=15)
        time.sleep(0.5)
        # under a loaded machine a rejected mutated request can also log its socket's close: allow that one
        # extra line, never a flood of them (the issue's own goal is the echo above)
        assert 100 <= len(connection_lines(caplog)) <= 102, "\n".join(connection_lines(caplog))
        # no slot or thread is left to a dead socket
        wait_for(lambda: not scp._server.active_associations, timeout=10)
    assert tracebacks(caplog) == []
    assert not [r for r in caplog.records if r.name.startswith(("pynetdicom", "pydicom")) and r.levelno >= logging.WARNING]


@pytest.mark.parametrize("payload", [b"", INTRUDER_RQ[:40]], ids=["silent", "truncated-request"])
def test_a_connection_without_an_association_is_closed_after_the_acse_timeout(tmp_path: Path, caplog, payload: bytes) -> None:
    caplog.set_level(logging.INFO)
    with gate_listener(tmp_path, acse_timeout=1.0) as scp:
        s = socket.create_connection(("127.0.0.1", scp.port), timeout=10)
        s.sendall(payload)
        start = time.monotonic()
        while s.recv(4096):  # an A-ABORT may come first; then the listener closes
            pass
        waited = time.monotonic() - start
        s.close()
        assert 0.5 < waited < 4.0
        wait_for(lambda: connection_lines(caplog))
    (line,) = connection_lines(caplog)
    assert "127.0.0.1" in line and tracebacks(caplog) == []


def test_associations_are_limited_in_all_and_per_peer(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO)
    with gate_listener(tmp_path, max_associations=3, max_per_peer=2) as scp:
        opened = []
        try:
            for bind in ("127.0.0.1", "127.0.0.1"):
                status, assoc = pynetdicom_echo(scp.port, bind)
                assert status.Status == 0x0000
                opened.append(assoc)
            status, third = pynetdicom_echo(scp.port, "127.0.0.1")  # a third from the same address
            assert status is None and third.is_rejected
            assert (third.acceptor.primitive.result, third.acceptor.primitive.diagnostic) == (0x02, 0x02)  # transient, local limit
            status, other = pynetdicom_echo(scp.port, "127.0.0.2")  # another peer still gets in
            assert status.Status == 0x0000
            opened.append(other)
            status, fourth = pynetdicom_echo(scp.port, "127.0.0.3")  # but not past the total
            assert status is None and fourth.is_rejected
        finally:
            for assoc in opened:
                assoc.release()
        status, again = pynetdicom_echo(scp.port, "127.0.0.1")  # released slots are free again
        again.release()
        assert status.Status == 0x0000
    rejected = [line for line in connection_lines(caplog) if "rejected" in line]
    assert len(rejected) == 2 and "per peer" in rejected[0] and "limit 3" in rejected[1]


# -- PDU fuzzing: random bytes, PDU headers of every type, truncated and mutated association requests ------------

FUZZER_RQ = association_request("FUZZER")  # mutations of a request the listener would accept reach deeper


@st.composite
def pdus(draw) -> bytes:
    kind = draw(st.sampled_from(["random", "header", "truncated", "mutated", "mutated"]))
    if kind == "random":
        return draw(st.binary(min_size=1, max_size=512))
    if kind == "header":  # any PDU type, a true or a false length, then a body
        body = draw(st.binary(max_size=256))
        length = draw(st.sampled_from([len(body), len(body) + 100, 0, 0xFFFFFFFF]))
        return bytes([draw(st.integers(1, 7)), 0]) + length.to_bytes(4, "big") + body
    base = draw(st.sampled_from([FUZZER_RQ, INTRUDER_RQ]))
    if kind == "truncated":
        return base[: draw(st.integers(1, len(base) - 1))]
    return mutate(base, random.Random(draw(st.integers(0, 2**32))))


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory):
    """A listener with a short ACSE timeout, and every log record it produces while it is fuzzed."""
    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.DEBUG)
    handler.emit = records.append
    root = logging.getLogger()
    root.addHandler(handler)
    scp = gate_listener(tmp_path_factory.mktemp("pdu-fuzz"), acse_timeout=1.0).start()
    yield scp, records
    scp.stop()
    root.removeHandler(handler)


@settings(max_examples=300, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=pdus())
def test_random_and_mutated_association_requests(fuzzed, data: bytes) -> None:
    scp, _ = fuzzed
    with socket.create_connection(("127.0.0.1", scp.port), timeout=5) as s:
        s.sendall(data)


def test_echoscu_succeeds_after_pdu_fuzzing_and_no_traceback_was_logged(fuzzed) -> None:
    scp, records = fuzzed
    wait_for(lambda: not scp._server.active_associations, timeout=20)  # every fuzzed connection has ended
    r, took = echoscu(scp.port)
    assert r.returncode == 0, r.stderr
    assert took < 2.0
    assert [(r.name, r.getMessage()) for r in records if r.exc_info or "Traceback" in r.getMessage()] == []
    assert [r for r in records if r.name.startswith("medsight.gateway")], "the dropped connections were not logged"
