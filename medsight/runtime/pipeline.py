"""Decode images in worker processes while the model runs on the previous batch.

Reading a DICOM or PNG (decompression, LUTs, colour conversion) costs about as much
as a forward pass of a small model, so doing both in one thread leaves the cores
half idle. A ``torch.utils.data.DataLoader`` over the inputs decodes whole batches
in ``workers`` processes, ``prefetch`` batches ahead; the calling process only
runs :meth:`Predictor.predict_batch` (preprocessing, backend, calibration,
decisions, heat maps). Processes rather than threads, because pydicom and the
pixel-data plugins hold the GIL for much of their work.

Batches are formed exactly as :meth:`Predictor.predict_many` forms them (``batch_size``
inputs, unreadable ones reported in place), so the results are identical to it.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch.utils.data import DataLoader, Dataset

from medsight.errors import MedSightError
from medsight.io.image import MedImage
from medsight.predict.predictor import ImageLike, Predictor, as_image
from medsight.predict.result import Prediction, PredictionError

Decoded = MedImage | PredictionError


class DecodeDataset(Dataset):
    """Index -> decoded :class:`MedImage`, or a :class:`PredictionError` saying why not."""

    def __init__(self, items: Sequence[ImageLike]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> Decoded:
        item = self.items[i]
        try:
            return as_image(item)
        except MedSightError as e:
            return PredictionError(str(item), str(e), type(e).__name__)


def _as_list(batch: list[Decoded]) -> list[Decoded]:
    return batch


def decoded_batches(items: Sequence[ImageLike], batch_size: int = 16, workers: int = 1, prefetch: int = 2) -> Iterator[list[Decoded]]:
    """Batches of decoded inputs, in input order; ``workers=0`` decodes in the caller."""
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    ds = DecodeDataset(items)
    # A worker process costs ~0.1 s to start: not worth it for a single batch.
    workers = workers if len(ds) > batch_size else 0
    loader = DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=_as_list,
                        prefetch_factor=prefetch if workers else None, persistent_workers=False)
    yield from loader


def predict_stream(predictor: Predictor, items: Sequence[ImageLike], explain: bool = True, batch_size: int = 16,
                   workers: int = 1) -> Iterator[Prediction | PredictionError]:
    """Predictions for ``items`` in order, decoding ahead in ``workers`` processes."""
    for batch in decoded_batches(items, batch_size, workers):
        images = [d for d in batch if isinstance(d, MedImage)]
        made = iter(predictor.predict_batch(images, explain=explain, raise_errors=False) if images else [])
        yield from (next(made) if isinstance(d, MedImage) else d for d in batch)
