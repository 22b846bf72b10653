"""Batch sources: a folder of images, a CSV manifest, or a MedMNIST-style ``.npz``.

A source becomes a list of small, picklable records (index, display name, where the
pixels are). Records rather than pixels are what Ray distributes, so a million-image
archive costs the driver a few hundred bytes per image, and each worker reads its
own images. Both engines (local and Ray) read records through :func:`load_input`,
so they see the same pixels.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medsight.errors import DataSetError
from medsight.io.image import MedImage
from medsight.io.readers import is_probably_image

NPZ_SPLITS = ("train", "val", "test")


def _record(index: int, source: str, path: str, key: str | None = None, row: int = -1) -> dict[str, Any]:
    return {"index": index, "source": source, "path": path, "npz_key": key or "", "npz_row": row}


def _folder(root: Path) -> list[dict[str, Any]]:
    files = [f for f in sorted(root.rglob("*")) if is_probably_image(f)]
    return [_record(i, str(f), str(f)) for i, f in enumerate(files)]


def _manifest(csv: Path) -> list[dict[str, Any]]:
    try:
        df = pd.read_csv(csv, dtype=str, keep_default_na=False)
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataSetError(f"{csv}: cannot read CSV manifest ({e})") from None
    if "path" not in df.columns:
        raise DataSetError(f"{csv}: manifest needs a 'path' column (has {list(df.columns)})")
    # Missing files are not an error here: each becomes an error row in the results.
    paths = [p if Path(p).is_absolute() else str((csv.parent / p).resolve()) for p in df["path"]]
    return [_record(i, p, p) for i, p in enumerate(paths)]


def npz_keys(path: Path, split: str | None) -> list[str]:
    """Image arrays of an .npz: ``{split}_images`` if a split is named, else every split, else ``images``."""
    try:
        data = np.load(path)  # allow_pickle stays False: an .npz from elsewhere must not run code
    except (OSError, ValueError) as e:
        raise DataSetError(f"{path}: not a readable .npz file ({e})") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise DataSetError(f"{path}: not a readable .npz file (it holds a single array, not named arrays)")
    with data:
        files = set(data.files)
    if split is not None:
        if f"{split}_images" not in files:
            raise DataSetError(f"{path}: no {split}_images array (has {sorted(files)})")
        return [f"{split}_images"]
    keys = [f"{s}_images" for s in NPZ_SPLITS if f"{s}_images" in files] or (["images"] if "images" in files else [])
    if not keys:
        raise DataSetError(f"{path}: no image arrays (expected train/val/test_images or images; has {sorted(files)})")
    return keys


def _npz(path: Path, split: str | None) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    keys = npz_keys(path, split)
    with np.load(path) as data:
        for key in keys:
            n, base = len(data[key]), len(out)
            name = key.removesuffix("_images")
            out.extend([_record(base + i, f"{path.name}:{name}[{i}]", str(path), key, i) for i in range(n)])
    return out


def list_records(source: str | Path, split: str | None = None) -> list[dict[str, Any]]:
    """Records for every image of ``source``, in a stable order (index = position)."""
    src = Path(source)
    if src.is_dir():
        recs = _folder(src)
    elif src.suffix.lower() == ".csv" and src.is_file():
        recs = _manifest(src)
    elif src.suffix.lower() == ".npz" and src.is_file():
        recs = _npz(src, split)
    elif not src.exists():
        raise DataSetError(f"{src}: no such folder or file")
    else:
        raise DataSetError(f"{src}: a batch source is a folder of images, a CSV manifest (.csv with a 'path' column) or an .npz")
    if not recs:
        raise DataSetError(f"{src}: no images found")
    return recs


@dataclass
class InputReader:
    """Turns records into predictor inputs; keeps each .npz array it has opened (per process)."""

    _arrays: dict[tuple[str, str], np.ndarray] = field(default_factory=dict)

    def _array(self, path: str, key: str) -> np.ndarray:
        if (path, key) not in self._arrays:
            with np.load(path) as data:
                self._arrays[(path, key)] = data[key]
        return self._arrays[(path, key)]

    def load_input(self, record: dict[str, Any]) -> str | MedImage:
        """A path for the predictor to read (errors are reported per image), or an npz image."""
        if not record["npz_key"]:
            return str(record["path"])
        pixels = self._array(str(record["path"]), str(record["npz_key"]))[int(record["npz_row"])]
        return MedImage.from_array(pixels, source=str(record["source"]), format="npz")
