"""Batch inference over a folder, CSV manifest or .npz: in-process, or on Ray Data.

Both engines turn the source into the same records (:mod:`medsight.scale.sources`),
classify them with :class:`~medsight.predict.predictor.Predictor` (the one inference
path) and write the same rows (:mod:`medsight.scale.rows`) to ``results.parquet``
and ``results.csv``. An unreadable image becomes a row with ``error`` set; the rest
of the batch goes on.

The Ray engine uses ``Dataset.map_batches`` with a fixed-size actor pool: each actor
loads the model and builds its backend once, then classifies batch after batch.
Only records (paths, .npz row numbers) travel through Ray; every actor reads its own
pixels, so on a multi-node cluster the source (and the heat-map folder) must be on a
filesystem every node sees, and the model must be installed (zoo name) or on that
filesystem (package path). Ray is imported only here, so the base install works
without it (``pip install medsight[ray]``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from medsight.errors import EngineUnavailableError
from medsight.io.image import MedImage
from medsight.predict.load import load_model
from medsight.predict.predictor import Predictor
from medsight.predict.settings import RuntimeSettings
from medsight.scale.rows import result_row, rows_frame
from medsight.scale.sources import InputReader, list_records

PARQUET = "results.parquet"
CSV = "results.csv"


@dataclass(frozen=True)
class BatchJob:
    """What to classify, with which model, and where the results go."""

    source: Path
    model: str
    out_dir: Path
    backend: str = "auto"
    split: str | None = None  # .npz only: one split's images instead of all
    heatmaps: bool = False  # write an overlay PNG per image under out_dir/heatmaps
    batch_size: int = 32


@dataclass(frozen=True)
class RayOptions:
    """Where and how wide the Ray engine runs."""

    address: str | None = None  # None: start a local Ray instance
    workers: int = 1  # actors in the pool (one model copy each)
    cpus_per_worker: float = 1.0  # Ray CPU reservation per actor = its inference threads
    num_cpus: int | None = None  # local instance only: CPUs Ray may use (default: all)
    progress: bool = True


@dataclass
class BatchSummary:
    n: int
    failed: int
    seconds: float
    parquet: Path | None
    csv: Path
    engine: str
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def images_per_second(self) -> float:
        return self.n / self.seconds if self.seconds > 0 else float("nan")


class LazyInputs(Sequence):
    """Records as predictor inputs, read on access (so decode workers read them, not the caller)."""

    def __init__(self, records: list[dict[str, Any]], reader: InputReader):
        self.records, self.reader = records, reader

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i: int) -> str | MedImage:  # type: ignore[override]
        return self.reader.load_input(self.records[i])


def classify_records(predictor: Predictor, reader: InputReader, records: list[dict[str, Any]], heatmap_dir: Path | None) -> list[dict[str, Any]]:
    """Rows for one Ray batch of records: one model batch, decoded in the actor's own thread."""
    results = predictor.stream(LazyInputs(records, reader), explain=heatmap_dir is not None,
                               batch_size=max(1, len(records)), workers=0)
    return [result_row(int(r["index"]), res, predictor, heatmap_dir) for r, res in zip(records, results)]


class _ResultWriter:
    """Appends row batches to results.csv and (when pyarrow is installed) results.parquet."""

    def __init__(self, out_dir: Path, labels: list[str]):
        out_dir.mkdir(parents=True, exist_ok=True)
        self.labels, self.n, self.failed = labels, 0, 0
        self.backend: str | None = None
        self.csv = out_dir / CSV
        self.csv.unlink(missing_ok=True)
        try:
            import pyarrow  # noqa: F401  (pulled in by medsight[ray])
            self.parquet: Path | None = out_dir / PARQUET
        except ImportError:
            self.parquet = None
        self._pq_writer = None

    def write(self, df: pd.DataFrame) -> None:
        df = rows_frame(df.to_dict("records"), self.labels)
        df.to_csv(self.csv, mode="a", header=self.n == 0, index=False)
        if self.parquet is not None:
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pandas(df, preserve_index=False)
            if self._pq_writer is None:
                self._pq_writer = pq.ParquetWriter(self.parquet, table.schema)
            self._pq_writer.write_table(table)
        self.n += len(df)
        self.failed += int(df["error"].notna().sum())
        if self.backend is None and len(df):
            self.backend = str(df["backend"].iloc[0])

    def close(self) -> None:
        if self._pq_writer is not None:
            self._pq_writer.close()


