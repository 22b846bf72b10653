"""The bundled sample studies (``medsight/samples/samples.json``) shared by ``medsight demo``,
``medsight serve --demo`` and the tests: images in the package, DICOM files from ``pydicom-data``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from medsight.errors import MedSightError

SAMPLES_DIR = Path(__file__).resolve().parents[1] / "samples"


def sample_entries() -> list[dict[str, Any]]:
    """The entries of ``samples.json``: file or pydicom_data name, model, truth, source, licence."""
    return json.loads((SAMPLES_DIR / "samples.json").read_text())


def sample_path(entry: dict[str, Any]) -> Path:
    if "file" in entry:
        return SAMPLES_DIR / entry["file"]
    import data_store

    root = Path(data_store.__file__).parent
    found = next(root.rglob(entry["pydicom_data"]), None)
    if found is None:
        raise MedSightError(f"sample {entry['pydicom_data']} not found in the pydicom-data package")
    return found
