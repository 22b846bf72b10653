"""Validation report: every number checked against scikit-learn / hand formulas, bad input, CLI, self-containment."""

import json
import re

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from sklearn.metrics import confusion_matrix, roc_auc_score
from typer.testing import CliRunner

from medsight.cli import app
from medsight.errors import DataSetError
from medsight.evaluate.calibration import probabilities
from medsight.evaluate.curves import binary_curves, risk_coverage
from medsight.evaluate.metrics import expected_calibration_error
from medsight.evaluate.operating_points import at_prevalence, threshold_table
from medsight.evaluate.report import REPORT_HTML, REPORT_JSON, ValidationOptions, validate, validate_dataset, write_report
from medsight.evaluate.thresholds import threshold_for_sensitivity, youden_threshold
from medsight.io.datasets import load_npz
from medsight.models.package import ModelPackage
from medsight.predict.load import load_model
from tests.conftest import make_images, tiny_card

FAST = ValidationOptions(n_boot=60, gallery_size=3, prevalence=0.05)
NAMES = ["bar", "disc"]


def strict_json(text: str):
    def bad(c):
        raise AssertionError(f"non-finite number {c} in report JSON")

    return json.loads(text, parse_constant=bad)


@pytest.fixture(scope="module")
def binary_report(tiny_package, tiny_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    result = validate(tiny_package, tiny_npz, "test", FAST)
    write_report(result, out)
    return result, out


def test_files_are_written_and_html_is_self_contained(binary_report):
    _, out = binary_report
    html = (out / REPORT_HTML).read_text()
    data = strict_json((out / REPORT_JSON).read_text())
    assert data["model"]["id"] == "tiny@1.0.0" and data["data"]["n_analysed"] == 50
    srcs = re.findall(r'src="([^"]+)"', html)
    assert len(srcs) >= 4 and all(s.startswith("data:image/png;base64,") for s in srcs)
    assert not re.search(r"<(link|script)\b", html) and "http://" not in html and "https://" not in html
    assert not re.search(r"\bnan\b", re.sub(r'src="[^"]+"', "", html), re.IGNORECASE)
    # the HTML shows the JSON's numbers
    assert f"{data['metrics']['values']['auc']['value']:.3f}" in html
    assert f"{data['calibration']['after']['ece']:.3f}" in html


def test_metrics_confusion_and_gallery_match_sklearn(binary_report, tiny_package, tiny_npz):
    result, _ = binary_report
    pred = load_model(tiny_package)
    ds = load_npz(tiny_npz, "test", NAMES)
    p = pred.dataset_probs(ds)[0][:, 1]
    th = pred.card.thresholds["disc"]
    assert result["metrics"]["values"]["auc"]["value"] == pytest.approx(roc_auc_score(ds.y, p))
    assert result["confusion_matrix"]["matrix"] == confusion_matrix(ds.y, (p >= th).astype(int)).tolist()
    fps = result["gallery"]["false_positives"]
    assert fps and all(c["reference"] == "bar" and c["model_says"] == "disc" for c in fps)
    ps = [c["probabilities"]["disc"] for c in fps]
    assert ps == sorted(ps, reverse=True)
    wrong_bar = np.sort(p[(ds.y == 0) & (p >= th)])[::-1][: len(fps)]
    np.testing.assert_allclose(ps, wrong_bar, atol=1e-4)  # the most confident ones, in order


def test_calibration_before_after_match_metrics_module(binary_report, tiny_package, tiny_npz):
    result, _ = binary_report
    pred = load_model(tiny_package)
    ds = load_npz(tiny_npz, "test", NAMES)
    from medsight.models.preprocess import batch_to_tensor

    logits = pred.logits(batch_to_tensor([ds.image(i) for i in range(len(ds))], pred.card.input))
    for key, t in (("before", 1.0), ("after", pred.card.calibration.temperature)):
        pr = probabilities(logits, t)
        ece = expected_calibration_error(pr.max(1), pr.argmax(1) == ds.y, 15)
        assert result["calibration"][key]["ece"] == pytest.approx(ece)
        assert sum(b["count"] for b in result["calibration"][key]["bins"]) == 50


def test_threshold_table_rows_are_hand_checkable():
    rng = np.random.default_rng(3)
    y = np.r_[np.ones(40), np.zeros(160)].astype(int)
    s = np.r_[rng.uniform(0.3, 1, 40), rng.uniform(0, 0.7, 160)]
    t = threshold_table(y, s, 0.5, user_prevalence=0.02)
    op = t["rows"][0]
    tp, fn = ((s >= 0.5) & (y == 1)).sum(), ((s < 0.5) & (y == 1)).sum()
    fp, tn = ((s >= 0.5) & (y == 0)).sum(), ((s < 0.5) & (y == 0)).sum()
    assert (op["tp"], op["fn"], op["fp"], op["tn"]) == (tp, fn, fp, tn)
    sens, spec = tp / (tp + fn), tn / (tn + fp)
    assert op["sensitivity"] == pytest.approx(sens) and op["specificity"] == pytest.approx(spec)
    assert op["at_data_prevalence"]["alarms_per_1000"] == pytest.approx(1000 * (tp + fp) / 200)  # data prevalence: observed rate
    u = op["at_user_prevalence"]
    assert u["alarms_per_1000"] == pytest.approx(1000 * (0.02 * sens + 0.98 * (1 - spec)))
    assert u["ppv"] == pytest.approx(0.02 * sens / (0.02 * sens + 0.98 * (1 - spec)))
    assert u["npv"] == pytest.approx(0.98 * spec / (0.98 * spec + 0.02 * (1 - sens)))
    by_name = {r["name"]: r for r in t["rows"]}
    assert by_name["max Youden's J *"]["threshold"] == pytest.approx(youden_threshold(y, s))
    for target in (0.90, 0.95, 0.99):
        row = by_name[f"sensitivity ≥ {target:.2f} *"]
        assert row["threshold"] == pytest.approx(threshold_for_sensitivity(y, s, target)) and row["sensitivity"] >= target
    assert at_prevalence(None, 0.9, 0.1)["ppv"] is None


def test_curve_bands_and_risk_coverage():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 300)
    s = np.clip(y * 0.3 + rng.normal(0.35, 0.2, 300), 0, 1)
    c = binary_curves(y, s, n_boot=200, seed=1)
    assert c["auc"] == pytest.approx(roc_auc_score(y, s))
    assert c["auc_ci"][0] < c["auc"] < c["auc_ci"][1]
    lo, hi = np.array(c["roc_band"]["lower"]), np.array(c["roc_band"]["upper"])
    assert (lo <= hi + 1e-12).all() and hi[-1] == pytest.approx(1.0)
    one = binary_curves(np.zeros(20, int), rng.uniform(size=20))
    assert one["computable"] is False and "only negative" in one["reason"]
    rc = risk_coverage(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0]))
    assert rc["risk"][-1] == 0.5 and rc["risk"][24] == 0.0 and rc["risk"][49] == 0.5  # 1 case, then 2 cases answered
    assert rc["aurc"] == pytest.approx(np.mean([0, 0.5, 1 / 3, 0.5]))


