"""Subgroup analysis on data with a planted disparity: the worse group is flagged and its numbers equal sklearn's."""

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy.stats import false_discovery_control
from sklearn.metrics import recall_score, roc_auc_score

from medsight.errors import DataSetError
from medsight.evaluate.metrics import Scorer
from medsight.evaluate.report import ValidationOptions, validate
from medsight.evaluate.subgroups import SubgroupConfig, age_bin, analyse_subgroups, subgroup_frame
from tests.conftest import make_images

CFG = SubgroupConfig(min_cases=30, min_class_cases=5, n_boot=300, seed=0)


def planted(seed=0):
    """Sites A and B (300 cases each) where B's scores are far noisier, plus a 12-case site C."""
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 612)
    noise = np.r_[np.full(300, 0.12), np.full(300, 0.45), np.full(12, 0.12)]
    p_pos = np.clip(0.3 + 0.4 * y + rng.normal(0, 1, 612) * noise, 0.001, 0.999)
    site = pd.Series(["A"] * 300 + ["B"] * 300 + ["C"] * 12, name="site")
    return y, np.c_[1 - p_pos, p_pos], site


def test_planted_disparity_is_flagged_with_sklearn_numbers():
    y, probs, site = planted()
    scorer = Scorer("binary", 1, 0.5)
    res = analyse_subgroups(y, probs, site.to_frame(), scorer, "binary", CFG)
    groups = {g["value"]: g for g in res["columns"][0]["groups"]}
    for name in ("A", "B", "C"):
        m = (site == name).to_numpy()
        assert groups[name]["n"] == m.sum()
        assert groups[name]["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(y[m], probs[m, 1]))
        assert groups[name]["metrics"]["sensitivity"]["value"] == pytest.approx(recall_score(y[m], probs[m, 1] >= 0.5))
        lo, hi = groups[name]["metrics"]["auc"]["ci"]
        assert lo <= groups[name]["metrics"]["auc"]["value"] <= hi
    b = groups["B"]["versus_rest"]["auc"]
    rest = (site != "B").to_numpy()
    assert b["rest"] == pytest.approx(roc_auc_score(y[rest], probs[rest, 1]))
    assert b["difference"] < 0 and b["ci"][1] < 0 and b["significantly_worse"]
    assert not any(t.get("significantly_worse") for t in groups["A"]["versus_rest"].values())
    # site C is too small: shown, not tested, and named in a warning
    assert groups["C"]["judgeable"] is False and "versus_rest" not in groups["C"]
    kinds = {(w["kind"], w["subgroup"]) for w in res["warnings"]}
    assert ("too_small", "site = C") in kinds and ("significantly_worse", "site = B") in kinds
    assert not any(w["subgroup"] == "site = A" for w in res["warnings"])
    # the worst-group gap compares judgeable groups only (A and B)
    gap = res["columns"][0]["worst_group_gap"]
    assert gap["groups_compared"] == ["A", "B"]
    auc_a, auc_b = groups["A"]["metrics"]["auc"]["value"], groups["B"]["metrics"]["auc"]["value"]
    assert gap["metrics"]["auc"]["gap"] == pytest.approx(abs(auc_a - auc_b)) and gap["metrics"]["auc"]["worst_group"] == "B"


def test_p_values_are_benjamini_hochberg_adjusted_together():
    y, probs, site = planted(seed=1)
    frame = pd.DataFrame({"site": site, "parity": np.where(np.arange(len(y)) % 2, "odd", "even")})
    res = analyse_subgroups(y, probs, frame, Scorer("binary", 1, 0.5), "binary", CFG)
    tests = [t for c in res["columns"] for g in c["groups"] for t in g.get("versus_rest", {}).values() if t.get("p") is not None]
    np.testing.assert_allclose([t["p_adjusted"] for t in tests], false_discovery_control([t["p"] for t in tests], method="bh"))
    # random halves carry no disparity
    parity = res["columns"][1]["groups"]
    assert not any(t.get("significantly_worse") for g in parity for t in g["versus_rest"].values())


def test_age_bins_are_documented_edges():
    ages = pd.Series([0, 17.9, 18, 39, 40, 59.5, 60, 79, 80, 101, None, "n/a", -3])
    assert age_bin(ages).tolist() == ["0-17", "0-17", "18-39", "18-39", "40-59", "40-59", "60-79", "60-79", "80+", "80+",
                                      "unknown", "unknown", "unknown"]


def test_subgroup_frame_fills_missing_and_rejects_unknown_columns():
    meta = pd.DataFrame({"sex": ["F", None, "M", " "], "age": [30, 70, None, 5], "source": list("abcd")})
    f = subgroup_frame(meta, ["sex", "age_bin", "intensity_tertile"], mean_intensity=np.array([0.1, 0.5, 0.9, 0.3]))
    assert f["sex"].tolist() == ["F", "unknown", "M", "unknown"]
    assert f["age_bin"].tolist() == ["18-39", "60-79", "unknown", "0-17"]
    assert sorted(f["intensity_tertile"].unique()) == ["high", "low", "mid"]
    with pytest.raises(DataSetError, match="subgroup column 'site' is not in the data set.*'sex'"):
        subgroup_frame(meta, ["site"])
    with pytest.raises(DataSetError, match="needs an 'age' column"):
        subgroup_frame(meta.drop(columns="age"), ["age_bin"])


def test_multiclass_subgroups_use_macro_metrics():
    rng = np.random.default_rng(4)
    y = rng.integers(0, 3, 240)
    logits = np.eye(3)[y] * 2 + rng.normal(0, 1, (240, 3))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    g = pd.Series(np.where(np.arange(240) < 120, "x", "y"), name="g")
    res = analyse_subgroups(y, probs, g.to_frame(), Scorer("multiclass"), "multiclass", CFG)
    x = res["columns"][0]["groups"][0]
    m = (g == "x").to_numpy()
    assert x["metrics"]["auc"]["value"] == pytest.approx(roc_auc_score(y[m], probs[m], multi_class="ovr"))
    assert x["metrics"]["sensitivity"]["value"] == pytest.approx(recall_score(y[m], probs[m].argmax(1), average="macro"))


def test_report_flags_a_site_with_planted_label_noise(tiny_package, tmp_path):
    """End to end: at site B a third of the reference labels are wrong, so the model must look worse there."""
    imgs, labels = make_images(60, seed=11)
    y = labels[:, 0].copy()
    site = np.where(np.arange(len(y)) % 2 == 0, "A", "B")
    flip = (site == "B") & (np.random.default_rng(0).uniform(size=len(y)) < 0.35)
    y[flip] = 1 - y[flip]
    (tmp_path / "img").mkdir()
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / "img" / f"{i}.png")
    pd.DataFrame({"path": [f"img/{i}.png" for i in range(len(y))], "label": np.array(["bar", "disc"])[y], "site": site}).to_csv(
        tmp_path / "m.csv", index=False)
    r = validate(tiny_package, tmp_path / "m.csv", None, ValidationOptions(subgroups=["site"], n_boot=200, gallery_size=0))
    flagged = {(w["subgroup"], w["metric"]) for w in r["warnings"] if w["kind"] == "significantly_worse"}
    assert ("site = B", "auc") in flagged and not any(s == "site = A" for s, _ in flagged)


