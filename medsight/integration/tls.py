"""DICOM over TLS (PS3.15 Annex B, Secure Transport Connection Profiles) for the listener and the sender.

Hospitals increasingly refuse plain DICOM between buildings or sites. The
profile DICOM recommends today is BCP 195 (RFC 9325): TLS 1.2 or newer, no
compression, modern cipher suites, which is what Python's ``ssl`` module gives
with :data:`ssl.PROTOCOL_TLS_SERVER`/``CLIENT`` and a TLS 1.2 floor, so this is
configuration, not cryptography: pynetdicom wraps its sockets with the
contexts built here (``AE.start_server(ssl_context=...)``,
``AE.associate(tls_args=...)``).

Authentication follows the profile's usual deployment: the listener presents
its certificate; when ``ca_file`` is set on the listener it *requires* a client
certificate signed by that CA (mutual TLS: only the site's modalities and PACS
can connect, on top of the calling-AE-title check). The sender verifies the
receiver's certificate against ``ca_file`` (or the system store) and its host
name unless ``check_hostname`` is off (a PACS addressed by IP with a
certificate naming its host only).
"""

from __future__ import annotations

import ssl
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from medsight.errors import TlsConfigError


class TlsSettings(BaseModel):
    """Certificates for one end of a DICOM TLS connection (PEM files)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    cert_file: Path | None = None  # our certificate chain: required on the listener, and on a client that must authenticate
    key_file: Path | None = None  # its private key (unencrypted PEM, readable by the service user only)
    ca_file: Path | None = None  # CA certificates trusted for the peer's certificate
    check_hostname: bool = True  # sender: the receiver's certificate must name the host we connect to

    def _load_chain(self, ctx: ssl.SSLContext) -> None:
        if self.cert_file is None and self.key_file is None:
            return
        if self.cert_file is None or self.key_file is None:
            raise TlsConfigError("TLS needs both a certificate file and its private key file")
        for what, path in (("certificate", self.cert_file), ("private key", self.key_file)):
            if not Path(path).is_file():
                raise TlsConfigError(f"TLS {what} file {path} does not exist")
        try:
            ctx.load_cert_chain(str(self.cert_file), str(self.key_file))
        except ssl.SSLError as exc:
            raise TlsConfigError(f"TLS certificate {self.cert_file} and key {self.key_file} cannot be used together: {exc.reason or exc}") from exc
        except OSError as exc:
            raise TlsConfigError(f"cannot read TLS certificate or key: {exc}") from exc

    def _load_ca(self, ctx: ssl.SSLContext) -> None:
        if not Path(self.ca_file).is_file():
            raise TlsConfigError(f"TLS CA file {self.ca_file} does not exist")
        try:
            ctx.load_verify_locations(cafile=str(self.ca_file))
        except (ssl.SSLError, OSError) as exc:
            raise TlsConfigError(f"TLS CA file {self.ca_file} holds no usable certificate: {exc}") from exc

    def server_context(self) -> ssl.SSLContext:
        """For the listener: present our certificate; with ``ca_file``, require and verify client certificates."""
        if self.cert_file is None:
            raise TlsConfigError("a TLS listener needs --tls-cert and --tls-key")
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2  # BCP 195
        self._load_chain(ctx)
        if self.ca_file is not None:
            self._load_ca(ctx)
            ctx.verify_mode = ssl.CERT_REQUIRED
        return ctx

    def client_context(self) -> ssl.SSLContext:
        """For the sender: verify the receiver (``ca_file`` or the system store); present ours if configured."""
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        ctx.check_hostname = self.check_hostname
        if self.ca_file is not None:
            self._load_ca(ctx)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        self._load_chain(ctx)
        return ctx


__all__ = ["TlsConfigError", "TlsSettings"]
