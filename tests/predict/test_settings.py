"""Thread settings that the Predictor and the command line apply (medsight.predict.settings)."""

from __future__ import annotations

import os

import numpy as np
import pytest
from threadpoolctl import threadpool_info

from medsight.predict.settings import RuntimeSettings, prefer_sleeping_openmp_threads


def blas_threads() -> set[int]:
    return {p["num_threads"] for p in threadpool_info() if p["user_api"] == "blas"}


def test_blas_limit_holds_inside_the_block_only():
    np.ones((64, 64)) @ np.ones((64, 64))  # NumPy's BLAS is loaded
    before = blas_threads()
    with RuntimeSettings(blas_threads=1).blas_limit():
        assert blas_threads() == {1}
    assert blas_threads() == before


def test_blas_threads_must_be_positive():
    with pytest.raises(ValueError):
        RuntimeSettings(blas_threads=0)


def test_openmp_wait_policy_is_a_default_not_an_override(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    prefer_sleeping_openmp_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    prefer_sleeping_openmp_threads()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"
