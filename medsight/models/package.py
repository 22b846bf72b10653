"""Model packages on disk: ``card.json`` + ``weights.safetensors`` in one directory.

safetensors is used because loading it cannot execute code (unlike pickle), and the
card pins the weights' sha256 so a swapped or corrupted file is refused before use.

torch, MONAI and safetensors are imported by the functions that touch weights, so reading
a card (``medsight models``, the registry) stays a JSON + pydantic job.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from medsight._version import __version__
from medsight.errors import ModelCardError, ModelIntegrityError
from medsight.models.card import ModelCard

if TYPE_CHECKING:
    from medsight.models.networks import Classifier

CARD_FILE = "card.json"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass
class ModelPackage:
    """A card and the network it describes, with weights loaded."""

    card: ModelCard
    network: Classifier
    path: Path | None = None

    @classmethod
    def new(cls, card: ModelCard) -> "ModelPackage":
        """Untrained network for a card (weights random; used by training)."""
        from medsight.models.networks import build_network

        return cls(card, build_network(card.architecture, card.input.channels, card.num_outputs))

    def save(self, directory: str | Path) -> Path:
        """Write weights then card; the card is written last and atomically, so a
        directory with a card always has the matching weights."""
        from safetensors.torch import save_file

        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        weights = d / self.card.weights_file
        state = {k: v.detach().contiguous().cpu() for k, v in self.network.state_dict().items()}
        save_file(state, str(weights), metadata={"medsight_card_name": self.card.name})
        self.card.weights_sha256 = sha256_of(weights)
        self.card.medsight_version = __version__
        write_card(self.card, d)
        self.path = d
        return d


def write_card(card: ModelCard, directory: Path) -> None:
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".card-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(card.model_dump(mode="json"), f, indent=2)
        f.write("\n")
    os.chmod(tmp, 0o644)  # mkstemp creates 0600; a card is meant to be read by everyone
    os.replace(tmp, directory / CARD_FILE)


def read_card(directory: str | Path) -> ModelCard:
    path = Path(directory) / CARD_FILE
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ModelCardError(f"{directory}: no {CARD_FILE}; not a model package") from None
    except json.JSONDecodeError as e:
        raise ModelCardError(f"{path}: card is not valid JSON ({e})") from None
    try:
        return ModelCard.model_validate(data)
    except ValidationError as e:
        raise ModelCardError(f"{path}: invalid model card:\n{e}") from None


def load_package(directory: str | Path) -> ModelPackage:
    """Load and verify a package directory; refuses weights whose hash differs from the card."""
    from safetensors.torch import load_file

    from medsight.models.networks import build_network

    d = Path(directory)
    card = read_card(d)
    weights = d / card.weights_file
    if not weights.is_file():
        raise ModelIntegrityError(f"{d}: weights file {card.weights_file} is missing")
    digest = sha256_of(weights)
    if not card.weights_sha256:
        raise ModelIntegrityError(f"{d}: card has no weights_sha256; refusing unverifiable weights")
    if digest != card.weights_sha256:
        raise ModelIntegrityError(
            f"{weights}: sha256 {digest} does not match the card ({card.weights_sha256}); refusing to load"
        )
    network = build_network(card.architecture, card.input.channels, card.num_outputs)
    try:
        network.load_state_dict(load_file(str(weights)), strict=True)
    except RuntimeError as e:
        raise ModelIntegrityError(f"{weights}: weights do not fit the card's architecture ({e})") from None
    network.eval()
    return ModelPackage(card, network, d)


def clone_network(pkg: ModelPackage) -> Classifier:
    """Independent copy of a package's network (fine-tuning must not touch the loaded zoo model)."""
    from medsight.models.networks import build_network

    net = build_network(pkg.card.architecture, pkg.card.input.channels, pkg.card.num_outputs)
    net.load_state_dict({k: v.clone() for k, v in pkg.network.state_dict().items()})
    return net


