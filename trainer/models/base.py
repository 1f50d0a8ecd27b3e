"""The one detector interface every model implements (MODELS.md, "The contract every model keeps").

A detector is an ``nn.Module`` whose ``forward`` is the whole scoring path, exportable as one graph:

    forward(x) -> (score[B], anomaly_map[B, 1, H, W])

``x`` is float32 NCHW in [0, 1] straight from ``deploy.preprocess``; any model-specific
normalisation happens inside ``forward``. Higher scores mean more anomalous; reductions are float32.

Training is the model's own business (it owns its losses and its optimisers); the trainer owns
devices, epochs, batching, checkpoints and logging and calls, per batch:

    losses = model.training_step(x, optimizers)      # x on the model's device, float32 [0, 1]

with ``optimizers = model.make_optimizers(lr)`` created once (their states are checkpointed),
``before_training`` once at the start of a new run and ``on_epoch_start`` before every epoch.
Randomness inside a model (noise, crops, priors) must come from torch's default generators
(torch.rand/randn/randint/randperm on the model's device), whose states the trainer checkpoints:
that is what makes a resumed run bit-identical to an uninterrupted one on CPU.
``validation_loss(x)`` is a loss on held-out NORMAL images that the trainer uses to keep the
best checkpoint (never test anomalies).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from typing import ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn


class ModelConfig(BaseModel):
    """Settings every model has; subclasses add their own with the paper's defaults.

    ``lr``, ``batch_size`` and ``epochs`` are the defaults the trainer uses when the command line
    does not override them.
    """

    model_config = ConfigDict(extra="forbid")

    image_size: int = Field(32, description="input height = width, pixels")
    channels: Literal[1, 3] = Field(1, description="1 grey, 3 colour (RGB)")
    lr: float = Field(2e-4, gt=0)
    batch_size: int = Field(64, ge=1)
    epochs: int = Field(15, ge=1)


class Detector(nn.Module, ABC):
    """Base class of every registered model; see the module docstring for the contract."""

    name: ClassVar[str]
    Config: ClassVar[type[ModelConfig]] = ModelConfig
    #: Bumped when a change alters what training or scoring computes (a fix, not a refactor), so
    #: that benchmark results of the older code are kept apart instead of being taken as current.
    revision: ClassVar[int] = 1

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        """Raise ``trainer.errors.UserError`` if the model cannot be built with ``config`` (e.g. image size)."""

    @abstractmethod
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Score a batch: x float32 [B, C, H, W] in [0, 1] -> (score float32 [B], map float32 [B, 1, H, W])."""

    @abstractmethod
    def make_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        """The model's optimisers by name, each over its own parameter group; ``lr`` is the base rate."""

    @abstractmethod
    def training_step(self, x: torch.Tensor, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        """One step on a batch of normal images (train mode); returns the losses as plain floats."""

    @abstractmethod
    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Per-image loss on held-out normal images, float32 [B], in eval mode without gradients."""

    def before_training(self, batches: Callable[[], Iterator[torch.Tensor]]) -> None:
        """Called once when a NEW run starts (not on resume), before the first step.

        ``batches()`` yields the training images (never the held-out ones) as float32 [B, C, H, W]
        batches in [0, 1] on the model's device, in a fixed order. A model that needs statistics of
        the training set before training (OCLR's fixed centre) computes them here and keeps them in
        buffers, so that they are checkpointed with the weights.
        """

    def on_epoch_start(self, epoch: int) -> None:
        """Called before each epoch, ``epoch`` counted from 1 (EDE weights its losses by it)."""

    def extra_state(self) -> dict[str, object]:
        """State beyond parameters, buffers and optimisers that an exact resume needs."""
        return {}

    def load_extra_state(self, state: dict[str, object]) -> None:
        """Restore what ``extra_state`` returned."""
