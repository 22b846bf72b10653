"""Who may hold a connection to the DICOM listener, and for how long before it says who it is.

pynetdicom gives every TCP connection an association thread and counts those
threads against ``maximum_associations`` whether or not the peer ever sends an
A-ASSOCIATE-RQ; an accepted socket reads without a timeout, the TLS handshake
runs on the thread that accepts connections, and a malformed request can kill a
reactor thread with an unhandled exception. A few connections that send nothing,
or half a PDU, could thus lock a listener for a minute, or for ever.

:class:`ConnectionGate` keeps its own account, in which only *associations*
(an A-ASSOCIATE-RQ within the limits, then accepted) hold a slot:

* a connection reads under the ACSE timeout until its association is accepted
  (then under the network timeout), so half a PDU holds a thread for seconds;
* at most ``max_associations`` connections without an association are kept, and
  ``max_per_peer`` from one address: a newcomer evicts the oldest of them (a live
  requestor sends its A-ASSOCIATE-RQ within milliseconds of connecting, a dead or
  hostile one never does, so the newest is the one worth keeping);
* an A-ASSOCIATE-RQ beyond ``max_associations`` associations, or ``max_per_peer``
  from one address, is rejected (transient, local limit exceeded);
* the TLS handshake runs on the connection's own thread, under the ACSE timeout;
* a connection that ends without an association is logged in one line, with the
  reason pynetdicom gave: pynetdicom's own messages and tracebacks about such a
  peer's bytes are folded into that line, and an exception that escapes one of a
  connection's threads closes that connection, in one line, instead of killing the
  thread with a traceback and leaving the socket open.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import sys
import threading
import time
import weakref
from dataclasses import dataclass, field

from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger("medsight.gateway.admission")

#: Loggers whose records about a peer that has no association are folded into the gate's one line.
_PEER_NOISE_LOGGERS = ("pynetdicom", "pydicom")
_gates: weakref.WeakSet[ConnectionGate] = weakref.WeakSet()
_install_lock = threading.Lock()
_installed = False


@dataclass
class _Connection:
    peer: str
    port: int
    sock: socket.socket
    opened: float = field(default_factory=time.monotonic)
    assoc: object | None = None  # pynetdicom Association, once the connection has one
    associated: bool = False  # holds an association slot: reserved on request, kept once accepted
    dropped: bool = False  # hung up by the gate; known until its threads end, so their last words are folded too
    why: str = ""  # the first complaint pynetdicom logged about this peer's bytes
    told: bool = False  # a line saying how this connection ended was logged

    @property
    def key(self) -> tuple[str, int]:
        return self.peer, self.port

    @property
    def waiting(self) -> bool:
        return not (self.associated or self.dropped)

    def runs_on(self, thread: threading.Thread) -> bool:
        return self.assoc is not None and (thread is self.assoc or thread is getattr(self.assoc, "dul", None))

    def ended(self) -> bool:
        if self.assoc is None:
            return self.sock.fileno() == -1
        return all(t.ident is not None and not t.is_alive() for t in (self.assoc, self.assoc.dul))


def _key(assoc) -> tuple[str, int]:  # noqa: ANN001 - pynetdicom Association
    return assoc.requestor.address, assoc.requestor.port


def _release_waiting_thread(assoc) -> None:  # noqa: ANN001 - pynetdicom Association
    """The connection is gone: an acceptor thread still waiting (ACSE timeout) for its A-ASSOCIATE-RQ ends now.

    ``None`` is what that wait returns when it times out; the thread then ends. A request that
    arrived just before is still taken first, and the stray ``None`` reaches no one that matters.
    """
    if assoc.requestor.primitive is None:
        assoc.dul.to_user_queue.put(None)


def _hang_up(sock: socket.socket) -> None:
    """End the TCP connection under whichever thread reads it (an SSL socket is shut down at the socket level)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except OSError:
        pass


