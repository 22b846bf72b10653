"""Batch sources become stable, picklable records; every engine reads them through one function."""

from __future__ import annotations

import numpy as np
import pytest

from medsight.errors import DataSetError
from medsight.io.image import MedImage
from medsight.scale.sources import InputReader, list_records


def test_folder_walk_is_recursive_sorted_and_skips_non_images(batch_folder):
    recs = list_records(batch_folder)
    names = [r["source"].rsplit("/", 1)[-1] for r in recs]
    assert len(recs) == 11 and "notes.txt" not in names
    assert [r["index"] for r in recs] == list(range(11))
    assert [r["source"] for r in recs] == sorted(r["source"] for r in recs)


def test_manifest_paths_are_relative_to_the_csv_and_missing_files_stay_rows(batch_manifest, batch_folder):
    recs = list_records(batch_manifest)
    assert len(recs) == 12
    assert recs[0]["path"] == str((batch_folder / "bar").resolve() / recs[0]["path"].rsplit("/", 1)[-1])
    assert recs[-1]["path"].endswith("gone/missing.png")


def test_npz_all_splits_or_one(batch_npz):
    with np.load(batch_npz) as d:
        sizes = {s: len(d[f"{s}_images"]) for s in ("train", "val", "test")}
        test_images = d["test_images"]
    recs = list_records(batch_npz)
    assert [r["index"] for r in recs] == list(range(sum(sizes.values())))
    assert recs[0]["source"] == "shapes.npz:train[0]" and recs[-1]["source"] == f"shapes.npz:test[{sizes['test'] - 1}]"
    test = list_records(batch_npz, split="test")
    assert len(test) == sizes["test"]
    img = InputReader().load_input(test[2])
    assert isinstance(img, MedImage) and img.source == "shapes.npz:test[2]"
    np.testing.assert_allclose(img.pixels[..., 0], test_images[2] / 255.0, atol=1e-6)
    with pytest.raises(DataSetError, match="no valid_images"):
        list_records(batch_npz, split="valid")


def test_bad_sources_are_clear_errors(tmp_path):
    with pytest.raises(DataSetError, match="no such folder or file"):
        list_records(tmp_path / "nope")
    (tmp_path / "x.json").write_text("{}")
    with pytest.raises(DataSetError, match="folder of images, a CSV manifest"):
        list_records(tmp_path / "x.json")
    (tmp_path / "m.csv").write_text("file,label\na.png,1\n")
    with pytest.raises(DataSetError, match="'path' column"):
        list_records(tmp_path / "m.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataSetError, match="no images found"):
        list_records(tmp_path / "empty")
    (tmp_path / "bad.npz").write_bytes(b"zip? no")
    with pytest.raises(DataSetError, match="not a readable .npz"):
        list_records(tmp_path / "bad.npz")
