"""Rebuild medsight/samples/ from ../shared/data: a handful of *test-split* images with attribution.

Test-split images only, so the demo never shows a model an image it was trained on.
Usage: .venv/bin/python scripts/make-samples.py [--data-root ../shared/data]
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image

from medsight.train.recipe import Recipe, recipe_splits

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "medsight" / "samples"

NPZ = [  # (recipe, labels wanted in order)
    ("pneumonia-cxr", ["normal", "pneumonia"]),
    ("breast-us-malignancy", ["malignant", "normal_or_benign"]),
]
FOLDERS = [
    ("breast-us-busi", ["benign", "malignant"]),
    ("skin-lesion-ham", ["nv", "mel"]),
]
DICOM = [  # files of the pydicom-data package, referenced (not copied) by the demo
    {"pydicom_data": "RG1_J2KR.dcm", "model": "pneumonia-cxr", "truth": None,
     "note": "Adult chest CR (MONOCHROME1, JPEG 2000): outside the paediatric training population.",
     "source": "pydicom-data package (CompressedSamples RG1)", "licence": "pydicom-data (MIT); images from the NEMA/DICOM compressed samples"},
    {"pydicom_data": "US1_J2KR.dcm", "model": "breast-us-busi", "truth": None,
     "note": "Ultrasound of unspecified anatomy (YBR_RCT colour, JPEG 2000): not a breast study.",
     "source": "pydicom-data package (CompressedSamples US1)", "licence": "pydicom-data (MIT); images from the NEMA/DICOM compressed samples"},
]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data-root", type=Path, default=ROOT.parent / "shared" / "data")
    args = ap.parse_args()
    if OUT.exists():
        shutil.rmtree(OUT)
    OUT.mkdir(parents=True)
    entries: list[dict] = []
    for name, wanted in NPZ + FOLDERS:
        recipe = Recipe.load(ROOT / "recipes" / f"{name}.json")
        test = recipe_splits(recipe.data, args.data_root)["test"]
        for label in wanted:
            i = int(np.where(test.y == test.label_names.index(label))[0][0])
            if isinstance(test.images, np.ndarray):
                fname = f"{name}_test{i:04d}_{label}.png"
                Image.fromarray(test.images[i]).save(OUT / fname)
                origin = f"{recipe.data.source} test split, row {i}"
            else:
                src = Path(test.images[i])
                fname = f"{name}_{src.name}"
                shutil.copyfile(src, OUT / fname)
                origin = f"{recipe.data.source}/{Path(src).relative_to(args.data_root / recipe.data.source)} (test split of the recipe)"
            entries.append({"file": fname, "model": name, "truth": label, "source": origin,
                            "citation": recipe.card["training"]["source"], "licence": recipe.card["training"]["licence"]})
    entries.extend(DICOM)
    (OUT / "samples.json").write_text(json.dumps(entries, indent=2) + "\n")
    lines = ["# Sample images shipped for the demo", "",
             "Each image is from the *test* split of the model's recipe, so no model has seen it in training.", "",
             "| file | model | truth | source | citation | licence |", "|---|---|---|---|---|---|"]
    for e in entries:
        lines.append(f"| {e.get('file') or e['pydicom_data'] + ' (from the installed pydicom-data package)'} | {e['model']} | {e['truth'] or '-'} | "
                     f"{e['source']} | {e.get('citation', '-')} | {e['licence']} |")
    (OUT / "ATTRIBUTION.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(entries)} samples to {OUT}")


if __name__ == "__main__":
    main()
