"""Runtime settings: where derived model files are cached and how many threads run inference.

Everything here is an explicit value passed down (no module-level state), so a test,
a Ray actor and the CLI can each run with their own cache and thread budget.

Thread policy (see docs/performance.md for the measurements behind it):

* Inference uses one intra-op thread per core the process may run on (its CPU
  affinity, so ``taskset``/cgroup limits are respected). On hosts with SMT
  (hyper-threads) pass the physical core count instead: two hyper-threads share
  the FMA units a convolution saturates, so the second one only adds contention.
* Decoding (DICOM/PNG/JPEG -> pixels) runs in background threads so it overlaps
  inference (:mod:`medsight.predict.stream`); on a small machine one thread is
  enough, on a large one a quarter of the cores keeps the inference threads fed.
* ONNX Runtime's idle threads normally spin for a while waiting for the next
  operator. Between forward passes the Predictor works too (heat maps, resizing),
  and decode threads run alongside; spinning threads steal that time, so sessions
  are created with spinning off (``ort_spinning``; benchmarks/throughput measures
  both settings).
* NumPy's and scikit-learn's BLAS (OpenBLAS) spins the same way, and splits even the
  Predictor's small matrix products (OOD distances of 16 images to a 2,000-image bank)
  over every core; beside the inference and decode threads that costs more than it
  gains, so the Predictor runs them in ``blas_threads`` threads (one by default), via
  threadpoolctl (scikit-learn's own library for this), only for its own arithmetic
  (benchmarks/batch_predict measures the whole command).
* torch's OpenMP threads spin too, after every parallel region, and every thread that
  calls torch gets a team of them: a decode thread resizing with
  :func:`medsight.models.preprocess.to_tensor` then keeps a core busy doing nothing
  between images. The command line asks OpenMP to let idle threads sleep
  (:func:`prefer_sleeping_openmp_threads`), which only works before torch is imported,
  so a library user who runs batches sets ``OMP_WAIT_POLICY=PASSIVE`` themselves.
"""

from __future__ import annotations

import os
from contextlib import AbstractContextManager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path


def available_cores() -> int:
    """CPU cores this process may use (respects taskset/cgroup CPU affinity)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def default_cache_dir() -> Path:
    """``$MEDSIGHT_CACHE_DIR``, else ``$XDG_CACHE_HOME/medsight``, else ``~/.cache/medsight``."""
    explicit = os.environ.get("MEDSIGHT_CACHE_DIR")
    if explicit:
        return Path(explicit)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "medsight"


def prefer_sleeping_openmp_threads() -> None:
    """``OMP_WAIT_POLICY=PASSIVE`` unless the environment says otherwise: idle OpenMP threads sleep
    instead of spinning. OpenMP reads it once, when torch is first imported, so call this before."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


def default_decode_workers(cores: int) -> int:
    """One decode thread on up to 4 cores, then a quarter of the cores (at most 8)."""
    return 1 if cores <= 4 else min(8, cores // 4)


@dataclass(frozen=True)
class RuntimeSettings:
    """How a backend runs: cache location and thread budget.

    ``intra_op_threads`` is the number of threads one forward pass may use;
    ``decode_workers`` the number of threads decoding images ahead of inference
    (0 = decode in the calling thread).
    """

    cache_dir: Path = field(default_factory=default_cache_dir)
    intra_op_threads: int = field(default_factory=available_cores)
    decode_workers: int = field(default_factory=lambda: default_decode_workers(available_cores()))
    ort_spinning: bool = False  # let idle ONNX Runtime threads busy-wait (off: see the module docstring)
    blas_threads: int = 1  # BLAS threads for the Predictor's own arithmetic (see the module docstring)

    def __post_init__(self) -> None:
        if self.intra_op_threads < 1:
            raise ValueError("intra_op_threads must be at least 1")
        if self.blas_threads < 1:
            raise ValueError("blas_threads must be at least 1")
        if self.decode_workers < 0:
            raise ValueError("decode_workers must be 0 or more")

    @property
    def onnx_cache(self) -> Path:
        return Path(self.cache_dir) / "onnx"

    def blas_limit(self) -> AbstractContextManager:
        """A ``with`` block in which NumPy's and scikit-learn's BLAS calls use ``blas_threads`` threads."""
        return _threadpools().limit(limits=self.blas_threads, user_api="blas")

    def with_threads(self, intra_op_threads: int, decode_workers: int | None = None) -> "RuntimeSettings":
        return replace(self, intra_op_threads=intra_op_threads,
                       decode_workers=self.decode_workers if decode_workers is None else decode_workers)


@lru_cache(maxsize=1)
def _threadpools():  # noqa: ANN202 - threadpoolctl.ThreadpoolController, imported on first use
    """The process's thread pools (found once: looking them up walks every loaded library)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController()