def test_lean_resampling_metrics_equal_scorer_and_sklearn():
    from sklearn.metrics import average_precision_score, precision_recall_curve, roc_curve

    from medsight.evaluate import resample

    rng = np.random.default_rng(7)
    for trial in range(15):
        n = int(rng.integers(5, 80))
        y = rng.integers(0, 2, n)
        p = np.round(rng.uniform(size=n), 1)  # rounding makes ties
        probs = np.c_[1 - p, p]
        th = float(rng.choice([0.3, 0.5, 0.7]))
        ref, lean = Scorer("binary", 1, th)(y, probs), resample.binary_fn(1, th)(y, probs)
        for m, v in lean.items():
            assert v == pytest.approx(ref[m]) if ref[m] is not None else v is None
        if 0 < y.sum() < n:
            f, t, _ = roc_curve(y, p, drop_intermediate=False)
            np.testing.assert_allclose(np.c_[f, t], np.c_[resample.roc_points(y == 1, p)])
            pr, rc, _ = precision_recall_curve(y, p)
            np.testing.assert_allclose(np.c_[pr, rc], np.c_[resample.pr_points(y == 1, p)])
            assert resample.average_precision(y == 1, p) == pytest.approx(average_precision_score(y, p))
        k = 4
        ym = rng.integers(0, 3 if trial % 2 else 4, n)  # odd trials: class 3 absent
        logits = rng.normal(size=(n, k))
        pm = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
        ref, lean = Scorer("multiclass")(ym, pm), resample.multiclass_fn(k)(ym, pm)
        for m, v in lean.items():
            assert v == pytest.approx(ref[m]) if ref[m] is not None else v is None
