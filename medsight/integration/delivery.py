"""Results out: which objects a site wants for an analysed study, and sending one batch of them.

A site configures any of three channels (:class:`OutputSettings`):

* ``dicom``: the Comprehensive SR and the overlay Secondary Captures, into the
  source study, by C-STORE or STOW-RS (only for studies that arrived as DICOM:
  both must reference real source instances);
* ``fhir``: a transaction Bundle (DiagnosticReport + Observations) POSTed to a
  FHIR R4 server;
* ``hl7``: an ORU^R01 over MLLP to a RIS.

Building and sending are separate on purpose: the service builds the payloads
once, right after analysis, stores them, and lets the durable job queue send
(and re-send) exactly those bytes, so a retry never produces a second,
different SR or report for the same analysis.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, field_validator

from medsight.integration.results import AnalysedImage
from medsight.integration.tls import TlsSettings

CHANNELS = ("dicom", "fhir", "hl7")


class OutputSettings(BaseModel):
    """Where results of analysed studies go (all channels off by default)."""

    model_config = ConfigDict(extra="forbid")
    dicom_destination: str | None = Field(default=None, description="AE@host:port (C-STORE) or a DICOMweb base URL (STOW-RS)")
    calling_aet: str = Field(default="MEDSIGHT", description="our AE title when sending")
    send_overlays: bool = Field(default=True, description="also send the heat-map Secondary Captures, not only the SR")
    fhir_url: str | None = Field(default=None, description="FHIR R4 server base URL for the DiagnosticReport transaction")
    dicom_tls: TlsSettings | None = Field(default=None, description="C-STORE over TLS: CA to verify the PACS, our certificate if it requires one")
    hl7_destination: str | None = Field(default=None, description="RIS MLLP listener, host:port")
    institution_name: str | None = Field(default=None, description="the site's name; Verifying Organization of reviewed SRs")
    hl7_sending_facility: str = "HOSPITAL"
    hl7_receiving_application: str = "RIS"
    timeout_s: float = Field(default=30.0, gt=0)
    max_attempts: int = Field(default=10, ge=1, description="sends of one batch before it is marked failed (and audited)")
    backoff_base_s: float = Field(default=5.0, ge=0)
    backoff_max_s: float = Field(default=900.0, ge=0)

    @field_validator("dicom_destination")
    @classmethod
    def _dicom(cls, v: str | None) -> str | None:
        if v:
            from medsight.integration.sender import parse_destination

            parse_destination(v)  # raises a specific error for a malformed destination
        return v or None

    @field_validator("hl7_destination")
    @classmethod
    def _hl7(cls, v: str | None) -> str | None:
        if v:
            from medsight.integration.mllp import parse_mllp_destination

            parse_mllp_destination(v)
        return v or None

    @property
    def organization(self) -> str:
        return self.institution_name or self.hl7_sending_facility

    def destination(self, channel: str) -> str | None:
        return {"dicom": self.dicom_destination, "fhir": self.fhir_url, "hl7": self.hl7_destination}[channel]

    def channels(self, dicom_source: bool) -> list[str]:
        """Configured channels that apply to a study (DICOM output needs DICOM sources)."""
        return [c for c in CHANNELS if self.destination(c) and (c != "dicom" or dicom_source)]

    def backoff(self, attempt: int) -> float:
        return min(self.backoff_base_s * (2 ** max(attempt - 1, 0)), self.backoff_max_s)


def build_payloads(images: Sequence[AnalysedImage], channel: str, settings: OutputSettings) -> list[bytes]:
    """The bytes to send on one channel for one analysed study (one model)."""
    if channel == "dicom":
        from medsight.integration.files import encode_part10
        from medsight.integration.secondary_capture import build_overlay_series
        from medsight.integration.sr import build_sr

        objects = [build_sr(images)]
        if settings.send_overlays:
            objects += build_overlay_series([a for a in images if a.prediction.heatmap is not None])
        return [encode_part10(ds) for ds in objects]
    if channel == "fhir":
        from medsight.integration.fhir import build_fhir_bundle, bundle_json

        return [bundle_json(build_fhir_bundle(images)).encode("utf-8")]
    if channel == "hl7":
        from medsight.integration.hl7 import build_oru_r01, to_er7

        msg = build_oru_r01(images, sending_facility=settings.hl7_sending_facility,
                            receiving_application=settings.hl7_receiving_application)
        return [to_er7(msg).encode("utf-8")]
    raise ValueError(f"unknown output channel {channel!r}; use one of {', '.join(CHANNELS)}")


class DeliveryFailed(Exception):
    """A batch was not (completely) delivered. ``permanent``: the receiver refuses it; sending again cannot help."""

    def __init__(self, message: str, permanent: bool = False):
        super().__init__(message)
        self.permanent = permanent


def send_payloads(channel: str, payloads: Sequence[bytes], settings: OutputSettings) -> str:
    """Send one batch; return a short receipt, or raise :class:`DeliveryFailed`.

    Re-sending a batch is safe: DICOM receivers keep one copy per SOP Instance
    UID, the FHIR bundle uses conditional create, and an HL7 receiver can drop
    a repeated MSH-10 control ID.
    """
    dest = settings.destination(channel)
    if not dest:
        raise DeliveryFailed(f"no {channel} destination is configured", permanent=True)
    if channel == "dicom":
        return _send_dicom(payloads, dest, settings)
    if channel == "fhir":
        from medsight.integration.fhir import FhirPostError, post_bundle

        try:
            for p in payloads:
                post_bundle(p, dest, timeout=settings.timeout_s)
        except FhirPostError as e:
            raise DeliveryFailed(str(e), permanent=e.permanent) from None
        return f"{len(payloads)} bundle(s) posted to {dest}"
    if channel == "hl7":
        from medsight.integration.mllp import MllpError, parse_mllp_destination, send_mllp

        target = parse_mllp_destination(dest)
        try:
            acks = [send_mllp(p.decode("utf-8"), target, timeout=settings.timeout_s) for p in payloads]
        except MllpError as e:
            raise DeliveryFailed(str(e), permanent=e.permanent) from None
        return f"{len(acks)} message(s) acknowledged ({', '.join(a.code for a in acks)}) by {target}"
    raise DeliveryFailed(f"unknown output channel {channel!r}", permanent=True)


def _send_dicom(payloads: Sequence[bytes], dest: str, settings: OutputSettings) -> str:
    from medsight.integration.sender import StowDestination, parse_destination, send_dimse, send_stow
    from medsight.errors import TlsConfigError

    target = parse_destination(dest, tls=settings.dicom_tls)
    with tempfile.TemporaryDirectory(prefix="medsight-send-") as tmp:
        paths = []
        for k, data in enumerate(payloads):
            path = Path(tmp) / f"{k:04d}.dcm"
            path.write_bytes(data)
            paths.append(path)
        if isinstance(target, StowDestination):
            outcomes = send_stow(paths, target, settings.timeout_s)
        else:
            try:
                outcomes = send_dimse(paths, target, settings.calling_aet, settings.timeout_s)
            except TlsConfigError as e:  # retried: an administrator can fix the files without losing results
                raise DeliveryFailed(str(e), permanent=False) from None
    failed = {p.name: o for p, o in outcomes.items() if not o.ok}
    if failed:
        permanent = all(o.permanent for o in failed.values())
        detail = "; ".join(sorted({o.detail for o in failed.values()}))
        raise DeliveryFailed(f"{len(failed)} of {len(payloads)} objects not stored by {target}: {detail}", permanent=permanent)
    return f"{len(payloads)} object(s) stored by {target}"


__all__ = ["OutputSettings", "CHANNELS", "build_payloads", "send_payloads", "DeliveryFailed"]
