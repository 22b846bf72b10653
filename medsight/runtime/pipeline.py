"""Decode images in background threads while the model runs on the previous batch.

Reading a DICOM or PNG (decompression, LUTs, colour conversion) costs as much as a
forward pass of a small model or more, so doing both one after the other leaves a
core idle. Here ``workers`` threads decode whole batches, ``prefetch`` batches
ahead, while the calling thread runs :meth:`Predictor.predict_batch`
(preprocessing, backend, calibration, decisions, heat maps).

Threads rather than worker processes (``torch.utils.data.DataLoader``): the image
codecs (Pillow, the pydicom pixel-data plugins) and NumPy release the GIL while they
work, and a process would have to pickle every decoded float32 image back to the
caller, megabytes per radiograph. benchmarks/throughput measures both thread splits
(see docs/performance.md).

Batches are formed exactly as :meth:`Predictor.predict_many` forms them (``batch_size``
inputs, unreadable ones reported in place), so the results are identical to it.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

from medsight.errors import MedSightError
from medsight.io.image import MedImage
from medsight.predict.predictor import ImageLike, Predictor, as_image
from medsight.predict.result import Prediction, PredictionError

Decoded = MedImage | PredictionError


def decode(item: ImageLike) -> Decoded:
    """A decoded :class:`MedImage`, or a :class:`PredictionError` saying why not."""
    try:
        return as_image(item)
    except MedSightError as e:
        return PredictionError(str(item), str(e), type(e).__name__)


def decoded_batches(items: Sequence[ImageLike], batch_size: int = 16, workers: int = 1, prefetch: int = 2) -> Iterator[list[Decoded]]:
    """Batches of decoded inputs, in input order; ``workers=0`` decodes in the caller."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    n = len(items)
    starts = range(0, n, batch_size)

    def chunk(s: int) -> list[ImageLike]:  # indexing, not slicing: lazy sequences read items on access
        return [items[i] for i in range(s, min(s + batch_size, n))]

    if workers < 1 or n <= batch_size:
        for s in starts:
            yield [decode(it) for it in chunk(s)]
        return
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="medsight-decode") as pool:
        pending: deque[list[Future[Decoded]]] = deque()
        todo = iter(starts)
        for s in todo:  # fill the pipeline: the batch being predicted plus ``prefetch`` ahead
            pending.append([pool.submit(decode, it) for it in chunk(s)])
            if len(pending) > prefetch:
                break
        while pending:
            batch = pending.popleft()
            nxt = next(todo, None)
            if nxt is not None:
                pending.append([pool.submit(decode, it) for it in chunk(nxt)])
            yield [f.result() for f in batch]


def predict_stream(predictor: Predictor, items: Sequence[ImageLike], explain: bool = True, batch_size: int = 16,
                   workers: int = 1) -> Iterator[Prediction | PredictionError]:
    """Predictions for ``items`` in order, decoding ahead in ``workers`` threads."""
    for batch in decoded_batches(items, batch_size, workers):
        images = [d for d in batch if isinstance(d, MedImage)]
        made = iter(predictor.predict_batch(images, explain=explain, raise_errors=False) if images else [])
        yield from (next(made) if isinstance(d, MedImage) else d for d in batch)
