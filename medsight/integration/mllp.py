"""Send an HL7 v2 message over MLLP and read the receiver's acknowledgement.

Written here because hl7apy (which builds and parses our messages) ships only
an MLLP *server*; the client side is the few lines of framing below (HL7 v2
Transport Specification: MLLP, release 2): ``<VT> message <FS><CR>``, the
receiver answers with an ACK framed the same way. The ACK is parsed with
hl7apy; MSA-1 decides: AA/CA accepted, AE/CE an application error (retry
later), AR/CR a rejection (the message itself is refused: do not retry).
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from medsight.errors import ResultExportError

START, END = b"\x0b", b"\x1c\x0d"
MAX_ACK_BYTES = 1 << 20


class MllpError(ResultExportError):
    """Delivery failed; ``permanent`` says whether sending the same message again can succeed."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


@dataclass(frozen=True)
class MllpDestination:
    host: str
    port: int

    def __str__(self) -> str:
        return f"mllp://{self.host}:{self.port}"


def parse_mllp_destination(text: str) -> MllpDestination:
    """``host:port`` or ``mllp://host:port``."""
    m = re.fullmatch(r"(?:mllp://)?([^:/\s]+):(\d{1,5})/?", text.strip())
    if not m or not 0 < int(m.group(2)) < 65536:
        raise ResultExportError(f"HL7 destination {text!r} is not host:port (or mllp://host:port)")
    return MllpDestination(m.group(1), int(m.group(2)))


def frame(message: str) -> bytes:
    """MLLP block of an ER7 message (segments separated by CR)."""
    body = message.replace("\r\n", "\r").replace("\n", "\r").rstrip("\r") + "\r"
    return START + body.encode("utf-8") + END


def _read_block(sock: socket.socket) -> bytes:
    buf = b""
    while END not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise MllpError("the receiver closed the connection without an acknowledgement")
        buf += chunk
        if len(buf) > MAX_ACK_BYTES:
            raise MllpError("acknowledgement larger than 1 MiB: not an MLLP peer")
    start = buf.find(START)
    if start < 0:
        raise MllpError("the receiver's answer is not an MLLP block")
    return buf[start + 1 : buf.index(END, start)]


@dataclass(frozen=True)
class Ack:
    code: str  # MSA-1
    control_id: str  # MSA-2: the MSH-10 it acknowledges
    text: str  # MSA-3 / ERR, for the log


def parse_ack(er7: str) -> Ack:
    from hl7apy.parser import parse_message

    try:
        msg = parse_message(er7.replace("\n", "\r"), find_groups=False)
        msa = msg.msa
        return Ack(msa.msa_1.value, msa.msa_2.value, msa.msa_3.value if msa.msa_3 else "")
    except Exception as e:  # hl7apy raises several unrelated exception types on bad input
        raise MllpError(f"unreadable acknowledgement ({type(e).__name__}: {e}): {er7[:200]!r}") from None


def send_mllp(message: str, destination: MllpDestination, timeout: float = 30.0) -> Ack:
    """Send one message; return the ACK when accepted, raise :class:`MllpError` otherwise."""
    from hl7apy.parser import parse_segment

    control_id = parse_segment(message.replace("\n", "\r").split("\r", 1)[0]).msh_10.value
    try:
        with socket.create_connection((destination.host, destination.port), timeout=timeout) as sock:
            sock.sendall(frame(message))
            raw = _read_block(sock)
    except OSError as e:
        raise MllpError(f"{destination} unreachable: {e}") from None
    ack = parse_ack(raw.decode("utf-8", errors="replace"))
    if ack.control_id and control_id and ack.control_id != control_id:
        raise MllpError(f"{destination} acknowledged message {ack.control_id!r}, we sent {control_id!r}")
    if ack.code in ("AA", "CA"):
        return ack
    permanent = ack.code in ("AR", "CR")
    raise MllpError(f"{destination} answered {ack.code}: {ack.text or 'no reason given'}", permanent=permanent)


__all__ = ["send_mllp", "parse_mllp_destination", "MllpDestination", "MllpError", "Ack", "parse_ack", "frame"]
