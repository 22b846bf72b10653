"""Decode and preprocess images in background threads while the model runs on the previous batch.

The machinery behind :meth:`medsight.predict.predictor.Predictor.stream`. Reading a DICOM
or PNG (decompression, LUTs, colour conversion) and resizing it to the network's input
(antialiased, :func:`medsight.models.preprocess.to_tensor`, the one preprocessing) cost
more than a forward pass of these small models, so doing them one after the other leaves
cores idle. Here ``workers`` threads decode and preprocess whole batches, ``prefetch``
batches ahead, while the calling thread runs the model on them (backend, calibration,
decisions, heat maps).

Threads rather than worker processes (``torch.utils.data.DataLoader``): the image
codecs (Pillow, the pydicom pixel-data plugins), NumPy and torch release the GIL while
they work, and a process would have to pickle every decoded float32 image back to the
caller, megabytes per radiograph. benchmarks/throughput measures the thread splits
(see docs/performance.md).

Batches are ``batch_size`` consecutive inputs whatever the number of threads, with
unreadable ones reported in place, so the results do not depend on ``workers``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from medsight.errors import MedSightError
from medsight.io.image import MedImage
from medsight.models.card import InputSpec
from medsight.models.preprocess import to_tensor
from medsight.predict.result import PredictionError

ImageLike = str | Path | MedImage | np.ndarray


def as_image(x: ImageLike) -> MedImage:
    """A path is read (any supported format), an array wrapped; an image is returned as it is."""
    if isinstance(x, MedImage):
        return x
    if isinstance(x, np.ndarray):
        return MedImage.from_array(x, source="<array>", format="array")
    from medsight.io.readers import read_image

    return read_image(x)


@dataclass(frozen=True)
class Prepared:
    """A decoded image and its network input (``to_tensor`` with the model's InputSpec)."""

    image: MedImage
    tensor: torch.Tensor


Decoded = MedImage | PredictionError


def decode(item: ImageLike, spec: InputSpec | None = None) -> Decoded | Prepared:
    """The decoded image (preprocessed too when ``spec`` is given), or a :class:`PredictionError`."""
    try:
        image = as_image(item)
    except MedSightError as e:
        return PredictionError(str(item), str(e), type(e).__name__)
    return image if spec is None else Prepared(image, to_tensor(image, spec))


def decoded_batches(items: Sequence[ImageLike], batch_size: int = 16, workers: int = 1, prefetch: int = 2,
                    spec: InputSpec | None = None) -> Iterator[list[Decoded | Prepared]]:
    """Batches of decoded (and, with ``spec``, preprocessed) inputs in input order; ``workers=0`` works in the caller."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    n = len(items)
    starts = range(0, n, batch_size)

    def chunk(s: int) -> list[ImageLike]:  # indexing, not slicing: lazy sequences read items on access
        return [items[i] for i in range(s, min(s + batch_size, n))]

    if workers < 1 or n <= batch_size:
        for s in starts:
            yield [decode(it, spec) for it in chunk(s)]
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medsight-decode") as pool:
        pending: deque[list[Future]] = deque()
        todo = iter(starts)
        for s in todo:  # fill the pipeline: the batch being predicted plus ``prefetch`` ahead
            pending.append([pool.submit(decode, it, spec) for it in chunk(s)])
            if len(pending) > prefetch:
                break
        while pending:
            batch = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append([pool.submit(decode, it, spec) for it in chunk(nxt)])
            yield [f.result() for f in batch]
