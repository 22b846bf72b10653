"""Heat maps on the fast path: CAM from the exported feature map equals PyTorch Grad-CAM (MONAI)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import medsight
from medsight.explain.gradcam import gradcam
from medsight.models.package import load_package
from medsight.models.preprocess import batch_to_tensor
from medsight.predict.backends import TorchBackend, make_backend
from medsight.predict.cam import class_activation_maps, resize_map
from medsight.predict.load import load_model
from tests.conftest import make_images


def test_cam_hand_computed():
    """2 channels on a 2x2 grid, output at the grid's own size (no interpolation)."""
    fmap = np.array([[[[1.0, 0.0], [2.0, 0.0]], [[0.0, 3.0], [0.0, 1.0]]]], dtype=np.float32)  # (1, 2, 2, 2)
    w = np.array([[1.0, -1.0], [0.5, 0.5]], dtype=np.float32)
    # class 0: relu([[1, -3], [2, -1]]) = [[1, 0], [2, 0]] -> scaled by its max 2 (min 0)
    np.testing.assert_allclose(class_activation_maps(fmap, w, [0], 2)[0], [[0.5, 0.0], [1.0, 0.0]])
    # class 1: [[0.5, 1.5], [1, 0.5]] -> (v - 0.5) / 1.0
    np.testing.assert_allclose(class_activation_maps(fmap, w, [1], 2)[0], [[0.0, 1.0], [0.5, 0.0]])
    # no positive evidence anywhere: a flat map stays 0 rather than dividing by zero
    assert np.all(class_activation_maps(-fmap, np.abs(w), [0], 2) == 0)


def _disc_batch(pkg):
    imgs, labels = make_images(4, seed=7)
    images = [medsight.MedImage.from_array(im, source=f"shape{i}") for i, im in enumerate(imgs)]
    return batch_to_tensor(images, pkg.card.input), labels[:, 0]


def test_gradcam_highlights_the_strongest_evidence(tiny_package):
    """Grad-CAM's hottest pixel is where ReLU(w_k . A) peaks (MONAI's default normaliser inverts maps)."""
    pkg = load_package(tiny_package)
    x, _ = _disc_batch(pkg)
    k = pkg.card.labels.index("disc")
    maps = gradcam(pkg.network, x, k)
    fmap = TorchBackend(pkg.network).forward(x).feature_maps
    raw = torch.relu(torch.einsum("c,bchw->bhw", torch.as_tensor(pkg.network.class_weights()[k]), torch.as_tensor(fmap)))
    up = torch.nn.functional.interpolate(raw[:, None], size=maps.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    for m, r in zip(maps, up.numpy()):
        if r.max() > r.min():
            assert m.flat[np.argmax(r)] == pytest.approx(1.0) and m.flat[np.argmin(r)] == pytest.approx(0.0)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_cam_matches_pytorch_gradcam(tiny_package, sample_files, runtime_settings, backend):
    pkg = load_package(tiny_package)
    images = [medsight.read_image(f) for f in sample_files]
    x = batch_to_tensor(images, pkg.card.input)
    classes = [i % 2 for i in range(len(images))]
    ref = gradcam(pkg.network, x, classes)
    fmap = make_backend(pkg, backend, runtime_settings).forward(x).feature_maps
    got = class_activation_maps(fmap, pkg.network.class_weights(), classes, pkg.card.input.size)
    assert np.abs(got - ref).max() < 1e-4
    for g, r in zip(got, ref):
        if r.std() > 0:
            assert np.corrcoef(g.ravel(), r.ravel())[0, 1] > 0.99


def test_predictor_heatmaps_agree_across_backends(tiny_package, sample_files, runtime_settings):
    """Predictions at each image's own resolution: ONNX heat maps = PyTorch Grad-CAM heat maps."""
    pkg = load_package(tiny_package)
    torch_p = load_model(pkg, "torch", runtime_settings)
    onnx_p = load_model(pkg, "onnx", runtime_settings)
    a, b = list(torch_p.stream(sample_files)), list(onnx_p.stream(sample_files))
    x = batch_to_tensor([r.image for r in a], pkg.card.input)
    ref = gradcam(pkg.network, x, [pkg.card.labels.index(r.heatmap_label) for r in a])
    for ra, rb, g in zip(a, b, ref):
        expected = resize_map(g, ra.image.height, ra.image.width)
        assert ra.heatmap.shape == rb.heatmap.shape == (ra.image.height, ra.image.width)
        assert np.abs(ra.heatmap - expected).max() < 1e-4
        assert np.abs(rb.heatmap - expected).max() < 1e-4
        assert ra.heatmap_label == rb.heatmap_label
