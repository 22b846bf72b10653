"""The shipped zoo: every recipe has a verified package within the size budget, and each model runs."""

import json
from pathlib import Path

import pytest

import medsight
from medsight.io.samples import SAMPLES_DIR, sample_path
from medsight.models.registry import ZOO_DIR, list_cards

RECIPES = sorted(p.stem for p in (Path(__file__).resolve().parents[2] / "recipes").glob("*.json"))


def test_every_recipe_has_a_shipped_package():
    assert sorted(c.name for c in list_cards([ZOO_DIR])) == RECIPES


def test_zoo_size_budget():
    sizes = {p.parent.name: p.stat().st_size for p in ZOO_DIR.glob("*/*.safetensors")}
    assert all(s <= 20 * 2**20 for s in sizes.values()), sizes
    assert sum(sizes.values()) <= 150 * 2**20


@pytest.mark.parametrize("name", RECIPES)
def test_shipped_model_card_is_complete_and_weights_verify(name):
    m = medsight.load_model(name)  # sha256 is checked on load
    c = m.card
    assert c.test_metrics["auc"].value is not None and c.test_metrics["auc"].ci is not None
    assert c.calibration.temperature > 0 and c.intended_use and c.limitations
    assert c.training["n_train"] > 0 and c.training["n_test"] > 0
    assert c.critical_findings


def test_list_models_reports_performance():
    rows = {r["name"]: r for r in medsight.list_models()}
    for name in RECIPES:
        assert rows[name]["test_auc"] is not None and rows[name]["labels"]


@pytest.mark.parametrize("entry", json.loads((SAMPLES_DIR / "samples.json").read_text()), ids=lambda e: e.get("file") or e["pydicom_data"])
def test_each_bundled_sample_is_classified(entry):
    r = medsight.load_model(entry["model"]).predict(sample_path(entry))
    assert abs(sum(r.probabilities.values()) - 1) < 1e-5 or r.probabilities
    assert r.heatmap is not None and r.heatmap.shape == (r.image.height, r.image.width)
