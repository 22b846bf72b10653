"""Train or fine-tune a classifier and return a finished model package.

The loop is deliberately plain PyTorch: AdamW, one-cycle learning rate, early
stopping on the validation AUC, a checkpoint every epoch (resumable), then
temperature scaling and an operating threshold fitted on the validation split.
The test split is never seen here; :mod:`medsight.train.recipe` measures it once.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from medsight.errors import DataSetError
from medsight.evaluate.calibration import fit_temperature, probabilities
from medsight.evaluate.metrics import Scorer, bootstrap_metrics
from medsight.evaluate.thresholds import youden_threshold
from medsight.io.datasets import LabeledDataset, ReadFailure
from medsight.models.card import Calibration, MetricValue, ModelCard
from medsight.models.networks import Classifier, build_network
from medsight.models.package import ModelPackage, clone_network
from medsight.models.preprocess import batch_to_tensor
from medsight.train.augment import BatchAugmenter
from medsight.train.config import TrainConfig

log = logging.getLogger(__name__)
CHECKPOINT = "checkpoint.pt"


@dataclass
class EpochReport:
    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    val_score: float
    best: bool
    seconds: float


def tensorize(ds: LabeledDataset, card: ModelCard) -> tuple[torch.Tensor, np.ndarray, list[str]]:
    """Preprocess every image once: the tensors, their rows (``ds.y[rows]``) and why unreadable ones were skipped."""
    failures: list[ReadFailure] = []
    parts = [(b.index, batch_to_tensor(b.images, card.input)) for b in ds.batches(256, failures)]
    return torch.cat([x for _, x in parts]), np.concatenate([i for i, _ in parts]), [f.error for f in failures]


def _loss(logits: torch.Tensor, y: torch.Tensor, card: ModelCard, weights: torch.Tensor | None, smoothing: float) -> torch.Tensor:
    if card.task == "multilabel":
        return F.binary_cross_entropy_with_logits(logits, y.float(), pos_weight=weights)
    return F.cross_entropy(logits, y.long(), weight=weights, label_smoothing=smoothing)


def _class_weights(y: np.ndarray, card: ModelCard) -> torch.Tensor:
    if card.task == "multilabel":
        pos = y.sum(axis=0).clip(1)
        return torch.tensor((len(y) - pos) / pos, dtype=torch.float32).clamp(max=20)
    counts = np.bincount(y, minlength=card.num_outputs).astype(np.float64).clip(1)
    w = counts.sum() / (len(counts) * counts)
    return torch.tensor(w / w.mean(), dtype=torch.float32)


@torch.no_grad()
def predict_logits(net: Classifier, x: torch.Tensor, batch_size: int = 256) -> np.ndarray:
    net.eval()
    return torch.cat([net(x[i : i + batch_size]) for i in range(0, len(x), batch_size)]).numpy()


def _score(card: ModelCard, y: np.ndarray, logits: np.ndarray) -> float:
    """Model-selection score: macro AUC on val (accuracy if AUC is undefined)."""
    m = Scorer.for_card(card, threshold=0.5)(y, probabilities(logits, 1.0, card.task == "multilabel"))
    return float(m["auc"] if m["auc"] is not None else m["accuracy"])


def initial_network(card: ModelCard, base: ModelPackage | None) -> Classifier:
    if base is None:
        return build_network(card.architecture, card.input.channels, card.num_outputs)
    net = clone_network(base)
    if base.card.labels != card.labels:
        net.replace_head(card.num_outputs)
    return net


def fit(
    card: ModelCard,
    train: LabeledDataset,
    val: LabeledDataset,
    cfg: TrainConfig,
    out_dir: str | Path,
    base: ModelPackage | None = None,
    resume: bool = False,
    on_epoch: Callable[[EpochReport], None] | None = None,
) -> ModelPackage:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)

    xtr, ktr, err_tr = tensorize(train, card)
    xva, kva, err_va = tensorize(val, card)
    ytr, yva = train.y[ktr], val.y[kva]
    for e in err_tr + err_va:
        log.warning("skipped unreadable image: %s", e)
    if card.task != "multilabel" and len(np.unique(ytr)) < 2:
        raise DataSetError("the training split needs at least two classes")

    net = initial_network(card, base)
    weights = _class_weights(ytr, card) if cfg.class_weighting else None
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = max(1, int(np.ceil(len(xtr) / cfg.batch_size)))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch, pct_start=0.15)
    augment = BatchAugmenter(cfg.augment, card.input.size, cfg.seed) if cfg.augment else None
    gen = torch.Generator().manual_seed(cfg.seed)
    state = {"epoch": 0, "best_score": -np.inf, "best_state": None, "stale": 0, "history": []}

    ckpt = out / CHECKPOINT
    if resume and ckpt.is_file():
        saved = torch.load(ckpt, weights_only=False)
        net.load_state_dict(saved["model"])
        opt.load_state_dict(saved["optimizer"])
        sched.load_state_dict(saved["scheduler"])
        gen.set_state(saved["generator"])
        state = saved["state"]
        log.info("resumed from %s at epoch %d", ckpt, state["epoch"])

    ytr_t = torch.as_tensor(ytr)
    while state["epoch"] < cfg.epochs and state["stale"] < cfg.patience:
        epoch = state["epoch"]
        t0 = time.perf_counter()
        net.train()
        freeze = epoch < cfg.freeze_backbone_epochs
        for name, p in net.named_parameters():
            p.requires_grad_(not freeze or "fc" in name)
        perm = torch.randperm(len(xtr), generator=gen)
        total, seen = 0.0, 0
        for i in range(0, len(perm), cfg.batch_size):
            idx = perm[i : i + cfg.batch_size]
            if len(idx) < 2:  # batch norm needs two samples
                continue
            xb = xtr[idx]
            if augment is not None:
                xb = augment(xb)
            loss = _loss(net(xb), ytr_t[idx], card, weights, cfg.label_smoothing)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        val_logits = predict_logits(net, xva)
        val_loss = float(_loss(torch.as_tensor(val_logits), torch.as_tensor(yva), card, None, 0.0))
        score = _score(card, yva, val_logits)
        better = score > state["best_score"] + 1e-6
        if better:
            state.update(best_score=score, best_state=copy.deepcopy(net.state_dict()), stale=0, best_epoch=epoch + 1)
        else:
            state["stale"] += 1
        state["epoch"] = epoch + 1
        report = EpochReport(epoch + 1, cfg.epochs, total / max(seen, 1), val_loss, score, better, time.perf_counter() - t0)
        state["history"].append(report.__dict__)
        torch.save(
            {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "generator": gen.get_state(), "state": state},
            ckpt,
        )
        if on_epoch:
            on_epoch(report)

    net.load_state_dict(state["best_state"])
    net.eval()
    val_logits = predict_logits(net, xva)
    multilabel = card.task == "multilabel"
    temp, nll_before, nll_after = fit_temperature(val_logits, yva, multilabel)
    card.calibration = Calibration(method="temperature", temperature=temp, fitted_on=val.name, nll_before=nll_before, nll_after=nll_after)
    probs = probabilities(val_logits, temp, multilabel)
    if card.task == "binary":
        card.thresholds = {card.positive_label: youden_threshold((yva == card.positive_index).astype(int), probs[:, card.positive_index])}
    card.validation_metrics = {k: MetricValue(**v) for k, v in bootstrap_metrics(Scorer.for_card(card), yva, probs, n_boot=200).items()}
    card.training.update(
        n_train=int(len(ytr)), n_val=int(len(yva)), skipped_unreadable=len(err_tr) + len(err_va),
        epochs_run=state["epoch"], best_epoch=state.get("best_epoch"), config=cfg.model_dump(),
        base_model=(f"{base.card.name}@{base.card.version}" if base else None), history=state["history"],
    )
    pkg = ModelPackage(card, net)
    pkg.save(out)
    ckpt.unlink(missing_ok=True)
    return pkg
