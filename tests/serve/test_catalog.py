"""The service's model catalog runs each model on its recorded fast backend, with the reference's results."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from medsight.models.package import read_card, write_card
from medsight.models.registry import list_cards
from medsight.predict.backends import TorchBackend, recorded_choice
from medsight.predict.settings import RuntimeSettings
from medsight.serve.catalog import ModelCatalog

SAMPLES = Path(__file__).resolve().parents[2] / "medsight" / "samples"


@pytest.fixture
def settings(tmp_path: Path) -> RuntimeSettings:
    return RuntimeSettings(cache_dir=tmp_path / "cache", intra_op_threads=1, decode_workers=0)


@pytest.fixture
def onnx_recorded(tiny_package: Path, tmp_path: Path) -> Path:
    """A copy of the tiny model whose card records onnx as its auto backend (as `medsight runtime tune` would)."""
    root = tmp_path / "models"
    d = Path(shutil.copytree(tiny_package, root / "tiny"))
    card = read_card(d)
    card.runtime = {"backend": "onnx", "weights_sha256": card.weights_sha256, "reason": "measured"}
    write_card(card, d)
    return root


def _samples() -> list[Path]:
    return sorted(p for p in SAMPLES.iterdir() if p.suffix.lower() in (".png", ".jpg"))


def _assert_same_results(fast, ref) -> None:
    """Within the runtime tests' fp32 tolerance: probabilities 1e-5, heat maps 1e-4, same decisions."""
    for a, b in zip(fast, ref):
        assert (a.label, a.refer, a.statement, a.heatmap_label) == (b.label, b.refer, b.statement, b.heatmap_label)
        assert a.probabilities == pytest.approx(b.probabilities, abs=1e-5)
        assert a.heatmap.shape == b.heatmap.shape == (b.image.height, b.image.width)
        assert np.abs(a.heatmap - b.heatmap).max() < 1e-4


def test_catalog_defaults_to_the_recorded_backend_with_torch_results(onnx_recorded, settings):
    fast = ModelCatalog([onnx_recorded], use_zoo=False, runtime=settings).predictor("tiny")
    ref = ModelCatalog([onnx_recorded], use_zoo=False, backend="torch", runtime=settings).predictor("tiny")
    assert fast.backend.name == "onnx" and isinstance(ref.backend, TorchBackend)
    assert list(settings.onnx_cache.glob("*.onnx"))  # built on first use, in the catalog's cache
    _assert_same_results(list(fast.stream(_samples())), list(ref.stream(_samples())))


def test_catalog_without_a_record_runs_torch(tiny_package, settings):
    pred = ModelCatalog([tiny_package.parent], use_zoo=False, runtime=settings).predictor(read_card(tiny_package).name)
    assert isinstance(pred.backend, TorchBackend)


def test_catalog_rejects_an_unknown_backend():
    with pytest.raises(ValueError, match="unknown inference backend 'tensorrt'"):
        ModelCatalog(use_zoo=False, backend="tensorrt")


def test_zoo_models_run_their_recorded_backend(settings):
    """Every shipped model through the service's catalog runs what `medsight runtime tune` recorded;
    the fp32 ones give PyTorch's results on the bundled real images."""
    cards = list_cards()
    if not cards:
        pytest.skip("no shipped models in medsight/zoo")
    fast, ref = ModelCatalog(runtime=settings), ModelCatalog(backend="torch", runtime=settings)
    for card in cards:
        pred = fast.predictor(card.name)
        assert pred.backend.name == recorded_choice(card)[0], card.name
        if pred.backend.name == "onnx":
            _assert_same_results(list(pred.stream(_samples())), list(ref.predictor(card.name).stream(_samples())))


def test_service_settings_choose_the_backend_and_threads(onnx_recorded, tmp_path, monkeypatch):
    """`inference_backend` / MEDSIGHT_BACKEND reach the catalog; a typo fails when settings load."""
    from pydantic import ValidationError

    from medsight.serve.config import ServiceSettings
    from medsight.serve.context import ServiceContext

    monkeypatch.setenv("MEDSIGHT_BACKEND", "torch")
    settings = ServiceSettings.from_env(data_dir=tmp_path / "svc", model_paths=[onnx_recorded], use_zoo=False,
                                        inference_threads=1)
    ctx = ServiceContext.build(settings)
    try:
        assert ctx.catalog.backend == "torch" and ctx.catalog.runtime.intra_op_threads == 1
        assert isinstance(ctx.catalog.predictor("tiny").backend, TorchBackend)
    finally:
        ctx.close()
    monkeypatch.delenv("MEDSIGHT_BACKEND")
    assert ServiceSettings(data_dir=tmp_path).inference_backend == "auto"
    with pytest.raises(ValidationError, match="inference_backend"):
        ServiceSettings(data_dir=tmp_path, inference_backend="onnx-fp16")