def test_multiclass_report_uses_one_vs_rest_curves_and_macro_metrics(tmp_path):
    card = tiny_card("tri", labels=("bar", "disc", "vbar"), task="multiclass")
    pkg_dir = ModelPackage.new(card).save(tmp_path / "tri")
    imgs, labels = make_images(12, seed=5, classes=3)
    np.savez(tmp_path / "tri.npz", test_images=imgs, test_labels=labels)
    pred = load_model(pkg_dir)
    ds = load_npz(tmp_path / "tri.npz", "test", ["bar", "disc", "vbar"])
    r = validate_dataset(pred, ds, FAST)
    probs = pred.dataset_probs(ds)[0]
    assert set(r["curves"]) == {"bar", "disc", "vbar"}
    for k, lab in enumerate(["bar", "disc", "vbar"]):
        assert r["curves"][lab]["auc"] == pytest.approx(roc_auc_score(ds.y == k, probs[:, k]))
    assert r["metrics"]["values"]["auc"]["value"] == pytest.approx(roc_auc_score(ds.y, probs, multi_class="ovr"))
    assert np.array(r["confusion_matrix"]["matrix"]).shape == (3, 3)
    assert [t["label"] for t in r["threshold_tables"]] == ["vbar"]  # the card's critical finding
    assert r["operating_point"]["threshold"] is None


