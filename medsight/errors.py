"""Every error MedSight raises on purpose derives from :class:`MedSightError`.

The CLI turns these into a one-line message and a non-zero exit code; the service
turns them into 4xx responses. Keeping them in one module means a caller can
catch exactly the failure it can handle ("this file is not an image") without
string matching.
"""

from __future__ import annotations

from pathlib import Path


class MedSightError(Exception):
    """Base class for expected, user-facing failures."""


class ImageReadError(MedSightError):
    """An input file could not be turned into an image; ``reason`` says why."""

    reason = "unreadable image"

    def __init__(self, path: str | Path | None, detail: str | None = None):
        self.path = str(path) if path is not None else None
        self.detail = detail
        where = f"{self.path}: " if self.path else ""
        extra = f" ({detail})" if detail else ""
        super().__init__(f"{where}{self.reason}{extra}")


class ImageNotFoundError(ImageReadError):
    reason = "file not found"


class EmptyFileError(ImageReadError):
    reason = "file is empty"


class NotAnImageError(ImageReadError):
    reason = "not a recognised image format (DICOM, PNG, JPEG, TIFF, NIfTI)"


class NoPixelDataError(ImageReadError):
    reason = "DICOM file has no pixel data"


class TruncatedPixelDataError(ImageReadError):
    reason = "pixel data is truncated or shorter than the header declares"


class UnsupportedImageError(ImageReadError):
    reason = "image layout is not supported"


class DecoderUnavailableError(ImageReadError):
    reason = "no installed decoder can decompress this transfer syntax"


class ImageTooLargeError(ImageReadError):
    """Refused from its header, before decoding: the image, or the bytes it inflates to, exceeds the
    pixel budget (``max_pixels``, :mod:`medsight.io.budget`). The service answers 413, the listener 0xA700."""

    reason = "image exceeds the pixel budget"


class OverlongPixelDataError(ImageReadError):
    """Native pixel data holds more than the header declares, by more than padding (less than one frame)."""

    reason = "pixel data is longer than the header declares"


class UnknownModelError(MedSightError):
    def __init__(self, name: str, available: list[str]):
        self.name = name
        self.available = available
        super().__init__(
            f"unknown model {name!r}: not a zoo name and not a model package directory; "
            f"available: {', '.join(available) or 'none'}"
        )


class ModelIntegrityError(MedSightError):
    """The weights on disk are not the ones the card was written for."""


class ModelCardError(MedSightError):
    """A model card is missing fields or holds values that cannot be used."""


class DataSetError(MedSightError):
    """A data set is empty, malformed, or does not match the model."""


class MetricNotComputableError(MedSightError):
    """A metric is undefined for the given data (e.g. AUC with one class present)."""


class UnsupportedModalityError(MedSightError):
    """Not analysed: no installed model applies to the study (none reads its modality, or none fits what its
    header says), or the requested model does not. ``decision``, where routing made it, holds every card's
    reasons (medsight.models.applicability.RoutingDecision)."""

    def __init__(self, message: str, decision: object | None = None):
        self.decision = decision
        super().__init__(message)


class UploadError(MedSightError):
    """An upload cannot be accepted as a study (mixed studies, missing modality, bad archive, ...)."""


class UploadTooLargeError(UploadError):
    """An upload exceeds the configured size or file-count limit."""


class DicomGatewayError(MedSightError):
    """Hospital integration (de-identification, DICOM network, result export) failed in an expected way."""


class SiteKeyError(DicomGatewayError):
    """The site secret key for de-identification is missing, unreadable or too short."""


class BurnedInAnnotationError(DicomGatewayError):
    """The image says identifying text is burned into its pixels, and that was not explicitly allowed."""


class DeidentificationError(DicomGatewayError):
    """A file could not be de-identified (not DICOM, unreadable, or cannot be written back)."""


class DicomSendError(DicomGatewayError):
    """Results could not be delivered to the configured destination (they stay in the outbox)."""


class TlsConfigError(DicomGatewayError):
    """A DICOM TLS certificate, key or CA file is missing, unreadable or does not match."""


class ResultExportError(DicomGatewayError):
    """A prediction cannot be turned into a DICOM SR / Secondary Capture / FHIR / HL7 message."""


class UnsupportedTaskError(MedSightError):
    """The operation does not support the model's task (e.g. a validation report for a multi-label model)."""


class PackageOutputError(MedSightError):
    """A new model package cannot be written where asked (it would overwrite the source or another package)."""


class DuplicateStudyError(UploadError):
    """The study (same Study Instance UID) was already received."""

    def __init__(self, study_uid: str, study_id: int | None):
        self.study_uid, self.study_id = study_uid, study_id
        super().__init__(f"study {study_uid} was already received" + (f" as study {study_id}" if study_id else ""))


class BackendError(MedSightError):
    """An inference backend (ONNX Runtime, int8) cannot be built or used for this model here."""


class EngineUnavailableError(MedSightError):
    """A batch engine (Ray) is not installed or its cluster cannot be reached."""
