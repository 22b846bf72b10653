import numpy as np
import pytest
from PIL import Image

import medsight
from medsight.errors import NotAnImageError, UnknownModelError
from medsight.predict.result import Prediction, PredictionError
from tests.conftest import make_images


@pytest.fixture
def disc_png(tmp_path):
    imgs, labels = make_images(3, seed=99)
    i = int(np.where(labels[:, 0] == 1)[0][0])
    # upscale so the heat map must be resized to the image's own resolution
    Image.fromarray(imgs[i]).resize((112, 84)).save(tmp_path / "disc.png")
    return tmp_path / "disc.png"


def test_predict_one_liner(tiny_package, disc_png):
    m = medsight.load_model(tiny_package)
    r = m.predict(disc_png)
    assert isinstance(r, Prediction)
    assert set(r.probabilities) == {"bar", "disc"}
    assert sum(r.probabilities.values()) == pytest.approx(1.0)
    assert r.heatmap.shape == (84, 112) and 0.0 <= r.heatmap.min() and r.heatmap.max() <= 1.0
    assert r.label in ("bar", "disc") and r.statement
    assert r.model == "tiny@1.0.0"


def test_predict_accepts_arrays_and_agrees_with_files(tiny_package, disc_png):
    m = medsight.load_model(tiny_package)
    arr = np.asarray(Image.open(disc_png))
    a, b = m.predict(arr, explain=False), m.predict(disc_png, explain=False)
    assert a.probabilities == pytest.approx(b.probabilities, abs=1e-6)
    assert a.heatmap is None


def test_batch_goes_past_bad_files(tiny_package, disc_png, tmp_path):
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    m = medsight.load_model(tiny_package)
    out = list(m.stream([disc_png, bad, empty, disc_png], batch_size=3))
    assert [type(r) for r in out] == [Prediction, PredictionError, PredictionError, Prediction]
    assert out[1].kind == "NotAnImageError" and out[2].kind == "EmptyFileError"
    with pytest.raises(NotAnImageError):
        m.predict(bad)


def test_unknown_model_name():
    with pytest.raises(UnknownModelError, match="unknown model 'no-such-model'"):
        medsight.load_model("no-such-model")


def test_missing_file_is_reported_not_raised_in_batches(tiny_package, disc_png, tmp_path):
    m = medsight.load_model(tiny_package)
    out = list(m.stream(iter([tmp_path / "gone.dcm", disc_png])))  # any iterable
    assert isinstance(out[0], PredictionError) and out[0].kind == "ImageNotFoundError"
    assert isinstance(out[1], Prediction)
