"""The model card: everything needed to use, trust and reproduce a model.

A card travels with its weights in one directory (a *model package*). It is the
single source of truth for preprocessing, calibration and thresholds, so the CLI,
the service and the DICOM gateway cannot disagree about how a model is run.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

Task = Literal["binary", "multiclass", "multilabel"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class InputSpec(_Strict):
    """How an image is turned into the network's input tensor."""

    size: int = Field(gt=0, description="square side in pixels the image is resized to")
    channels: Literal[1, 3]
    mean: list[float]
    std: list[float]

    @model_validator(mode="after")
    def _lengths(self) -> "InputSpec":
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("mean/std need one value per input channel")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class Architecture(_Strict):
    """A network that :func:`medsight.models.networks.build_network` can build."""

    name: Literal["resnet"] = "resnet"
    layers: list[int] = [2, 2, 2, 2]
    widths: list[int] = [32, 64, 128, 256]
    stem_kernel: int = 3
    stem_stride: int = 1
    max_pool: bool = False
    dropout: float = 0.0


class Calibration(_Strict):
    """How logits become calibrated probabilities (applied by medsight.models.calibration.calibrated_probabilities).

    ``temperature``: softmax(z / T). ``temperature-bias``: softmax(z / T + bias).
    ``vector``: softmax(scale * z + bias). ``isotonic``: per-class isotonic maps of the
    temperature-1 probabilities (knots ``{"x", "y"}``), renormalised. ``prior_shift``
    (optional, any method): the probabilities are then reweighted from ``source_priors``
    (the calibration data's class mix) to ``target_priors`` (a site's, estimated by EM
    on its unlabelled images). ``selection`` records how the method was chosen.
    """

    method: Literal["none", "temperature", "temperature-bias", "vector", "isotonic"] = "temperature"
    temperature: float = Field(default=1.0, gt=0)
    scale: list[float] | None = None
    bias: list[float] | None = None
    isotonic: list[dict[str, list[float]]] | None = None
    prior_shift: dict[str, Any] | None = None
    selection: dict[str, Any] | None = None
    fitted_on: str | None = None
    nll_before: float | None = None
    nll_after: float | None = None

    @model_validator(mode="after")
    def _parameters(self) -> "Calibration":
        need = {"temperature-bias": ("bias",), "vector": ("scale", "bias"), "isotonic": ("isotonic",)}.get(self.method, ())
        missing = [f for f in need if getattr(self, f) is None]
        if missing:
            raise ValueError(f"calibration method {self.method!r} needs {', '.join(missing)}")
        if self.scale is not None and any(v <= 0 for v in self.scale):
            raise ValueError("calibration scales must be positive")
        for i, knots in enumerate(self.isotonic or []):
            x, y = knots.get("x"), knots.get("y")
            if not x or y is None or len(x) != len(y) or any(b < a for a, b in zip(x, x[1:])):
                raise ValueError(f"isotonic map {i}: needs equally long, non-empty 'x' (non-decreasing) and 'y' knot lists")
        if self.prior_shift is not None:
            s, t = self.prior_shift.get("source_priors"), self.prior_shift.get("target_priors")
            if not s or not t or len(s) != len(t) or any(v <= 0 for v in s) or any(v < 0 for v in t):
                raise ValueError("prior_shift needs source_priors (positive) and target_priors (non-negative) of equal length")
        return self

    def n_classes(self) -> int | None:
        """The number of classes the parameters are for (None for temperature scaling)."""
        sizes = {len(v) for v in (self.scale, self.bias, self.isotonic, (self.prior_shift or {}).get("source_priors"))
                 if v is not None}
        if len(sizes) > 1:
            raise ValueError(f"calibration parameters disagree on the number of classes ({sorted(sizes)})")
        return sizes.pop() if sizes else None


class ConfidencePolicy(_Strict):
    """When a prediction should be referred to a human instead of reported."""

    refer_below: float = Field(default=0.70, ge=0, le=1, description="refer when the top calibrated probability is below this")


class MetricValue(_Strict):
    value: float | None
    ci: list[float | None] | None = None


# -- where a model applies (read by medsight.models.applicability.route; docs/routing.md) --------------------
_CODE = re.compile(r"^[A-Z0-9_ ]{1,16}$")  # a DICOM Code String (CS): upper case, digits, space, underscore
#: ``body_parts: ["ANY"]`` declares a model that does not depend on the body part (test phantoms); never a zoo model.
ANY_BODY_PART = "ANY"
Photometric = Literal["MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT",
                      "YBR_PARTIAL_420", "PALETTE COLOR"]


def _code(value: str) -> str:
    code = " ".join(str(value).split()).upper()
    if not _CODE.match(code):
        raise ValueError(f"{value!r} is not a DICOM code string (upper-case letters, digits, space or _, at most 16)")
    return code


Code = Annotated[str, AfterValidator(_code)]


