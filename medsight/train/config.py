"""Typed training settings (a recipe's ``train`` section maps onto these)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class AugmentConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    flip: bool = True
    rotate_deg: float = 10.0
    scale: float = 0.10
    translate: float = 0.05
    contrast: float = 0.0
    noise_std: float = 0.0
    prob: float = 0.8


class TrainConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    epochs: int = Field(default=30, ge=1)
    batch_size: int = Field(default=64, ge=1)
    lr: float = Field(default=2e-3, gt=0)
    weight_decay: float = Field(default=1e-4, ge=0)
    patience: int = Field(default=8, ge=1, description="early stopping: epochs without a better val score")
    seed: int = 0
    class_weighting: bool = True
    label_smoothing: float = Field(default=0.0, ge=0, lt=1)
    augment: AugmentConfig | None = AugmentConfig()
    freeze_backbone_epochs: int = Field(default=0, ge=0, description="fine-tuning: train only the head first")
    threads: int | None = None
