
import numpy as np
import pytest

from medsight.errors import DataSetError
from medsight.io.datasets import load_npz
from medsight.models.package import load_package
from medsight.train.config import TrainConfig
from medsight.train.service import train
from medsight.train.trainer import CHECKPOINT, fit
from tests.conftest import tiny_card, write_npz


def test_tiny_package_learns_planted_signal_and_is_calibrated(tiny_package):
    pkg = load_package(tiny_package)
    c = pkg.card
    assert c.validation_metrics["auc"].value > 0.9
    assert c.calibration.method == "temperature" and c.calibration.nll_after <= c.calibration.nll_before
    assert 0.0 < c.thresholds["disc"] < 1.0
    assert c.training["n_train"] == 100 and c.training["best_epoch"] >= 1


def test_few_labels_finetune_to_new_label_set(tmp_path, tiny_package):
    """50 images per class, three classes the base never saw: head replaced, backbone reused."""
    data = write_npz(tmp_path / "three.npz", n_train=50, n_val=20, n_test=20, classes=3, seed=10)
    pkg = train(out_dir=tmp_path / "ft", data=data, base=str(tiny_package), epochs=8, lr=5e-3)
    c = load_package(tmp_path / "ft").card
    assert c.labels == ["class_0", "class_1", "class_2"] and c.task == "multiclass"
    assert c.training["base_model"] == "tiny@1.0.0"
    assert c.test_metrics["auc"].value > 0.8
    assert pkg.card.input == load_package(tiny_package).card.input


def test_train_from_scratch_on_unseen_rgb_npz(tmp_path):
    data = write_npz(tmp_path / "rgb.npz", n_train=30, n_val=15, n_test=15, rgb=True, seed=4)
    train(out_dir=tmp_path / "rgb", data=data, epochs=2)
    c = load_package(tmp_path / "rgb").card
    assert c.input.channels == 3 and c.input.size == 28 and c.task == "binary"
    assert set(c.test_metrics) >= {"auc", "accuracy", "ece"}


def test_resume_continues_from_checkpoint(tmp_path, tiny_npz):
    names = ["bar", "disc"]
    tr, va = load_npz(tiny_npz, "train", names), load_npz(tiny_npz, "val", names)
    seen = []

    def stop_after_two(r):
        seen.append(r.epoch)
        if r.epoch == 2:
            raise KeyboardInterrupt

    cfg = TrainConfig(epochs=4, batch_size=25, patience=10, augment=None)
    with pytest.raises(KeyboardInterrupt):
        fit(tiny_card(), tr, va, cfg, tmp_path / "r", on_epoch=stop_after_two)
    assert (tmp_path / "r" / CHECKPOINT).is_file()
    resumed = []
    pkg = fit(tiny_card(), tr, va, cfg, tmp_path / "r", resume=True, on_epoch=lambda r: resumed.append(r.epoch))
    assert resumed == [3, 4]
    assert pkg.card.training["epochs_run"] == 4 and not (tmp_path / "r" / CHECKPOINT).exists()


def test_single_class_training_set_is_refused(tmp_path):
    x = np.zeros((10, 28, 28), np.uint8)
    np.savez(tmp_path / "one.npz", train_images=x, train_labels=np.zeros((10, 1)), val_images=x, val_labels=np.zeros((10, 1)))
    with pytest.raises(DataSetError, match="two classes"):
        train(out_dir=tmp_path / "o", data=tmp_path / "one.npz", epochs=1)
