"""Decoding ahead in threads gives exactly the results of the sequential path, bad files included."""

from __future__ import annotations

import pytest
from PIL import Image

from medsight.predict.load import load_model
from medsight.predict.result import PredictionError
from medsight.predict.stream import decoded_batches
from medsight.predict.settings import RuntimeSettings, default_decode_workers
from tests.conftest import make_images


@pytest.fixture
def files(tmp_path):
    imgs, _ = make_images(6, seed=3)
    paths = []
    for i, im in enumerate(imgs):
        p = tmp_path / f"img{i:02d}.png"
        Image.fromarray(im).save(p)
        paths.append(p)
    bad = tmp_path / "img05_corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    paths.insert(5, bad)
    paths.append(tmp_path / "missing.png")
    return paths


def test_threaded_decoding_matches_decoding_in_the_caller(tiny_package, files):
    pred = load_model(tiny_package)
    seq = list(pred.stream(files, explain=True, batch_size=4, workers=0))
    par = list(pred.stream(files, explain=True, batch_size=4, workers=2))
    assert len(par) == len(files) == 14
    for a, b in zip(seq, par):
        assert type(a) is type(b) and a.source == b.source
        if isinstance(a, PredictionError):
            assert (a.kind, a.error) == (b.kind, b.error)
        else:
            assert a.probabilities == b.probabilities and a.label == b.label
            assert (a.heatmap == b.heatmap).all()
    one = pred.predict(files[0])  # the single-item path: the same numbers
    assert one.probabilities == pytest.approx(seq[0].probabilities, abs=1e-6) and one.label == seq[0].label
    kinds = {r.source.rsplit("/", 1)[-1]: r.kind for r in par if isinstance(r, PredictionError)}
    assert set(kinds) == {"img05_corrupt.png", "missing.png"} and kinds["missing.png"] == "ImageNotFoundError"


def test_batches_keep_input_order_and_read_lazy_sequences_by_index(files):
    class Lazy:
        """A sequence that supports indexing only (like the batch engine's record reader)."""

        def __len__(self):
            return len(files)

        def __getitem__(self, i):
            if not isinstance(i, int):
                raise TypeError("index only")
            return files[i]

    for workers in (0, 1, 3):
        batches = list(decoded_batches(Lazy(), batch_size=5, workers=workers, prefetch=1))
        assert [len(b) for b in batches] == [5, 5, 4]
        assert [d.source for b in batches for d in b] == [str(f) for f in files]
    with pytest.raises(ValueError):
        next(decoded_batches(files, batch_size=0))


def test_thread_defaults_suit_small_and_large_machines():
    assert default_decode_workers(2) == 1 and default_decode_workers(4) == 1
    assert default_decode_workers(32) == 8 and default_decode_workers(96) == 8
    s = RuntimeSettings(intra_op_threads=3, decode_workers=0)
    assert s.with_threads(2).intra_op_threads == 2 and s.with_threads(2, 1).decode_workers == 1
    with pytest.raises(ValueError):
        RuntimeSettings(intra_op_threads=0)
