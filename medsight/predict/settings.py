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
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
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

    def __post_init__(self) -> None:
        if self.intra_op_threads < 1:
            raise ValueError("intra_op_threads must be at least 1")
        if self.decode_workers < 0:
            raise ValueError("decode_workers must be 0 or more")

    @property
    def onnx_cache(self) -> Path:
        return Path(self.cache_dir) / "onnx"

    def with_threads(self, intra_op_threads: int, decode_workers: int | None = None) -> "RuntimeSettings":
        return replace(self, intra_op_threads=intra_op_threads,
                       decode_workers=self.decode_workers if decode_workers is None else decode_workers)
