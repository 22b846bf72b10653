"""Labelled data sets in the forms a clinic or a benchmark has them.

* MedMNIST-style ``.npz`` (``{split}_images`` / ``{split}_labels``),
* a CSV manifest ``path,label[,patient_id,sex,age,site,...]`` (paths relative to the CSV;
  an optional ``split`` column selects rows),
* a folder of class sub-folders (``root/<label>/<image>``).

All three become a :class:`LabeledDataset`: images are read lazily through
:func:`medsight.io.read_image`, so a data set can be larger than memory, and the
extra manifest columns are kept in ``meta`` for subgroup analysis.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from medsight.errors import DataSetError, ImageReadError
from medsight.io.image import MedImage

if TYPE_CHECKING:  # pandas is imported where a table is built: predicting images needs no pandas
    import pandas as pd

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetBatch:
    """Consecutive readable images of a data set and their row numbers (``ds.y[index]`` are their labels)."""

    index: np.ndarray
    images: list[MedImage]


@dataclass(frozen=True)
class ReadFailure:
    """An image of a data set that could not be read, and why."""

    row: int
    source: str
    error: str

    def as_dict(self) -> dict[str, str]:
        return {"source": self.source, "error": self.error}


def _empty_frame() -> pd.DataFrame:
    import pandas as pd

    return pd.DataFrame()


@dataclass
class LabeledDataset:
    """Images with integer labels (``y`` shape (N,)) or multi-hot labels (shape (N, K)).

    ``images`` holds either an in-memory uint8 array (N, H, W[, C]) or a list of paths.
    ``meta`` has one row per image (at least ``source``), aligned with ``y``.
    """

    label_names: list[str]
    images: np.ndarray | list[str]
    y: np.ndarray
    meta: pd.DataFrame = field(default_factory=_empty_frame)
    name: str = ""

    def __post_init__(self) -> None:
        import pandas as pd

        if len(self.images) != len(self.y):
            raise DataSetError(f"{self.name}: {len(self.images)} images but {len(self.y)} labels")
        if self.meta.empty:
            self.meta = pd.DataFrame({"source": [self._source(i) for i in range(len(self))]})
        self.meta = self.meta.reset_index(drop=True)

    def __len__(self) -> int:
        return len(self.y)

    @property
    def multilabel(self) -> bool:
        return self.y.ndim == 2

    def _source(self, i: int) -> str:
        if isinstance(self.images, np.ndarray):
            return f"{self.name}[{i}]"
        return str(self.images[i])

    def image(self, i: int) -> MedImage:
        if isinstance(self.images, np.ndarray):
            return MedImage.from_array(self.images[i], source=self._source(i), format="npz")
        from medsight.io.readers import read_image  # local: readers pull in pydicom

        return read_image(self.images[i])

    def batches(self, batch_size: int = 128, failures: list[ReadFailure] | None = None) -> Iterator[DatasetBatch]:
        """The readable images in order, ``batch_size`` rows at a time: the one way to read a labelled set.

        The one error policy for every caller (evaluation, calibration, OOD fitting, tuning,
        training): an image that cannot be read (:class:`~medsight.errors.ImageReadError`) is
        skipped and recorded in ``failures`` (pass a list to see them), so a batch may be shorter
        than ``batch_size``; any other error propagates. A data set of which no image could be
        read raises :class:`~medsight.errors.DataSetError` after the last batch, naming the first
        failure, so nobody computes metrics over nothing.
        """
        if batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        failed = failures if failures is not None else []
        first_failure, read = len(failed), 0
        for start in range(0, len(self), batch_size):
            images, rows = [], []
            for i in range(start, min(start + batch_size, len(self))):
                try:
                    images.append(self.image(i))
                    rows.append(i)
                except ImageReadError as e:
                    failed.append(ReadFailure(i, self._source(i), str(e)))
            if images:
                read += len(images)
                yield DatasetBatch(np.asarray(rows, dtype=int), images)
        if not read:
            why = f" (first error: {failed[first_failure].error})" if len(failed) > first_failure else ""
            raise DataSetError(f"{self.name or 'data set'}: none of the {len(self)} images could be read{why}")

    def subset(self, index: np.ndarray | list[int]) -> "LabeledDataset":
        idx = np.asarray(index, dtype=int)
        imgs = self.images[idx] if isinstance(self.images, np.ndarray) else [self.images[i] for i in idx]
        return LabeledDataset(self.label_names, imgs, self.y[idx], self.meta.iloc[idx].reset_index(drop=True), self.name)

    def class_counts(self) -> dict[str, int]:
        if self.multilabel:
            return {n: int(c) for n, c in zip(self.label_names, self.y.sum(axis=0))}
        counts = np.bincount(self.y, minlength=len(self.label_names))
        return {n: int(c) for n, c in zip(self.label_names, counts)}

    def summary(self) -> dict[str, Any]:
        return {"name": self.name, "n": len(self), "classes": self.class_counts()}


def load_npz(path: str | Path, split: str, label_names: list[str] | None = None) -> LabeledDataset:
    path = Path(path)
    if split not in SPLITS:
        raise DataSetError(f"split must be one of {SPLITS}, got {split!r}")
    try:
        data = np.load(path)
    except (OSError, ValueError) as e:
        raise DataSetError(f"{path}: not a readable .npz file ({e})") from None
    key_i, key_l = f"{split}_images", f"{split}_labels"
    if key_i not in data or key_l not in data:
        raise DataSetError(f"{path}: no {key_i}/{key_l} arrays (has {sorted(data.files)})")
    _check_image_budget(data, key_i, path)
    images, labels = data[key_i], data[key_l]
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (1, 3)):
        raise DataSetError(f"{path}: {key_i} must be (N,H,W) or (N,H,W,1|3), got {images.shape}")
    if len(images) == 0:
        raise DataSetError(f"{path}: split {split!r} is empty")
    labels = labels.reshape(len(labels), -1)
    if labels.shape[1] == 1:
        y = labels[:, 0].astype(np.int64)
        n_classes = int(max(y.max() + 1, len(label_names or [])))
        # Binary MedMNIST-style sets always have two classes even if a split holds one.
        n_classes = max(n_classes, 2)
    else:
        y = labels.astype(np.float32)
        n_classes = labels.shape[1]
    names = label_names or [f"class_{i}" for i in range(n_classes)]
    if len(names) != n_classes:
        raise DataSetError(f"{path}: {n_classes} classes in the labels but {len(names)} label names given")
    return LabeledDataset(names, images, y, name=f"{path.stem}:{split}")


def _check_image_budget(data: Any, key: str, path: Path) -> None:
    """One image's samples (from the .npy header, before the array is inflated) against the pixel budget."""
    from numpy.lib import format as npy

    from medsight.io.budget import current_budget

    try:
        with data.zip.open(f"{key}.npy") as fh:
            version = npy.read_magic(fh)
            read_header = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            shape = read_header(fh)[0]
    except Exception:  # not a plain .npy member: np.load reports it when the array is read
        return
    if len(shape) >= 3:
        current_budget().check_pixels(int(np.prod(shape[1:], dtype=np.int64)), f"one {key} image {tuple(shape[1:])}", path)


