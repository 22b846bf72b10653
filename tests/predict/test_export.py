"""ONNX export: the network's one contract (forward_intermediates) on every backend, any batch size, cached by the weights' hash."""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import medsight
from medsight.errors import BackendError
from medsight.models.networks import FEATURE_LAYER, STAGES, STAT_LAYERS
from medsight.models.package import load_package
from medsight.models.preprocess import batch_to_tensor
from medsight.models.registry import list_cards, load, resolve
from medsight.predict.backends import OnnxBackend, TorchBackend, make_backend
from medsight.predict.cache import WEIGHTS_KEY, onnx_model_path
from medsight.predict.export import OUTPUTS, IntermediatesTuple
from medsight.predict.ood import LAYERS, layer_statistics
from medsight.predict.settings import RuntimeSettings


def _batch(pkg, files):
    return batch_to_tensor([medsight.read_image(f) for f in files], pkg.card.input)


def test_export_wrapper_is_the_classifier(tiny_package, sample_files):
    """The exported module must compute exactly what Classifier.forward/features compute."""
    pkg = load_package(tiny_package)
    x = _batch(pkg, sample_files)
    with torch.no_grad():
        logits, fmap, *_ = IntermediatesTuple(pkg.network)(x)
        assert torch.equal(logits, pkg.network(x))
        assert torch.allclose(fmap.mean(dim=(2, 3)), pkg.network.features(x), atol=1e-6)
    assert fmap.shape[:2] == (len(sample_files), pkg.network.class_weights().shape[1])


def test_onnx_matches_torch_on_real_images(tiny_package, sample_files, runtime_settings):
    pkg = load_package(tiny_package)
    x = _batch(pkg, sample_files)
    ref = TorchBackend(pkg.network).forward(x)
    got = make_backend(pkg, "onnx", runtime_settings).forward(x)
    assert np.abs(got.logits - ref.logits).max() <= 1e-4
    assert np.abs(got.feature_maps - ref.feature_maps).max() <= 1e-4
    for k in ref.statistics:
        np.testing.assert_allclose(got.statistics[k], ref.statistics[k], rtol=1e-4, atol=1e-5)


