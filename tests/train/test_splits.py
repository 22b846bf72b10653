import numpy as np
import pandas as pd

from medsight.train.splits import group_split


def test_groups_never_cross_splits_and_split_is_reproducible():
    rng = np.random.default_rng(0)
    groups = pd.Series(rng.integers(0, 120, 600)).astype(str)
    labels = pd.Series(rng.integers(0, 3, 600))
    a = group_split(labels, groups, val=0.15, test=0.2, seed=0)
    b = group_split(labels, groups, val=0.15, test=0.2, seed=0)
    assert (a == b).all()
    for g, s in pd.DataFrame({"g": groups, "s": a}).groupby("g")["s"]:
        assert s.nunique() == 1, g
    frac = pd.Series(a).value_counts(normalize=True)
    assert 0.12 < frac["test"] < 0.28 and 0.08 < frac["val"] < 0.22