def load_manifest(
    path: str | Path, split: str | None = None, label_names: list[str] | None = None, label_column: str = "label"
) -> LabeledDataset:
    import pandas as pd

    path = Path(path)
    try:
        df = pd.read_csv(path, dtype={label_column: str})
    except (OSError, pd.errors.ParserError, UnicodeDecodeError) as e:
        raise DataSetError(f"{path}: cannot read CSV manifest ({e})") from None
    for col in ("path", label_column):
        if col not in df.columns:
            raise DataSetError(f"{path}: manifest needs a {col!r} column (has {list(df.columns)})")
    if split is not None:
        if "split" not in df.columns:
            raise DataSetError(f"{path}: split {split!r} requested but the manifest has no 'split' column")
        df = df[df["split"] == split]
    if df.empty:
        raise DataSetError(f"{path}: no rows" + (f" for split {split!r}" if split else ""))
    name = path.stem if split is None else f"{path.stem}:{split}"
    return dataset_from_frame(df, path.parent, label_names, label_column, name)


def dataset_from_frame(
    df: pd.DataFrame, base_dir: str | Path, label_names: list[str] | None = None, label_column: str = "label", name: str = ""
) -> LabeledDataset:
    """Rows with ``path`` (relative to ``base_dir`` or absolute) and a label column."""
    if df.empty:
        raise DataSetError(f"{name or base_dir}: no rows")
    df = df.reset_index(drop=True)
    raw = df[label_column].astype(str).str.strip()
    if label_names is None:
        label_names = _infer_label_names(raw)
    where = Path(base_dir) / (name or "manifest")
    y = _encode_labels(raw, label_names, where)
    base = Path(base_dir)
    paths = [p if Path(p).is_absolute() else str((base / p).resolve()) for p in df["path"].astype(str)]
    missing = [p for p in paths if not Path(p).exists()]
    if missing:
        raise DataSetError(f"{where}: {len(missing)} manifest paths do not exist, e.g. {missing[0]}")
    meta = df.drop(columns=["path"]).assign(source=paths)
    return LabeledDataset(label_names, paths, y, meta, name=name)


