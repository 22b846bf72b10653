"""Secondary Capture image: the heat-map overlay with a burned-in "not for primary diagnosis" caption.

Any PACS viewer can show a Secondary Capture, including those that ignore
SR and presentation states, so this is how the heat map reaches the reading
room. The caption is drawn *below* the image (in its own band) so it never
hides anatomy, and small model-resolution images are enlarged first so the
text stays legible.

The caption names a label only where ``Prediction.reported_finding`` does: a
referred image's caption says "refer to human reader", that no finding is
reported, and the referral statement, and never which class the heat map
explains (a burned-in label would be read as the finding, whatever else it says).
"""

from __future__ import annotations

from collections.abc import Sequence

import highdicom as hd
import numpy as np
from PIL import Image, ImageDraw, ImageFont
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medsight._version import __version__
from medsight.integration.results import (
    DISCLAIMER,
    MANUFACTURER,
    AnalysedImage,
    carry_deidentification,
    check_one_study,
    model_name_version,
    next_series_number,
)
from medsight.errors import ResultExportError
from medsight.explain.overlay import overlay_rgb

SC_SERIES_OFFSET = 901
MIN_WIDTH = 512


def caption_lines(analysed: AnalysedImage) -> list[str]:
    """The caption's headline lines: the disclaimer, then the decision, what the heat map shows, the model."""
    p = analysed.prediction
    name, version = model_name_version(p)
    finding = p.reported_finding
    if finding is not None:
        return [DISCLAIMER, f"{finding} (p={p.confidence:.2f}) | heat map: {p.heatmap_label or finding} | {name} {version}"]
    decision = "REFER TO HUMAN READER - no finding reported" if p.refer else "No finding reported"
    return [DISCLAIMER, f"{decision} | {name} {version}"]


def caption_prose(analysed: AnalysedImage) -> str:
    """Burned in below the headline where no finding is reported: why (the referral statement)."""
    p = analysed.prediction
    return "" if p.reported_finding is not None else p.statement


def render_overlay(analysed: AnalysedImage, min_width: int = MIN_WIDTH) -> np.ndarray:
    """(H + caption, W, 3) uint8: image with heat map, enlarged to ``min_width``, caption band below."""
    p = analysed.prediction
    if p.image is None:
        raise ResultExportError(f"{p.source}: prediction carries no image to draw the overlay on")
    if p.heatmap is not None:
        rgb = overlay_rgb(p.image, p.heatmap)
    else:
        base = p.image.to_uint8()
        rgb = np.repeat(base, 3, axis=-1) if base.shape[-1] == 1 else base
    picture = Image.fromarray(rgb)
    if picture.width < min_width:
        scale = min_width / picture.width
        picture = picture.resize((min_width, max(1, round(picture.height * scale))), Image.Resampling.BICUBIC)
    return np.asarray(_with_caption(picture, caption_lines(analysed), caption_prose(analysed)))


def _with_caption(picture: Image.Image, lines: list[str], prose: str = "") -> Image.Image:
    """``lines`` shrink the font until they fit; ``prose`` is then wrapped at word breaks in that font."""
    width = picture.width
    size = max(12, width // 28)
    font = ImageFont.load_default(size=size)
    while size > 8 and max(font.getlength(line) for line in lines) > width - 2 * (size // 2):
        size -= 1
        font = ImageFont.load_default(size=size)
    lines = lines + _wrap(prose, font, width - 2 * (size // 2))
    line_h = int(size * 1.35)
    band = Image.new("RGB", (width, line_h * len(lines) + size), (0, 0, 0))
    draw = ImageDraw.Draw(band)
    for i, line in enumerate(lines):
        draw.text((size // 2, size // 2 + i * line_h), line, fill=(255, 255, 0) if i == 0 else (255, 255, 255), font=font)
    out = Image.new("RGB", (width, picture.height + band.height))
    out.paste(picture, (0, 0))
    out.paste(band, (0, picture.height))
    return out


def _wrap(text: str, font: ImageFont.FreeTypeFont, room: float) -> list[str]:
    lines: list[str] = []
    for word in text.split():
        if lines and font.getlength(f"{lines[-1]} {word}") <= room:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def build_overlay_sc(analysed: AnalysedImage, series_instance_uid: str | None = None, series_number: int | None = None,
                     instance_number: int = 1, sop_instance_uid: str | None = None,
                     min_width: int = MIN_WIDTH) -> hd.sc.SCImage:
    """One Secondary Capture instance in the source study (patient/study attributes copied from the source)."""
    check_one_study([analysed])
    src = analysed.source
    pixels = render_overlay(analysed, min_width)
    orientation = tuple(str(v) for v in src.get("PatientOrientation") or ())
    sc = hd.sc.SCImage.from_ref_dataset(
        ref_dataset=src, pixel_array=pixels, photometric_interpretation="RGB", bits_allocated=8,
        # highdicom requires an orientation for the PATIENT system; it is
        # blanked below when the source does not state one (Type 2 allows empty).
        coordinate_system="PATIENT", patient_orientation=orientation if len(orientation) == 2 and all(orientation) else ("L", "F"),
        series_instance_uid=series_instance_uid or generate_uid(),
        series_number=series_number or next_series_number([src], SC_SERIES_OFFSET),
        sop_instance_uid=sop_instance_uid or generate_uid(), instance_number=instance_number,
        manufacturer=MANUFACTURER, transfer_syntax_uid=ExplicitVRLittleEndian,
        series_description=f"{DISCLAIMER} (heat map)"[:64], software_versions=f"medsight {__version__}",
    )
    if not (len(orientation) == 2 and all(orientation)):
        sc.PatientOrientation = None
    # General Series Laterality is Type 2C (required for paired body parts): carry
    # the source's, else send it empty, which Type 2C permits when it is unknown.
    sc.Laterality = src.get("Laterality") or src.get("ImageLaterality") or None
    # The caption identifies no patient, which is what Burned In Annotation is about (PS3.3 C.7.6.1.1.4).
    sc.BurnedInAnnotation = "NO"
    sc.ImageComments = " | ".join(caption_lines(analysed) + [analysed.prediction.statement])[:10240]
    sc.DerivationDescription = f"Grad-CAM heat map of {model_name_version(analysed.prediction)[0]} blended over the source image"[:1024]
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = src.SOPClassUID, src.SOPInstanceUID
    if analysed.frame_number:
        ref.ReferencedFrameNumber = analysed.frame_number
    sc.SourceImageSequence = [ref]
    carry_deidentification(sc, src)
    return sc


def build_overlay_series(images: Sequence[AnalysedImage]) -> list[hd.sc.SCImage]:
    """All overlays of a study as one new series."""
    check_one_study(images)
    series_uid, number = generate_uid(), next_series_number([a.source for a in images], SC_SERIES_OFFSET)
    return [build_overlay_sc(a, series_uid, number, instance_number=i) for i, a in enumerate(images, start=1)]


__all__ = ["build_overlay_sc", "build_overlay_series", "render_overlay", "caption_lines", "caption_prose"]
