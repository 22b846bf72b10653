"""Labelled data sets: .npz, CSV manifest and class folders, and their specific errors."""

import numpy as np
import pytest
from PIL import Image

from medsight.errors import DataSetError
from medsight.io.datasets import load_dataset, load_npz
from tests.conftest import make_images


@pytest.fixture
def png_tree(tmp_path):
    imgs, labels = make_images(3, seed=3)
    rows = ["path,label,patient_id,sex,age,site"]
    for i, (im, y) in enumerate(zip(imgs, labels[:, 0])):
        name = ["bar", "disc"][y]
        p = tmp_path / "folders" / name / f"{i}.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(im).save(p)
        rows.append(f"folders/{name}/{i}.png,{name},P{i // 2},{'F' if i % 2 else 'M'},{40 + i},site{i % 3}")
    (tmp_path / "manifest.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_npz_splits_and_label_names(tiny_npz):
    ds = load_npz(tiny_npz, "val", ["bar", "disc"])
    assert len(ds) == 50 and ds.label_names == ["bar", "disc"] and ds.y.dtype == np.int64
    assert ds.image(0).pixels.shape == (28, 28, 1)
    assert ds.class_counts() == {"bar": 25, "disc": 25}
    with pytest.raises(DataSetError, match="split must be one of"):
        load_npz(tiny_npz, "holdout")
    with pytest.raises(DataSetError, match="1 label names"):
        load_npz(tiny_npz, "val", ["only-one"])


def test_csv_manifest_keeps_subgroup_columns(png_tree):
    ds = load_dataset(png_tree / "manifest.csv")
    assert ds.label_names == ["bar", "disc"] and len(ds) == 6
    assert list(ds.meta.columns[:5]) == ["label", "patient_id", "sex", "age", "site"]
    assert set(ds.meta["sex"]) == {"F", "M"}
    assert ds.image(0).source.endswith("0.png")
    sub = ds.subset([1, 3])
    assert len(sub) == 2 and list(sub.meta["age"]) == [41, 43]


def test_manifest_errors_are_specific(png_tree):
    (png_tree / "bad_label.csv").write_text("path,label\nfolders/bar/0.png,tumour\n")
    with pytest.raises(DataSetError, match="'tumour'.*not one of the known labels"):
        load_dataset(png_tree / "bad_label.csv", label_names=["bar", "disc"])
    (png_tree / "missing.csv").write_text("path,label\nnope/0.png,bar\n")
    with pytest.raises(DataSetError, match="do not exist"):
        load_dataset(png_tree / "missing.csv")
    (png_tree / "nolabel.csv").write_text("path\nfolders/bar/0.png\n")
    with pytest.raises(DataSetError, match="needs a 'label' column"):
        load_dataset(png_tree / "nolabel.csv")
    (png_tree / "empty.csv").write_text("path,label\n")
    with pytest.raises(DataSetError, match="no rows"):
        load_dataset(png_tree / "empty.csv")
    with pytest.raises(DataSetError, match="no 'split' column"):
        load_dataset(png_tree / "manifest.csv", split="test")


def test_class_folders(png_tree):
    ds = load_dataset(png_tree / "folders")
    assert ds.label_names == ["bar", "disc"] and len(ds) == 6
    with pytest.raises(DataSetError, match="no class sub-folders"):
        load_dataset(png_tree / "folders" / "bar")
    with pytest.raises(DataSetError, match="not found"):
        load_dataset(png_tree / "absent")


def test_batches_skip_unreadable_images_and_report_them(tmp_path):
    from PIL import Image

    from medsight.io.datasets import load_manifest

    rows = ["path,label"]
    for i in range(5):
        Image.fromarray(np.full((8, 8), 40 * i, np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{'a' if i % 2 else 'b'}")
    (tmp_path / "2.png").write_bytes(b"not a png")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    ds = load_manifest(tmp_path / "m.csv")
    failures = []
    got = list(ds.batches(2, failures))
    assert [b.index.tolist() for b in got] == [[0, 1], [3], [4]]
    assert [len(b.images) for b in got] == [2, 1, 1]
    assert [f.row for f in failures] == [2] and failures[0].source.endswith("2.png") and failures[0].error


def test_batches_of_a_set_with_no_readable_image_raise(tmp_path):
    from medsight.errors import DataSetError
    from medsight.io.datasets import load_manifest

    (tmp_path / "a.png").write_bytes(b"junk")
    (tmp_path / "m.csv").write_text("path,label\na.png,x\n")
    with pytest.raises(DataSetError, match="none of the 1 images could be read"):
        list(load_manifest(tmp_path / "m.csv").batches())