def test_single_class_data_reports_not_computable(tiny_package, tmp_path):
    imgs, labels = make_images(15, seed=9)
    keep = labels[:, 0] == 0
    np.savez(tmp_path / "one.npz", test_images=imgs[keep], test_labels=labels[keep])
    result = validate(tiny_package, tmp_path / "one.npz", "test", FAST)
    write_report(result, tmp_path / "r")
    data = strict_json((tmp_path / "r" / REPORT_JSON).read_text())
    assert data["metrics"]["values"]["auc"]["value"] is None and data["metrics"]["values"]["sensitivity"]["value"] is None
    assert data["curves"]["disc"]["computable"] is False
    youden = next(r for r in data["threshold_tables"][0]["table"]["rows"] if "Youden" in r["name"])
    assert youden["threshold"] is None and "both classes" in youden["not_computable"]
    assert any(w["kind"] == "single_class" for w in data["warnings"])
    html = (tmp_path / "r" / REPORT_HTML).read_text()
    assert "not computable" in html and ">nan<" not in html.lower()


def _manifest(tmp_path, rows, n=20, seed=2):
    imgs, labels = make_images(n, seed=seed)
    (tmp_path / "img").mkdir(exist_ok=True)
    for i, im in enumerate(imgs):
        Image.fromarray(im).save(tmp_path / "img" / f"{i:03d}.png")
    df = pd.DataFrame({"path": [f"img/{i:03d}.png" for i in range(len(imgs))],
                       "label": [NAMES[v] for v in labels[:, 0]], **rows(len(imgs))})
    return df


def test_cli_validate_with_subgroups_and_unreadable_file(tiny_package, tmp_path):
    df = _manifest(tmp_path, lambda n: {"sex": (["F", "M"] * n)[:n], "age": np.linspace(5, 90, n)})
    (tmp_path / "img" / "000.png").write_bytes(b"\x89PNG broken")
    df.to_csv(tmp_path / "m.csv", index=False)
    res = CliRunner().invoke(app, ["validate", "-m", str(tiny_package), "-d", str(tmp_path / "m.csv"), "--out", str(tmp_path / "rep"),
                                   "--subgroup", "sex", "--subgroup", "age_bin", "--n-boot", "30", "--min-cases", "10", "--prevalence", "0.1"])
    assert res.exit_code == 0, res.output
    data = strict_json((tmp_path / "rep" / REPORT_JSON).read_text())
    assert data["data"]["n_analysed"] == 39 and len(data["data"]["excluded_unreadable"]) == 1
    assert [c["column"] for c in data["subgroups"]["columns"]] == ["sex", "age_bin"]
    assert sum(data["data"]["subgroup_sizes"]["age_bin"].values()) == 39
    assert data["threshold_tables"][0]["table"]["user_prevalence"] == 0.1


@pytest.mark.parametrize("case, message", [
    ("unknown_label", "not one of the known labels"),
    ("missing_paths", "manifest paths do not exist"),
    ("empty", "no rows"),
    ("bad_subgroup", "subgroup column 'site' is not in the data set"),
    ("bad_prevalence", "prevalence"),
])
def test_cli_bad_input_gives_clear_error(tiny_package, tmp_path, case, message):
    df = _manifest(tmp_path, lambda n: {"sex": ["F"] * n}, n=3)
    extra = []
    if case == "unknown_label":
        df.loc[1, "label"] = "cat"
    elif case == "missing_paths":
        df.loc[0, "path"] = "img/nope.png"
    elif case == "empty":
        df = df.iloc[:0]
    elif case == "bad_subgroup":
        extra = ["--subgroup", "site"]
    elif case == "bad_prevalence":
        extra = ["--prevalence", "1.5"]
    df.to_csv(tmp_path / "m.csv", index=False)
    res = CliRunner().invoke(app, ["validate", "-m", str(tiny_package), "-d", str(tmp_path / "m.csv"),
                                   "--out", str(tmp_path / "rep"), "--n-boot", "20", *extra])
    assert res.exit_code == 2 and "error:" in res.output and message in res.output, res.output
    assert not (tmp_path / "rep" / REPORT_HTML).exists()


def test_label_set_mismatch_is_refused(tiny_package, tiny_npz):
    pred = load_model(tiny_package)
    ds = load_npz(tiny_npz, "test", ["a", "b"])
    with pytest.raises(DataSetError, match="do not match the model"):
        validate_dataset(pred, ds, FAST)
