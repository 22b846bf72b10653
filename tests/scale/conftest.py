"""A small mixed batch source: PNGs in sub-folders, one corrupt file, one manifest row for a missing file."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from medsight.predict.settings import RuntimeSettings
from tests.conftest import make_images, write_npz


@pytest.fixture(scope="session")
def batch_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("batch") / "images"
    imgs, labels = make_images(5, seed=11)
    for i, (im, y) in enumerate(zip(imgs, labels[:, 0])):
        p = root / ("disc" if y else "bar") / f"case{i:02d}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).resize((56, 42)).save(p)
    (root / "bar" / "case99_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    (root / "notes.txt").write_text("not an image, skipped by the folder walk")
    return root


@pytest.fixture(scope="session")
def batch_manifest(batch_folder: Path) -> Path:
    files = sorted(p.relative_to(batch_folder) for p in batch_folder.rglob("*.png"))
    rows = ["path,label"] + [f"{p},x" for p in files] + ["gone/missing.png,x"]
    path = batch_folder / "manifest.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


@pytest.fixture(scope="session")
def batch_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_npz(tmp_path_factory.mktemp("npz") / "shapes.npz", n_train=3, n_val=2, n_test=4)


@pytest.fixture(scope="session")
def scale_settings(tmp_path_factory: pytest.TempPathFactory) -> RuntimeSettings:
    return RuntimeSettings(cache_dir=tmp_path_factory.mktemp("cache"), intra_op_threads=1, decode_workers=0)