def run_local(job: BatchJob, settings: RuntimeSettings | None = None,
              on_progress: Callable[[int, int], None] | None = None) -> BatchSummary:
    """The in-process engine (decoding overlapped in ``settings.decode_workers`` threads).

    It is the reference the Ray engine must reproduce: same records, same Predictor
    batches, same rows.
    """
    settings = settings or RuntimeSettings()
    t0 = time.perf_counter()
    records = list_records(job.source, job.split)
    predictor = load_model(job.model, job.backend, settings)
    writer = _ResultWriter(job.out_dir, predictor.card.labels)
    heat_dir = job.out_dir / "heatmaps" if job.heatmaps else None
    results = predictor.stream(LazyInputs(records, InputReader()), explain=heat_dir is not None, batch_size=job.batch_size)
    rows: list[dict[str, Any]] = []
    flush_every = max(job.batch_size, 512)  # fewer, larger CSV/Parquet appends
    try:
        for rec, res in zip(records, results):
            rows.append(result_row(int(rec["index"]), res, predictor, heat_dir))
            if len(rows) == flush_every:
                writer.write(pd.DataFrame(rows))
                rows = []
                if on_progress:
                    on_progress(writer.n, len(records))
        if rows:
            writer.write(pd.DataFrame(rows))
            if on_progress:
                on_progress(writer.n, len(records))
    finally:
        writer.close()
    return BatchSummary(writer.n, writer.failed, time.perf_counter() - t0, writer.parquet, writer.csv, "local",
                        {"backend": predictor.backend.name})


class PredictActor:
    """A Ray Data actor: builds one Predictor, then classifies batches of records."""

    def __init__(self, model: str, backend: str, threads: int, heatmap_dir: str | None, cache_dir: str):
        import torch

        torch.set_num_threads(threads)  # this actor's process only
        settings = RuntimeSettings(cache_dir=Path(cache_dir), intra_op_threads=threads, decode_workers=0)
        self.predictor = load_model(model, backend, settings)
        self.reader = InputReader()
        self.heatmap_dir = Path(heatmap_dir) if heatmap_dir else None

    def __call__(self, batch: pd.DataFrame) -> pd.DataFrame:
        rows = classify_records(self.predictor, self.reader, batch.to_dict("records"), self.heatmap_dir)
        return rows_frame(rows, self.predictor.card.labels)


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as e:
        raise EngineUnavailableError(f"the Ray engine needs Ray Data: pip install 'medsight[ray]' ({e})") from None
    return ray


def run_ray(job: BatchJob, options: RayOptions = RayOptions(), settings: RuntimeSettings | None = None,
            on_progress: Callable[[int, int], None] | None = None) -> BatchSummary:
    """Classify ``job.source`` with a Ray Data actor pool; results stream to disk in input order."""
    ray = _import_ray()
    settings = settings or RuntimeSettings()
    t0 = time.perf_counter()
    records = list_records(job.source, job.split)
    # Load the model here first: a bad model or backend fails fast with a clear error instead of
    # inside every actor, "auto" is resolved once for all actors, and the ONNX cache is warm.
    probe = load_model(job.model, job.backend, settings)
    labels, backend = probe.card.labels, probe.backend.name
    del probe
    started_here = not ray.is_initialized()
    if started_here:
        try:
            if options.address:
                ray.init(address=options.address, include_dashboard=False, log_to_driver=False)
            else:
                ray.init(num_cpus=options.num_cpus, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError) as e:
            raise EngineUnavailableError(f"cannot start or reach Ray{' at ' + options.address if options.address else ''} ({e})") from None
    try:
        ctx = ray.data.DataContext.get_current()
        ctx.execution_options.preserve_order = True  # rows come back in input order, like the local engine
        ctx.enable_progress_bars = options.progress
        threads = max(1, int(options.cpus_per_worker))
        heat_dir = job.out_dir / "heatmaps" if job.heatmaps else None
        n_blocks = max(1, min(len(records) // job.batch_size, 10_000))
        ds = ray.data.from_items(records, override_num_blocks=n_blocks).map_batches(
            PredictActor, batch_size=job.batch_size, batch_format="pandas",
            compute=ray.data.ActorPoolStrategy(size=options.workers), num_cpus=options.cpus_per_worker,
            fn_constructor_kwargs=dict(model=str(Path(job.model).resolve()) if Path(job.model).is_dir() else job.model,
                                       backend=backend, threads=threads,
                                       heatmap_dir=str(heat_dir.resolve()) if heat_dir else None,
                                       cache_dir=str(Path(settings.cache_dir).resolve())),
        )
        writer = _ResultWriter(job.out_dir, labels)
        try:
            for batch in ds.iter_batches(batch_format="pandas", batch_size=None):
                writer.write(batch)
                if on_progress:
                    on_progress(writer.n, len(records))
        finally:
            writer.close()
    finally:
        if started_here:
            ray.shutdown()
    return BatchSummary(writer.n, writer.failed, time.perf_counter() - t0, writer.parquet, writer.csv, "ray",
                        {"backend": backend, "workers": options.workers, "address": options.address or "local"})
