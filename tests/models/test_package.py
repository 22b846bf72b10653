import json

import pytest
import torch

from medsight.errors import ModelCardError, ModelIntegrityError, UnknownModelError
from medsight.models.card import ModelCard
from medsight.models.package import ModelPackage, load_package
from medsight.models.registry import list_cards, resolve
from tests.conftest import tiny_card


def test_save_load_roundtrip_preserves_weights(tmp_path):
    pkg = ModelPackage.new(tiny_card())
    pkg.save(tmp_path / "m")
    loaded = load_package(tmp_path / "m")
    for (k, a), (_, b) in zip(pkg.network.state_dict().items(), loaded.network.state_dict().items()):
        assert torch.equal(a, b), k
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    assert len(card["weights_sha256"]) == 64 and card["labels"] == ["bar", "disc"]


def test_tampered_weights_are_refused(tmp_path):
    ModelPackage.new(tiny_card()).save(tmp_path / "m")
    w = tmp_path / "m" / "weights.safetensors"
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF
    w.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match="does not match the card"):
        load_package(tmp_path / "m")


def test_missing_weights_and_card(tmp_path):
    ModelPackage.new(tiny_card()).save(tmp_path / "m")
    (tmp_path / "m" / "weights.safetensors").unlink()
    with pytest.raises(ModelIntegrityError, match="missing"):
        load_package(tmp_path / "m")
    with pytest.raises(ModelCardError, match="not a model package"):
        load_package(tmp_path / "nothing")


def test_invalid_card_is_specific(tmp_path):
    ModelPackage.new(tiny_card()).save(tmp_path / "m")
    card = json.loads((tmp_path / "m" / "card.json").read_text())
    card["task"] = "regression"
    (tmp_path / "m" / "card.json").write_text(json.dumps(card))
    with pytest.raises(ModelCardError, match="task"):
        load_package(tmp_path / "m")


def test_card_rules():
    base = tiny_card().model_dump()
    with pytest.raises(ValueError, match="exactly two labels"):
        ModelCard.model_validate({**base, "labels": ["a", "b", "c"], "critical_findings": []})
    with pytest.raises(ValueError, match="not model labels"):
        ModelCard.model_validate({**base, "critical_findings": ["tumour"]})
    with pytest.raises(ValueError, match="one value per input channel"):
        ModelCard.model_validate({**base, "input": {"size": 28, "channels": 3, "mean": [0.5], "std": [0.2]}})
    assert tiny_card().positive_index == 1


def test_registry_resolves_names_and_paths(tmp_path):
    ModelPackage.new(tiny_card("alpha")).save(tmp_path / "zoo" / "alpha")
    assert resolve("alpha", [tmp_path / "zoo"]) == tmp_path / "zoo" / "alpha"
    assert resolve(tmp_path / "zoo" / "alpha", [tmp_path / "zoo"]) == tmp_path / "zoo" / "alpha"
    assert [c.name for c in list_cards([tmp_path / "zoo"])] == ["alpha"]
    with pytest.raises(UnknownModelError, match="available: alpha"):
        resolve("beta", [tmp_path / "zoo"])