class AgeRange(_Strict):
    """Completed years at the study date, both ends included (the training data's ages)."""

    min_years: float | None = Field(default=None, ge=0)
    max_years: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _bounds(self) -> "AgeRange":
        if self.min_years is None and self.max_years is None:
            raise ValueError("an age range needs min_years, max_years or both (leave age_years out for no limit)")
        if self.min_years is not None and self.max_years is not None and self.min_years > self.max_years:
            raise ValueError(f"age range min_years {self.min_years} is above max_years {self.max_years}")
        return self


class NeverGiven(_Strict):
    """What the model must never be given: ``text`` for the model's page, codes that are refused outright."""

    text: str = Field(min_length=1)
    modalities: list[Code] = []
    body_parts: list[Code] = []
    view_positions: list[Code] = []
    #: words that refuse an image where they appear (whole word, any case) in its descriptions or Image Type,
    #: e.g. LOCALIZER or MRA for a model trained on diagnostic slices only
    keywords: list[str] = []

    @field_validator("keywords")
    @classmethod
    def _words(cls, v: list[str]) -> list[str]:
        if any(not w.strip() for w in v):
            raise ValueError("never.keywords must not hold blank words")
        return [" ".join(w.upper().split()) for w in v]


class Applicability(_Strict):
    """The studies a model may be given. Every constraint that is set must be met by what the study's
    DICOM header says, and a study whose header does not say is not given to the model: a model is only
    ever run where its training data says it is valid, never where nothing says it is not.

    ``None`` (or an absent key) means "not a constraint of this model"; ``basis`` records where the
    values come from (the card's intended use, the training data's ages), so a reader can check them.
    """

    modalities: list[Code] = Field(min_length=1, description="DICOM Modality (0008,0060) codes")
    body_parts: list[Code] = Field(min_length=1, description="DICOM Body Part Examined (0018,0015) code strings")
    view_positions: list[Code] | None = Field(default=None, description="DICOM View Position (0018,5101), e.g. PA, AP")
    age_years: AgeRange | None = None
    photometric: list[Photometric] | None = Field(default=None, description="Photometric Interpretation (0028,0004)")
    laterality: list[Literal["L", "R", "B", "U"]] | None = Field(default=None, description="(Image) Laterality")
    never: NeverGiven
    basis: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> "Applicability":
        if ANY_BODY_PART in self.body_parts and len(self.body_parts) > 1:
            raise ValueError(f"body_parts {ANY_BODY_PART!r} stands alone (it means the body part is not a constraint)")
        for field, refused in (("modalities", self.never.modalities), ("body_parts", self.never.body_parts),
                               ("view_positions", self.never.view_positions)):
            both = sorted(set(getattr(self, field) or ()) & set(refused))
            if both:
                raise ValueError(f"{field} {both} are both accepted and in never.{field}")
        return self


class ModelCard(_Strict):
    name: str
    version: str = "1.0.0"
    task: Task
    labels: list[str]
    positive_label: str | None = Field(default=None, description="binary only: the finding the model looks for")
    critical_findings: list[str] = []
    modality: str
    body_part: str
    #: where the model applies; a card without it is never chosen for a study automatically
    applicability: Applicability | None = None
    description: str = ""
    architecture: Architecture
    input: InputSpec
    calibration: Calibration = Calibration()
    thresholds: dict[str, float] = {}
    confidence: ConfidencePolicy = ConfidencePolicy()
    ood: dict[str, Any] | None = None
    runtime: dict[str, Any] | None = None  # fast-inference backend choice and int8 calibration (medsight.predict)
    training: dict[str, Any] = {}
    validation_metrics: dict[str, MetricValue] = {}
    test_metrics: dict[str, MetricValue] = {}
    published_baselines: dict[str, Any] = {}
    intended_use: str = ""
    limitations: list[str] = []
    weights_file: str = "weights.safetensors"
    weights_sha256: str = ""
    medsight_version: str = ""

    @field_validator("labels")
    @classmethod
    def _labels(cls, v: list[str]) -> list[str]:
        if len(v) < 2:
            raise ValueError("a classifier needs at least two labels")
        if len(set(v)) != len(v):
            raise ValueError("labels must be unique")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "ModelCard":
        if self.task == "binary":
            if len(self.labels) != 2:
                raise ValueError("a binary model has exactly two labels")
            if self.positive_label is None:
                self.positive_label = self.labels[1]
            if self.positive_label not in self.labels:
                raise ValueError(f"positive_label {self.positive_label!r} is not one of {self.labels}")
        n_cal = self.calibration.n_classes()
        if n_cal is not None and n_cal != len(self.labels):
            raise ValueError(f"calibration parameters are for {n_cal} classes, the model has {len(self.labels)}")
        if self.task == "multilabel" and self.calibration.method not in ("none", "temperature"):
            raise ValueError("multi-label models support temperature calibration only")
        unknown = [f for f in self.critical_findings if f not in self.labels]
        if unknown:
            raise ValueError(f"critical findings {unknown} are not model labels")
        return self

    @property
    def positive_index(self) -> int:
        """Index of the positive class for a binary model."""
        if self.task != "binary":
            raise ValueError("positive_index only applies to binary models")
        return self.labels.index(self.positive_label)  # type: ignore[arg-type]

    @property
    def num_outputs(self) -> int:
        return len(self.labels)
