"""DICOM over TLS: the listener and the sender against real peers (dcmtk's echoscu/storescu, pynetdicom).

Certificates come from ``trustme`` (a throw-away CA made in the test). What is checked:
a client with a certificate from the site CA can echo and store; a plain-TCP client,
a client without a certificate and a client with a certificate from another CA are
refused before any DIMSE message and nothing is stored; the sender verifies the
receiver's certificate (an untrusted PACS is a retried failure, never a silent send);
bad certificate files are clear errors at start-up, with a non-zero exit from the CLI.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import trustme
from pynetdicom import AE, AllStoragePresentationContexts, evt, sop_class
from typer.testing import CliRunner

from medsight.integration.delivery import DeliveryFailed, OutputSettings, send_payloads
from medsight.gateway.listener import ListenerConfig, StorageSCP
from medsight.integration.sender import parse_destination, send_dimse
from medsight.integration.tls import TlsSettings
from medsight.errors import TlsConfigError

from .conftest import CT_STUDY, DATA, read, tool
from tests.integration.conftest import wait_for
from tests.integration.conftest import free_port

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class Pki:
    """A site CA with a server ("localhost", 127.0.0.1) and a client certificate, written as PEM files."""

    def __init__(self, folder: Path, ca: trustme.CA | None = None):
        folder.mkdir(parents=True, exist_ok=True)
        self.ca = ca or trustme.CA()
        self.ca_file = folder / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        for role, names in (("server", ("localhost", "127.0.0.1")), ("client", ("modality.example",))):
            cert = self.ca.issue_cert(*names)
            cert.private_key_pem.write_to_path(str(folder / f"{role}.key"))
            cert.cert_chain_pems[0].write_to_path(str(folder / f"{role}.pem"))
            for extra in cert.cert_chain_pems[1:]:
                extra.write_to_path(str(folder / f"{role}.pem"), append=True)
        self.folder = folder

    def server(self, mutual: bool = True) -> TlsSettings:
        return TlsSettings(cert_file=self.folder / "server.pem", key_file=self.folder / "server.key",
                           ca_file=self.ca_file if mutual else None)

    def client(self, with_cert: bool = True) -> TlsSettings:
        return TlsSettings(ca_file=self.ca_file, cert_file=self.folder / "client.pem" if with_cert else None,
                           key_file=self.folder / "client.key" if with_cert else None)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture()
def tls_listener(tmp_path: Path, pki: Pki):
    studies: list = []
    cfg = ListenerConfig(port=0, data_dir=tmp_path / "scp", allowed_calling_aets=("STORESCU", "ECHOSCU", "MEDSIGHT"),
                         idle_timeout=0.5, tls=pki.server())
    scp = StorageSCP(cfg, on_study_complete=studies.append).start()
    scp.studies = studies
    yield scp
    scp.stop()


def _stored(scp: StorageSCP) -> list[Path]:
    return sorted((scp.config.data_dir / "instances").rglob("*.dcm"))


def _echo(port: int, tls: TlsSettings | None) -> bool:
    ae = AE(ae_title="ECHOSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(sop_class.Verification)
    tls_args = (tls.client_context(), "localhost") if tls is not None else None
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="MEDSIGHT", tls_args=tls_args)
    except Exception:  # the TLS handshake failed while connecting
        return False
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and status.Status == 0


def test_mutual_tls_listener_accepts_only_clients_of_the_site_ca(tls_listener: StorageSCP, pki: Pki, tmp_path: Path) -> None:
    assert _echo(tls_listener.port, pki.client())
    assert not _echo(tls_listener.port, None)  # plain TCP to a TLS port
    assert not _echo(tls_listener.port, pki.client(with_cert=False))  # no client certificate
    stranger = Pki(tmp_path / "other-site")  # a certificate from another CA, which trusts our server's CA
    foreign = TlsSettings(ca_file=pki.ca_file, cert_file=stranger.folder / "client.pem", key_file=stranger.folder / "client.key")
    assert not _echo(tls_listener.port, foreign)
    assert _echo(tls_listener.port, pki.client())  # still serving after the refusals
    assert _stored(tls_listener) == []


def test_dcmtk_clients_echo_and_store_over_tls(tls_listener: StorageSCP, pki: Pki) -> None:
    echoscu, storescu = tool("echoscu"), tool("storescu")
    f = pki.folder
    tls = ["+tls", str(f / "client.key"), str(f / "client.pem"), "+cf", str(pki.ca_file)]
    ok = subprocess.run([echoscu, *tls, "-aet", "ECHOSCU", "-aec", "MEDSIGHT", "127.0.0.1", str(tls_listener.port)],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    plain = subprocess.run([echoscu, "-to", "10", "-aet", "ECHOSCU", "-aec", "MEDSIGHT", "127.0.0.1", str(tls_listener.port)],
                           capture_output=True, text=True, timeout=60)
    assert plain.returncode != 0
    files = [DATA / n for n in CT_STUDY]
    r = subprocess.run([storescu, *tls, "-aet", "STORESCU", "-aec", "MEDSIGHT", "127.0.0.1", str(tls_listener.port),
                        *map(str, files)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    wait_for(lambda: tls_listener.studies)
    stored = {read(p).SOPInstanceUID: read(p) for p in _stored(tls_listener)}
    for original in map(read, files):
        assert stored[original.SOPInstanceUID].PixelData == original.PixelData


class TlsPacs:
    """A PACS that only speaks TLS (pynetdicom Storage SCP, every storage class)."""

    def __init__(self, folder: Path, tls: TlsSettings):
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        ae = AE(ae_title="PACS")
        ae.supported_contexts = AllStoragePresentationContexts
        self.server = ae.start_server(("127.0.0.1", 0), block=False, ssl_context=tls.server_context(),
                                      evt_handlers=[(evt.EVT_C_STORE, self._store)])

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    def _store(self, event) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        ds.save_as(self.folder / f"{ds.SOPInstanceUID}.dcm", enforce_file_format=True)
        return 0x0000

    def stop(self) -> None:
        self.server.shutdown()


def test_sender_delivers_over_tls_and_refuses_an_untrusted_pacs(tmp_path: Path, pki: Pki) -> None:
    pacs = TlsPacs(tmp_path / "pacs", pki.server())
    try:
        files = [DATA / n for n in CT_STUDY]
        dest = parse_destination(f"PACS@localhost:{pacs.port}", tls=pki.client())
        assert str(dest).endswith("(TLS)")
        assert all(o.ok for o in send_dimse(files, dest, timeout=10).values())
        assert len(list(pacs.folder.glob("*.dcm"))) == len(files)
        # the site does not trust this PACS's CA: nothing is sent, and the failure is transient (kept, retried)
        other = Pki(tmp_path / "other-ca")
        untrusted = parse_destination(f"PACS@localhost:{pacs.port}", tls=other.client())
        outcomes = send_dimse(files, untrusted, timeout=10)
        assert not any(o.ok for o in outcomes.values()) and not any(o.permanent for o in outcomes.values())
        # the service's delivery path takes the same settings (outputs.dicom_tls)
        settings = OutputSettings(dicom_destination=f"PACS@localhost:{pacs.port}", dicom_tls=pki.client(), timeout_s=10)
        receipt = send_payloads("dicom", [f.read_bytes() for f in files], settings)
        assert receipt.startswith(f"{len(files)} object(s) stored") and "(TLS)" in receipt
        plain = OutputSettings(dicom_destination=f"PACS@localhost:{pacs.port}", timeout_s=10)
        with pytest.raises(DeliveryFailed) as failed:
            send_payloads("dicom", [files[0].read_bytes()], plain)
        assert not failed.value.permanent
    finally:
        pacs.stop()


def test_bad_tls_files_are_specific_errors(tmp_path: Path, pki: Pki) -> None:
    with pytest.raises(TlsConfigError, match="does not exist"):
        TlsSettings(cert_file=tmp_path / "nope.pem", key_file=pki.folder / "server.key").server_context()
    with pytest.raises(TlsConfigError, match="both a certificate file and its private key"):
        TlsSettings(cert_file=pki.folder / "server.pem").client_context()
    with pytest.raises(TlsConfigError, match="cannot be used together"):
        TlsSettings(cert_file=pki.folder / "server.pem", key_file=pki.folder / "client.key").server_context()
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    with pytest.raises(TlsConfigError, match="no usable certificate"):
        TlsSettings(ca_file=tmp_path / "junk.pem").client_context()
    with pytest.raises(TlsConfigError, match="needs --tls-cert"):
        TlsSettings(ca_file=pki.ca_file).server_context()
    # settings files are typed: unknown TLS fields are refused when the service loads them
    with pytest.raises(ValueError, match="extra"):
        OutputSettings.model_validate({"dicom_tls": {"cert": "x.pem"}})


def test_cli_refuses_to_start_with_a_bad_certificate(tmp_path: Path, pki: Pki) -> None:
    from medsight.cli import app

    r = CliRunner().invoke(app, ["dicom", "listen", "--data-dir", str(tmp_path / "svc"), "--allow-any-ae", "--port", str(free_port()),
                                 "--tls-cert", str(tmp_path / "missing.pem"), "--tls-key", str(pki.folder / "server.key")])
    assert r.exit_code == 2 and "does not exist" in r.output
    r = CliRunner().invoke(app, ["dicom", "send", str(DATA / CT_STUDY[0]), "--dest", "PACS@localhost:11112",
                                 "--outbox", str(tmp_path / "outbox"), "--tls-ca", str(tmp_path / "missing-ca.pem")])
    assert r.exit_code == 2 and "missing-ca.pem does not exist" in r.output
