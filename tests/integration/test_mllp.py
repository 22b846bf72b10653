"""HL7 over MLLP against hl7apy's own MLLP server (an independent receiver): framing, ACK codes, failures."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
from hl7apy.core import Message
from hl7apy.mllp import AbstractHandler, MLLPServer
from hl7apy.parser import parse_message

from medsight.integration.mllp import MllpDestination, MllpError, frame, parse_mllp_destination, send_mllp
from medsight.errors import ResultExportError

ORU = "ORU^R01^ORU_R01"


def oru(control_id: str = "CTRL0001") -> str:
    return "\r".join([
        f"MSH|^~\\&|MEDSIGHT|HOSPITAL|RIS|HOSPITAL|20261123120000||{ORU}|{control_id}|P|2.5",
        "OBR|1||ACC1|PNEU^MedSight pneumonia-cxr 1.0.0^99MEDSIGHT|||20261123120000",
        "OBX|1|NM|P-PNEUMONIA^Probability of pneumonia^99MEDSIGHT||0.910000|1^no units^UCUM|||||P",
    ])


class Receiver:
    """A RIS stand-in: hl7apy's MLLPServer, answering every ORU with the configured MSA-1 code."""

    def __init__(self, code: str = "AA"):
        self.messages: list[str] = []
        receiver = self

        class Handler(AbstractHandler):
            def reply(self) -> str:
                receiver.messages.append(self.incoming_message)
                incoming = parse_message(self.incoming_message, find_groups=False)
                ack = Message("ACK", version="2.5")
                ack.msh.msh_9 = "ACK^R01^ACK"
                ack.msh.msh_10 = "ACK" + incoming.msh.msh_10.value
                ack.msa.msa_1 = code
                ack.msa.msa_2 = incoming.msh.msh_10.value
                if code != "AA":
                    ack.msa.msa_3 = "refused by test RIS"
                return "\x0b" + ack.to_er7() + "\x1c\x0d"

        self.server = MLLPServer("127.0.0.1", 0, {ORU: (Handler,)}, timeout=5)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def ris() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.stop()


def test_message_is_delivered_and_acknowledged(ris: Receiver) -> None:
    ack = send_mllp(oru(), MllpDestination("127.0.0.1", ris.port))
    assert (ack.code, ack.control_id) == ("AA", "CTRL0001")
    (received,) = ris.messages
    msg = parse_message(received.replace("\n", "\r"), find_groups=False)
    assert msg.msh.msh_10.value == "CTRL0001" and msg.obx.obx_5.value == "0.910000"


@pytest.mark.parametrize(("code", "permanent"), [("AR", True), ("AE", False)])
def test_refusals_say_whether_a_retry_can_help(code: str, permanent: bool) -> None:
    r = Receiver(code)
    try:
        with pytest.raises(MllpError, match=f"answered {code}: refused by test RIS") as e:
            send_mllp(oru(), MllpDestination("127.0.0.1", r.port))
        assert e.value.permanent is permanent
    finally:
        r.stop()


def test_unreachable_receiver_is_a_transient_failure() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(MllpError, match="unreachable") as e:
        send_mllp(oru(), MllpDestination("127.0.0.1", port), timeout=3)
    assert not e.value.permanent


def test_a_peer_that_is_not_mllp_is_reported() -> None:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)

    def answer_http() -> None:
        conn, _ = srv.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 400 Bad Request\r\n\r\n")
        conn.close()

    threading.Thread(target=answer_http, daemon=True).start()
    try:
        with pytest.raises(MllpError, match="without an acknowledgement|not an MLLP block"):
            send_mllp(oru(), MllpDestination("127.0.0.1", srv.getsockname()[1]), timeout=5)
    finally:
        srv.close()


def test_framing_and_destination_parsing() -> None:
    assert frame("MSH|a\nOBX|b\n") == b"\x0bMSH|a\rOBX|b\r\x1c\x0d"
    assert parse_mllp_destination("ris.local:2575") == MllpDestination("ris.local", 2575)
    assert parse_mllp_destination("mllp://10.0.0.9:6661") == MllpDestination("10.0.0.9", 6661)
    for bad in ("ris.local", "ris:0", "ris:99999", "http://ris:80/x"):
        with pytest.raises(ResultExportError):
            parse_mllp_destination(bad)
