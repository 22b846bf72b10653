"""The OOD detector's k-NN distance is scikit-learn's, computed without its per-call overhead (medsight.predict.ood)."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_array_equal
from safetensors.numpy import load_file
from sklearn.neighbors import NearestNeighbors

from medsight.models.registry import ZOO_DIR
from medsight.predict.ood import LayerScorer, unit_rows


def sklearn_kth(bank: np.ndarray, feats: np.ndarray, k: int) -> np.ndarray:
    """What LayerScorer.knn computed before: scikit-learn's brute-force neighbours, the k-th distance."""
    return NearestNeighbors(n_neighbors=k).fit(bank).kneighbors(unit_rows(np.asarray(feats, dtype=np.float64)))[0][:, -1]


def scorer(bank: np.ndarray, k: int) -> LayerScorer:
    d = bank.shape[1]
    return LayerScorer(np.zeros((2, d)), np.eye(d), bank, k)


@pytest.mark.parametrize("n, k", [(1, 1), (16, 10), (300, 5)])
def test_equals_sklearn_to_the_bit_on_random_data(n, k):
    rng = np.random.default_rng(n)
    bank = unit_rows(rng.normal(size=(500, 24))).astype(np.float32)
    feats = rng.normal(size=(n, 24)) * 3 + 1
    assert_array_equal(scorer(bank, k).knn(feats), sklearn_kth(bank, feats, k))


def test_equals_sklearn_on_a_shipped_bank_including_its_own_vectors():
    arrays = load_file(str(ZOO_DIR / "skin-lesion-ham" / "ood.safetensors"))
    bank = arrays["layer2.bank"]
    rng = np.random.default_rng(0)
    feats = np.concatenate([bank[:8], rng.normal(size=(8, bank.shape[1]))])  # distance 0 to itself included
    assert_array_equal(scorer(bank, 10).knn(feats), sklearn_kth(bank, feats, 10))