def _infer_label_names(raw: pd.Series) -> list[str]:
    values = sorted(raw.unique())
    if all(v.lstrip("-").isdigit() for v in values):
        k = max(int(v) for v in values) + 1
        return [f"class_{i}" for i in range(max(k, 2))]
    return values


def _encode_labels(raw: pd.Series, names: list[str], where: Path) -> np.ndarray:
    lookup = {n: i for i, n in enumerate(names)}
    out = np.empty(len(raw), dtype=np.int64)
    for i, v in enumerate(raw):
        if v in lookup:
            out[i] = lookup[v]
        elif v.lstrip("-").isdigit() and 0 <= int(v) < len(names):
            out[i] = int(v)
        else:
            raise DataSetError(f"{where}: label {v!r} (row {i}) is not one of the known labels {names}")
    return out


def load_folder(root: str | Path, label_names: list[str] | None = None) -> LabeledDataset:
    from medsight.io.readers import is_probably_image

    root = Path(root)
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataSetError(f"{root}: no class sub-folders (expected root/<label>/<image files>)")
    names = label_names or classes
    unknown = [c for c in classes if c not in names]
    if unknown:
        raise DataSetError(f"{root}: folders {unknown} are not among the labels {names}")
    paths, y = [], []
    for c in classes:
        for f in sorted((root / c).rglob("*")):
            if f.is_file() and is_probably_image(f):
                paths.append(str(f))
                y.append(names.index(c))
    if not paths:
        raise DataSetError(f"{root}: class folders hold no images")
    return LabeledDataset(names, paths, np.asarray(y, dtype=np.int64), name=root.name)


def load_dataset(
    source: str | Path, split: str | None = None, label_names: list[str] | None = None
) -> LabeledDataset:
    """Open any supported labelled data source (see module docstring)."""
    p = Path(source)
    if not p.exists():
        raise DataSetError(f"{p}: data set not found")
    if p.suffix == ".npz":
        return load_npz(p, split or "test", label_names)
    if p.suffix.lower() == ".csv":
        return load_manifest(p, split, label_names)
    if p.is_dir():
        if (p / "manifest.csv").is_file():
            return load_manifest(p / "manifest.csv", split, label_names)
        if split is not None and (p / split).is_dir():
            return load_folder(p / split, label_names)
        return load_folder(p, label_names)
    raise DataSetError(f"{p}: not a .npz, .csv manifest or folder of class sub-folders")