class ConnectionGate:
    """The listener's account of its open connections; see the module docstring for the policy."""

    def __init__(self, max_associations: int, max_per_peer: int, acse_timeout: float, network_timeout: float | None):
        self.max_associations = max_associations
        self.max_per_peer = max_per_peer
        self.acse_timeout = acse_timeout
        self.network_timeout = network_timeout
        self._lock = threading.Lock()
        self._open: dict[tuple[str, int], _Connection] = {}
        _gates.add(self)
        _filter_peer_noise()

    # -- the accepting thread -----------------------------------------------
    def admit(self, sock: socket.socket, address: tuple) -> None:
        """A new TCP connection: keep it, evicting the oldest connections that have no association."""
        sock.settimeout(self.acse_timeout)
        new = _Connection(str(address[0]), int(address[1]), sock)
        with self._lock:
            ended = self._prune()
            waiting = sorted((c for c in self._open.values() if c.waiting), key=lambda c: c.opened)
            mine = [c for c in waiting if c.peer == new.peer]
            evicted = mine[: max(0, len(mine) - self.max_per_peer + 1)]
            rest = [c for c in waiting if c not in evicted]
            evicted += rest[: max(0, len(rest) - self.max_associations + 1)]
            untold = self._drop(evicted)
            self._open[new.key] = new
        for c in ended:
            self._log_end(c)
        for c in untold:
            log.warning("connection from %s dropped after %.1f s without an association: newer connections are waiting%s",
                        c.peer, time.monotonic() - c.opened, f" ({c.why})" if c.why else "")
        for c in evicted:
            _hang_up(c.sock)

    def wrapped(self, address: tuple, sock: socket.socket) -> None:
        """The connection now reads through TLS: evictions must shut down the wrapped socket."""
        with self._lock:
            c = self._open.get((str(address[0]), int(address[1])))
            if c is not None:
                c.sock = sock

    def refused(self, address: tuple, reason: str) -> None:
        """The connection failed before pynetdicom took it (TLS handshake, request handler): one line."""
        with self._lock:
            c = self._open.pop((str(address[0]), int(address[1])), None)
            told = c is not None and c.told
            if c is not None:
                c.told = True
        if not told:
            log.warning("connection from %s dropped: %s", address[0], reason)

    # -- association events (pynetdicom's threads) ----------------------------
    def handlers(self) -> list:
        return [(evt.EVT_CONN_OPEN, self._on_open), (evt.EVT_REQUESTED, self._on_requested),
                (evt.EVT_ACCEPTED, self._on_accepted), (evt.EVT_REJECTED, self._on_rejected),
                (evt.EVT_CONN_CLOSE, self._on_close)]

    def _connection(self, assoc) -> _Connection | None:  # noqa: ANN001 - caller holds the lock
        c = self._open.get(_key(assoc))
        return c if c is not None and c.assoc is assoc else None

    def _on_open(self, event) -> None:  # noqa: ANN001
        """The connection's association thread exists (not yet started): guard it and its reactor thread."""
        with self._lock:
            c = self._open.get(_key(event.assoc))
            if c is not None:
                c.assoc = event.assoc
        for thread in (event.assoc, event.assoc.dul):
            thread.run = self._guarded(thread, thread.run)

    def _guarded(self, thread: threading.Thread, run):  # noqa: ANN001, ANN202
        def run_guarded() -> None:
            try:
                run()
            except Exception as exc:  # noqa: BLE001 - a peer's bytes must not kill a thread with its socket open
                self.crashed(thread, exc)
        return run_guarded

    def _on_requested(self, event) -> None:  # noqa: ANN001
        """Reserve an association slot for this request, or reject it (transient: the requestor may retry)."""
        assoc = event.assoc
        with self._lock:
            c = self._connection(assoc)
            if c is None or c.dropped:
                return  # hung up meanwhile: negotiation fails on its own
            busy = [o for o in self._open.values() if o.associated and not o.dropped]
            same_peer = sum(o.peer == c.peer for o in busy)
            if len(busy) >= self.max_associations:
                reason = f"{len(busy)} associations open (limit {self.max_associations})"
            elif same_peer >= self.max_per_peer:
                reason = f"{same_peer} associations open from {c.peer} (limit {self.max_per_peer} per peer)"
            else:
                c.associated, reason = True, None
            c.told = reason is not None
        if reason is None:
            return
        log.warning("association from %r at %s rejected: %s", assoc.requestor.ae_title, c.peer, reason)
        assoc.acse.send_reject(0x02, 0x03, 0x02)  # rejected transient, service provider, local limit exceeded
        assoc.kill()  # as pynetdicom does after its own rejections: the A-ASSOCIATE-RJ is sent before the socket closes

    def _on_accepted(self, event) -> None:  # noqa: ANN001
        try:
            event.assoc.dul.socket.socket.settimeout(self.network_timeout)
        except (AttributeError, OSError):  # the peer is gone already: its reactor sees that on its own
            pass

    def _on_rejected(self, event) -> None:  # noqa: ANN001
        """pynetdicom rejected the request (AE titles): the slot is free, and the listener logged why."""
        with self._lock:
            c = self._connection(event.assoc)
            if c is not None:
                c.associated, c.told = False, True

    def _on_close(self, event) -> None:  # noqa: ANN001
        _release_waiting_thread(event.assoc)
        with self._lock:
            c = self._connection(event.assoc)
            if c is None:
                return
            del self._open[c.key]
        self._log_end(c)

    def crashed(self, thread: threading.Thread, exc: BaseException) -> None:
        """An exception escaped one of a connection's threads: close that connection, in one line."""
        c = self.connection_on(thread)
        if c is None:
            log.warning("a DICOM connection thread failed (%s: %s)", type(exc).__name__, exc)
            return
        with self._lock:
            untold = self._drop([c])
        if untold:
            what = "association" if c.associated else "association request"
            log.warning("connection from %s dropped: pynetdicom failed on its %s (%s: %s)", c.peer, what,
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
        _hang_up(c.sock)
        c.assoc.dul.kill_dul()
        _release_waiting_thread(c.assoc)

    def sweep(self) -> None:
        """Tell the end of connections pynetdicom closed without a close event (a timeout while reading half a PDU)."""
        with self._lock:
            ended = self._prune()
        for c in ended:
            self._log_end(c)

    def close(self) -> None:
        """The listener stops: hang up on connections without an association (associations run to their end)."""
        with self._lock:
            waiting = [c for c in self._open.values() if c.waiting]
            self._drop(waiting)
            for c in waiting:
                c.told = True
        for c in waiting:
            _hang_up(c.sock)

    # -- bookkeeping (the _prune and _drop callers hold the lock) ---------------
    def _drop(self, conns: list[_Connection]) -> list[_Connection]:
        """Mark connections hung up; return those whose end is still to be told."""
        untold = [c for c in conns if not c.told]
        for c in conns:
            c.dropped, c.told = True, True
        return untold

    def _prune(self) -> list[_Connection]:
        """Forget connections whose threads ended without a close event; return those whose end is untold."""
        ended = [c for c in self._open.values() if c.ended()]
        for c in ended:
            del self._open[c.key]
        return ended

    def _log_end(self, c: _Connection) -> None:
        if c.associated or c.told:
            return
        c.told = True
        age = time.monotonic() - c.opened
        if c.why:
            log.warning("connection from %s closed after %.1f s without an association: %s", c.peer, age, c.why)
        elif age >= self.acse_timeout * 0.9:
            log.warning("connection from %s closed: no association request within %.1f s", c.peer, self.acse_timeout)
        else:
            log.info("connection from %s closed by the peer after %.1f s without an association", c.peer, age)

    def connection_on(self, thread: threading.Thread) -> _Connection | None:
        with self._lock:
            return next((c for c in self._open.values() if c.runs_on(thread)), None)


class GatedAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with a :class:`ConnectionGate` at the door.

    Built by ``AE.make_server(..., server_class=GatedAssociationServer, gate=gate)``.
    """

    request_queue_size = 64  # a burst of connections waits in the kernel instead of being dropped
    daemon_threads = True  # stopping the listener does not wait for a peer's TLS handshake

    def __init__(self, *args, gate: ConnectionGate, **kwargs):  # noqa: ANN002, ANN003
        self.gate = gate
        super().__init__(*args, **kwargs)

    def get_request(self) -> tuple[socket.socket, tuple]:
        """Accept only; the TLS handshake happens on the connection's thread (:meth:`process_request_thread`)."""
        return self.socket.accept()

    def verify_request(self, request, client_address) -> bool:  # noqa: ANN001
        self.gate.admit(request, client_address)
        return True

    def process_request_thread(self, request, client_address) -> None:  # noqa: ANN001
        if self.ssl_context is not None:
            try:
                request = self.ssl_context.wrap_socket(request, server_side=True)  # bounded by the ACSE timeout
            except (OSError, ValueError) as exc:
                self.gate.refused(client_address, f"TLS handshake failed ({type(exc).__name__}: {exc})")
                self.shutdown_request(request)
                return
            self.gate.wrapped(client_address, request)
        super().process_request_thread(request, client_address)

    def handle_error(self, request, client_address) -> None:  # noqa: ANN001
        exc = sys.exc_info()[1]
        self.gate.refused(client_address, f"{type(exc).__name__}: {exc}")

    def shutdown(self) -> None:
        # pynetdicom's shutdown also removes the server from AE._servers, where make_server() never put it
        socketserver.BaseServer.shutdown(self)
        self.server_close()
        self.gate.close()


class _PeerNoise(logging.Filter):
    """Fold what pynetdicom (and pydicom, decoding UIDs) log about a peer without an association into its one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        thread = threading.current_thread()
        for gate in list(_gates):
            c = gate.connection_on(thread)
            if c is not None and not c.associated:
                if record.levelno >= logging.WARNING and not c.why:
                    c.why = record.getMessage().splitlines()[0][:200]
                return False
        return True


def _filter_peer_noise() -> None:
    """Attach :class:`_PeerNoise` to pynetdicom's and pydicom's loggers, once per process (others' records pass)."""
    global _installed
    with _install_lock:
        if _installed:
            return
        noise = _PeerNoise()
        names = [n for n in list(logging.root.manager.loggerDict) if n.split(".")[0] in _PEER_NOISE_LOGGERS]
        for name in {*names, *_PEER_NOISE_LOGGERS}:
            logging.getLogger(name).addFilter(noise)
        _installed = True


__all__ = ["ConnectionGate", "GatedAssociationServer"]
