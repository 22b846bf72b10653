"""int8 quantisation and the measured backend choice written to the card."""

from __future__ import annotations

import numpy as np
import pytest

from medsight.errors import BackendError
from medsight.io.datasets import load_npz
from medsight.models.package import load_package, read_card, write_card
from medsight.models.preprocess import batch_to_tensor
from medsight.evaluate.ood_fit import fit_ood
from medsight.predict.ood import IMAGE, LAYERS
from medsight.predict.load import load_model
from medsight.predict.backends import make_backend
from medsight.predict.cache import int8_model_path
from medsight.predict.settings import RuntimeSettings
from medsight.evaluate.tune import TuneConfig, auc, choose, split_inputs, tune

NAMES = ["bar", "disc"]
FAST = TuneConfig(calibration_images=64, timing_images=64, timing_repeats=2)


def test_choose_is_the_fastest_eligible_backend():
    c = {"torch": {"images_per_s": 100.0, "eligible": True, "why": "reference"},
         "onnx": {"images_per_s": 150.0, "eligible": True, "why": "ok"},
         "onnx-int8": {"images_per_s": 400.0, "eligible": False, "why": "test AUC drop 0.0100 > 0.005"}}
    best, reason = choose(c)
    assert best == "onnx" and "onnx-int8 (test AUC drop 0.0100 > 0.005)" in reason
    c["onnx"]["eligible"] = False
    assert choose(c)[0] == "torch"
    c["onnx-int8"]["eligible"] = True
    assert choose(c)[0] == "onnx-int8"


@pytest.fixture(scope="module")
def tuned(tiny_package, tiny_npz, tmp_path_factory):
    """A tuned copy of the tiny package; another tool edits its card while tuning runs."""
    import shutil

    import medsight.evaluate.tune as tune_module

    d = shutil.copytree(tiny_package, tmp_path_factory.mktemp("tuned") / "tiny")
    real = tune_module.measure_calibration

    def concurrent_edit(*args, **kw):
        card = read_card(d)
        card.limitations = [*card.limitations, "edited by another tool during tuning"]
        write_card(card, d)
        return real(*args, **kw)

    settings = RuntimeSettings(cache_dir=tmp_path_factory.mktemp("cache"), intra_op_threads=1, decode_workers=0)
    train, test = load_npz(tiny_npz, "train", NAMES), load_npz(tiny_npz, "test", NAMES)
    # so the int8 rule also checks OOD referral agreement; with the image-level block, as the zoo's detectors have it
    fit_ood(d, train, load_npz(tiny_npz, "val", NAMES), blocks=(*LAYERS, IMAGE))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tune_module, "measure_calibration", concurrent_edit)
        rt = tune(d, train, test, settings, FAST)
    return d, rt, settings, test


def test_tune_records_measurements_and_keeps_other_fields(tuned):
    d, rt, _, test = tuned
    card = read_card(d)
    assert card.runtime == rt and card.limitations[-1] == "edited by another tool during tuning"
    assert (d / rt["int8"]["calibration_file"]).is_file() and len(rt["int8"]["calibration_sha256"]) == 64
    assert set(rt["candidates"]) == {"torch", "onnx", "onnx-int8"}
    assert rt["weights_sha256"] == card.weights_sha256
    c = rt["candidates"]
    assert c["onnx"]["max_abs_logit_diff"] <= 1e-4 and c["onnx"]["eligible"]
    assert c["onnx"]["ood_flag_agreement"] == 1.0 and c["onnx"]["ood_max_abs_score_diff"] < 1e-3
    int8 = c["onnx-int8"]
    assert 0 <= int8["ood_flag_agreement"] <= 1
    assert int8["eligible"] == (int8["auc_drop"] <= 0.005 and int8["ood_flag_agreement"] >= 0.99)
    eligible = [k for k, v in c.items() if v["eligible"]]
    assert rt["backend"] == max(eligible, key=lambda k: c[k]["images_per_s"])
    # the recorded AUC is the card-calibrated AUC recomputed independently
    pkg = load_package(d)
    probs = load_model(pkg, backend="torch").dataset_probs(test)[0]  # the torch candidate's AUC, not the recorded backend's
    from sklearn.metrics import roc_auc_score

    assert c["torch"]["test_auc"] == pytest.approx(roc_auc_score(test.y, probs[:, 1]))


