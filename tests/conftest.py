"""Shared fixtures: a small synthetic data set with a planted, learnable signal and a tiny model trained on it.

The images are made here (no downloads, no ../shared/data): class 1 has a bright
disc, class 0 a bright bar, both at random positions with noise, so a correct
trainer must reach a high AUC and a broken one cannot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from medsight.models.card import Architecture, InputSpec, ModelCard

TINY_ARCH = Architecture(layers=[1, 1, 1, 1], widths=[8, 16, 32, 32], stem_stride=1)


def make_images(n_per_class: int, seed: int, size: int = 28, classes: int = 2, rgb: bool = False) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    imgs, labels = [], []
    for c in range(classes):
        for _ in range(n_per_class):
            im = rng.normal(60, 20, (size, size))
            cy, cx = rng.integers(8, size - 8, 2)
            if c == 0:
                im[max(cy - 2, 0) : cy + 2, max(cx - 7, 0) : cx + 7] += 150  # horizontal bar
            elif c == 1:
                im[(yy - cy) ** 2 + (xx - cx) ** 2 <= 16] += 150  # disc
            else:
                im[max(cy - 7, 0) : cy + 7, max(cx - 2, 0) : cx + 2] += 150  # vertical bar
            im = np.clip(im, 0, 255).astype(np.uint8)
            imgs.append(np.repeat(im[..., None], 3, -1) if rgb else im)
            labels.append(c)
    order = rng.permutation(len(labels))
    return np.stack(imgs)[order], np.asarray(labels, dtype=np.uint8)[order, None]


def write_npz(path: Path, n_train: int = 50, n_val: int = 25, n_test: int = 25, classes: int = 2, rgb: bool = False, seed: int = 0) -> Path:
    tr = make_images(n_train, seed, classes=classes, rgb=rgb)
    va = make_images(n_val, seed + 1, classes=classes, rgb=rgb)
    te = make_images(n_test, seed + 2, classes=classes, rgb=rgb)
    np.savez_compressed(path, train_images=tr[0], train_labels=tr[1], val_images=va[0], val_labels=va[1], test_images=te[0], test_labels=te[1])
    return path


def tiny_card(name: str = "tiny", labels: tuple[str, ...] = ("bar", "disc"), task: str = "binary") -> ModelCard:
    return ModelCard(
        name=name, task=task, labels=list(labels), modality="OT", body_part="PHANTOM",
        critical_findings=[labels[-1]], architecture=TINY_ARCH,
        input=InputSpec(size=28, channels=1, mean=[0.3], std=[0.25]),
    )


@pytest.fixture(scope="session")
def tiny_npz(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_npz(tmp_path_factory.mktemp("data") / "shapes.npz")


@pytest.fixture(scope="session")
def tiny_package(tmp_path_factory: pytest.TempPathFactory, tiny_npz: Path) -> Path:
    """A binary model trained for a few epochs on the shapes data (about 5 s on 2 cores)."""
    from medsight.io.datasets import load_npz
    from medsight.train.config import TrainConfig
    from medsight.train.trainer import fit

    out = tmp_path_factory.mktemp("pkg") / "tiny"
    names = ["bar", "disc"]
    cfg = TrainConfig(epochs=8, batch_size=20, lr=5e-3, patience=8, augment=None)
    fit(tiny_card(), load_npz(tiny_npz, "train", names), load_npz(tiny_npz, "val", names), cfg, out)
    return out


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory, tiny_package: Path) -> Path:
    """The shared tiny model, re-carded as 'tiny-xr' reading CR/DX/CT/MR of any body part (the weights are
    untouched): service tests feed it CT slices and header-less PNGs, so its applicability declares only
    the modalities (a zoo card always names body parts; docs/routing.md)."""
    import shutil

    from medsight.models.card import Applicability, NeverGiven
    from medsight.models.package import read_card, write_card

    root = tmp_path_factory.mktemp("models")
    dest = root / "tiny-xr"
    shutil.copytree(tiny_package, dest)
    card = read_card(dest)
    card.name, card.modality = "tiny-xr", "CR/DX/CT/MR (test phantom)"
    card.applicability = Applicability(modalities=["CR", "DX", "CT", "MR"], body_parts=["ANY"],
                                       never=NeverGiven(text="a test phantom: never a patient's study"))
    write_card(card, dest)
    return root