def test_every_backend_and_the_ood_statistics_are_forward_intermediates(tiny_package, sample_files, runtime_settings):
    """One contract: the torch and ONNX backends and the OOD detector's layer_statistics all return what
    Classifier.forward_intermediates returns (torch exactly, ONNX to float precision)."""
    pkg = load_package(tiny_package)
    x = _batch(pkg, sample_files)
    with torch.no_grad():
        ref = pkg.network.forward_intermediates(x)
        assert torch.equal(ref.logits, pkg.network(x))
    assert tuple(ref.statistics) == STAT_LAYERS
    assert {k: v.shape[1] for k, v in ref.statistics.items()} == pkg.network.statistic_widths()
    eager = TorchBackend(pkg.network).forward(x)
    np.testing.assert_array_equal(eager.logits, ref.logits.numpy())
    np.testing.assert_array_equal(eager.feature_maps, ref.feature_map.numpy())
    ood = layer_statistics(pkg.network, x, batch_size=3)  # batched: rows must not depend on the batch
    fast = make_backend(pkg, "onnx", runtime_settings).forward(x)
    assert np.abs(fast.logits - eager.logits).max() <= 1e-4 and np.abs(fast.feature_maps - eager.feature_maps).max() <= 1e-4
    for k in STAT_LAYERS:
        want = ref.statistics[k].numpy().astype(np.float64)
        np.testing.assert_array_equal(eager.statistics[k], want)
        np.testing.assert_allclose(ood[k], want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(fast.statistics[k], want, rtol=1e-4, atol=1e-5)


def test_layer_names_are_written_once():
    """The stage names live in medsight/models/networks.py: the export's outputs (which the ONNX backend reads
    by name) and the OOD blocks derive from them; no other module spells a stage name or reaches into ``net``."""
    assert LAYERS == STAT_LAYERS and set(STAT_LAYERS) | {FEATURE_LAYER} <= set(STAGES)
    assert OUTPUTS == ("logits", "feature_map", *(f"stats_{k}" for k in STAT_LAYERS))
    root = Path(medsight.__file__).parent
    found = []
    for path in sorted(root.rglob("*.py")):
        if path == root / "models" / "networks.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and node.value in STAGES:
                found.append(f"{path.relative_to(root)}:{node.lineno} {node.value!r}")
            elif isinstance(node, ast.Attribute) and node.attr == "net":
                found.append(f"{path.relative_to(root)}:{node.lineno} .net")
    assert not found, found


def test_dynamic_batch_axis(tiny_package, sample_files, runtime_settings):
    """One exported file serves every batch size, with per-image results independent of the batch."""
    pkg = load_package(tiny_package)
    x = _batch(pkg, sample_files)
    b = make_backend(pkg, "onnx", runtime_settings)
    whole = b.forward(x).logits
    singles = np.concatenate([b.forward(x[i : i + 1]).logits for i in range(len(x))])
    assert whole.shape == (len(x), 2)
    np.testing.assert_allclose(singles, whole, atol=1e-5)


def test_cache_is_keyed_by_weights_and_reused(tiny_package, runtime_settings):
    pkg = load_package(tiny_package)
    path = onnx_model_path(pkg, runtime_settings)
    assert path.parent == runtime_settings.onnx_cache and path.name.startswith(pkg.card.weights_sha256)
    mtime = path.stat().st_mtime_ns
    assert onnx_model_path(pkg, runtime_settings) == path and path.stat().st_mtime_ns == mtime  # not re-exported
    assert OnnxBackend(path, runtime_settings).metadata[WEIGHTS_KEY] == pkg.card.weights_sha256
    pkg.card.weights_sha256 = "0" * 64  # other weights -> another file
    assert onnx_model_path(pkg, runtime_settings) != path


def test_unwritable_cache_is_a_clear_error(tiny_package, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("x")
    with pytest.raises(BackendError, match="MEDSIGHT_CACHE_DIR"):
        make_backend(load_package(tiny_package), "onnx", RuntimeSettings(cache_dir=blocker, intra_op_threads=1, decode_workers=0))


def test_corrupt_or_foreign_cached_file_is_rebuilt(tiny_package, sample_files, tmp_path):
    """A damaged cache entry, or one made from other weights, must never be used."""
    settings = RuntimeSettings(cache_dir=tmp_path, intra_op_threads=1, decode_workers=0)
    pkg = load_package(tiny_package)
    x = _batch(pkg, sample_files)
    ref = TorchBackend(pkg.network).forward(x).logits
    path = onnx_model_path(pkg, settings)
    path.write_bytes(b"not onnx")
    assert np.abs(make_backend(pkg, "onnx", settings).forward(x).logits - ref).max() <= 1e-4
    other = load_package(tiny_package)
    with torch.no_grad():
        other.network.net.fc.bias.add_(1.0)  # same card (same cache key), different weights
    path.unlink()
    onnx_model_path(other, settings)  # the file now holds other weights' graph but this sha's name
    import onnx

    m = onnx.load(path)
    for p in m.metadata_props:
        if p.key == WEIGHTS_KEY:
            p.value = "f" * 64
    onnx.save(m, path)
    assert np.abs(make_backend(pkg, "onnx", settings).forward(x).logits - ref).max() <= 1e-4


def test_every_shipped_model_exports_within_1e4(sample_files, runtime_settings):
    """Each zoo model present: ONNX logits within 1e-4 of PyTorch on the bundled real images."""
    cards = list_cards()
    if not cards:
        pytest.skip("no shipped models in medsight/zoo yet")
    for card in cards:
        pkg = load(resolve(card.name))
        x = _batch(pkg, sample_files)
        ref = TorchBackend(pkg.network).forward(x).logits
        got = make_backend(pkg, "onnx", runtime_settings).forward(x).logits
        assert np.abs(got - ref).max() <= 1e-4, card.name