def test_int8_rebuilds_from_the_card_alone(tuned, tmp_path):
    """A fresh machine (empty cache, no training data) rebuilds the same int8 model from the package alone."""
    d, rt, settings, test = tuned
    pkg = load_package(d)
    x = split_inputs(pkg, test).x
    first = make_backend(pkg, "onnx-int8", settings).forward(x).logits
    fresh = RuntimeSettings(cache_dir=tmp_path, intra_op_threads=1, decode_workers=0)
    again = make_backend(pkg, "onnx-int8", fresh)
    np.testing.assert_array_equal(again.forward(x).logits, first)
    assert again.model_path.parent == tmp_path / "onnx"
    assert auc(pkg.card, test.y, first) == pytest.approx(rt["candidates"]["onnx-int8"]["test_auc"])
    # it is a real int8 model: quantised weights, and logits close to (not equal to) fp32
    import onnx

    types = {i.data_type for i in onnx.load(again.model_path).graph.initializer}
    assert onnx.TensorProto.INT8 in types
    ref = make_backend(pkg, "torch").forward(x).logits
    assert 0 < np.abs(first - ref).max() < 1.0


def test_auto_uses_the_recorded_choice(tuned):
    d, rt, settings, _ = tuned
    assert make_backend(load_package(d), "auto", settings).name == rt["backend"]


def test_calibration_for_other_weights_is_refused(tuned):
    d, _, settings, _ = tuned
    pkg = load_package(d)
    pkg.card.runtime = dict(pkg.card.runtime, weights_sha256="0" * 64)
    with pytest.raises(BackendError, match="other weights"):
        int8_model_path(pkg, settings)


def test_tampered_calibration_file_is_refused(tuned, tmp_path):
    import json
    import shutil

    d, rt, _, _ = tuned
    copy = shutil.copytree(d, tmp_path / "pkg")
    calib_file = copy / rt["int8"]["calibration_file"]
    data = json.loads(calib_file.read_text())
    first = next(iter(data["data"].values()))
    first["highest"]["data"] = [v * 10 for v in first["highest"]["data"]]
    calib_file.write_text(json.dumps(data))
    fresh = RuntimeSettings(cache_dir=tmp_path / "cache", intra_op_threads=1, decode_workers=0)
    with pytest.raises(BackendError, match="does not match the card"):
        make_backend(load_package(copy), "onnx-int8", fresh)
    calib_file.unlink()
    with pytest.raises(BackendError, match="is missing"):
        make_backend(load_package(copy), "onnx-int8", fresh)


def test_calibration_reader_uses_the_one_preprocessing(tiny_package, tiny_npz):
    from medsight.predict.quantize import DatasetCalibrationReader

    pkg = load_package(tiny_package)
    ds = load_npz(tiny_npz, "val", NAMES).subset(range(10))
    reader = DatasetCalibrationReader(ds, pkg.card.input, batch_size=4)
    batches = []
    while (b := reader.get_next()) is not None:
        batches.append(b["input"])
    assert [len(b) for b in batches] == [4, 4, 2]
    expected = batch_to_tensor([ds.image(i) for i in range(10)], pkg.card.input).numpy()
    np.testing.assert_array_equal(np.concatenate(batches), expected)


def test_int8_graph_keeps_the_stem_fp32_and_residual_blocks_int8(tuned):
    """The recipe profiled in medsight.predict.quantize: fp32 stem, then QLinearConv/QLinearAdd, statistics fp32."""
    import onnx

    d, _, settings, _ = tuned
    graph = onnx.load(int8_model_path(load_package(d), settings)).graph
    ops = [(n.op_type, n.name) for n in graph.node]
    assert [op for op, name in ops if name.startswith("/conv1/")] == ["Conv"]  # the stem convolution stays fp32
    assert not [name for op, name in ops if op == "Conv" and not name.startswith("/conv1/")]  # every other one is int8
    assert sum(op == "QLinearConv" for op, _ in ops) >= 8 and any(op == "QLinearAdd" for op, _ in ops)
    assert not [name for op, name in ops if op == "Add" and name.startswith("/layer")]  # residual adds in int8
    assert any(op == "ReduceMean" for op, _ in ops)  # the OOD statistics stay fp32
