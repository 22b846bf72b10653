"""OverlayWriter: overlays written in background threads, the caller's rows handed back in order."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from medsight.explain.overlay import OverlayWriter, overlay_rgb
from medsight.io.image import MedImage


def image_and_map(seed: int, size: int = 48) -> tuple[MedImage, np.ndarray]:
    rng = np.random.default_rng(seed)
    return MedImage.from_array(rng.integers(0, 255, (size, size), dtype=np.uint8)), rng.random((size, size), dtype=np.float32)


def test_rows_come_back_in_order_once_their_overlay_is_on_disk(tmp_path):
    seen = []
    with OverlayWriter(workers=3, max_pending=4) as writer:
        for i in range(20):
            if i % 5 == 4:  # a row without an overlay (an unreadable input) keeps its place
                seen += writer.put(("error", i))
                continue
            im, h = image_and_map(i)
            path = tmp_path / f"{i}.png"
            for kind, j in writer.put(("ok", i), im, h, path):
                seen.append((kind, j))
                assert kind == "error" or (tmp_path / f"{j}.png").is_file()
        seen += writer.drain()
    assert [j for _, j in seen] == list(range(20))
    im, h = image_and_map(7)
    assert np.array_equal(np.asarray(Image.open(tmp_path / "7.png")), overlay_rgb(im, h))


def test_at_most_max_pending_rows_wait(tmp_path):
    with OverlayWriter(workers=1, max_pending=2) as writer:
        waiting = 0
        for i in range(10):
            im, h = image_and_map(i)
            waiting += 1 - len(writer.put(i, im, h, tmp_path / f"{i}.png"))
            assert waiting <= 2
        assert len(writer.drain()) == waiting


def test_a_failed_write_raises(tmp_path):
    (tmp_path / "file").write_text("not a folder")
    im, h = image_and_map(0)
    with pytest.raises(OSError), OverlayWriter() as writer:
        writer.put(0, im, h, tmp_path / "file" / "x.png")
        writer.drain()
