"""``medsight predict`` routes DICOM inputs by the same rule as the service (docs/routing.md).

Without ``--model`` each DICOM file goes to the installed model whose card's applicability everything in
its header fits; a file no model applies to is not analysed and gets a per-file error saying why, and a
PNG/JPEG, whose file says nothing about body part or patient, needs ``--model``. With ``--model`` the
operator has chosen: the model runs, but a DICOM file outside the card's declared use is warned about
and its result says so (``applicability``), so the output cannot pass for an in-scope result.
"""

from __future__ import annotations

from pathlib import Path

NOT_ANALYSED = "not_analysed"


def _header(path: Path):  # noqa: ANN202 - pydicom Dataset, or None for a file that is not DICOM
    from medsight.io.deflate import dcmread
    from medsight.io.readers import sniff

    if sniff(path) != "dicom":
        return None
    return dcmread(path, stop_before_pixels=True, force=True)


def route_inputs(files: list[Path]) -> tuple[dict[str, list[Path]], list[dict]]:
    """(model name -> the files it applies to, in input order; error rows of the files none applies to)."""
    from medsight.models.applicability import StudyAttributes, route
    from medsight.models.registry import list_cards
    from medsight.serve.config import ServiceSettings

    cards = list_cards()
    preferred = ServiceSettings.model_fields["default_models"].default  # the service's choice among several
    groups: dict[str, list[Path]] = {}
    refused: list[dict] = []
    for f in files:
        try:
            header = _header(f)
        except Exception as e:  # noqa: BLE001 - an unreadable header is that file's error, the others go on
            refused.append({"path": str(f), "error": f"unreadable DICOM header: {e}", "error_type": "ImageReadError"})
            continue
        if header is None:
            refused.append({"path": str(f), "error_type": NOT_ANALYSED,
                            "error": "not analysed: a PNG/JPEG/other file carries no header to route by "
                                     "(body part, view, age); choose the model with --model"})
            continue
        decision = route(StudyAttributes.from_header(header), cards, preferred=preferred)
        if decision.model is None:
            refused.append({"path": str(f), "error": decision.message, "error_type": NOT_ANALYSED})
        else:
            groups.setdefault(decision.model, []).append(f)
    return groups, refused


def applicability_notes(card, files: list[Path]) -> dict[str, str]:  # noqa: ANN001 - ModelCard
    """path -> "outside declared use: ..." for each DICOM file the chosen ``card`` does not apply to."""
    from medsight.models.applicability import StudyAttributes, check

    if card.applicability is None:  # nothing declared to be outside of
        return {}
    notes = {}
    for f in files:
        try:
            header = _header(f)
        except Exception:  # noqa: BLE001 - the predictor reports an unreadable file itself
            continue
        if header is None:
            continue
        fit = check(card, StudyAttributes.from_header(header))
        if not fit.applies:
            notes[str(f)] = f"outside declared use: {card.name} {'; '.join(fit.reasons)}"
    return notes


__all__ = ["NOT_ANALYSED", "applicability_notes", "route_inputs"]
