"""Baseline ``ae``: a plain convolutional autoencoder (DCGAN pyramid), L2 or SSIM loss.

Every table shows it: a complex model that does not beat it is news (MODELS.md, "Baselines").
Encoder: DCGAN pyramid to a 1x1 latent of ``latent`` channels; decoder: its mirror with Tanh.
Loss: ``l2`` = mean squared error, or ``ssim`` = 1 - SSIM (pytorch-msssim, Gaussian window 11,
sigma 1.5, computed on [0, 1] images) for images of at least 11 px.
Score: mean squared pixel error over channels and pixels, whatever the training loss (so scores of
L2- and SSIM-trained models are comparable); map: squared error per pixel, mean over channels.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from pytorch_msssim import ssim

from trainer.models.base import Detector, ModelConfig
from trainer.models.blocks import check_pyramid_size, dcgan_decoder, dcgan_encoder, dcgan_init, to_signed


class AEConfig(ModelConfig):
    latent: int = Field(100, ge=1, description="latent channels (1x1 map)")
    base_channels: int = Field(64, ge=1)
    loss: Literal["l2", "ssim"] = "l2"


class AutoEncoder(Detector):
    """Plain DCGAN-pyramid autoencoder; see the module docstring."""

    name = "ae"
    Config = AEConfig
    config: AEConfig

    def __init__(self, config: AEConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder = dcgan_encoder(c.image_size, c.channels, c.latent, c.base_channels)
        self.decoder = dcgan_decoder(c.image_size, c.channels, c.latent, c.base_channels)
        self.apply(dcgan_init)

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        check_pyramid_size(config.image_size, cls.name)

    def reconstruct(self, x: torch.Tensor) -> torch.Tensor:
        """[0, 1] in -> reconstruction in [0, 1]."""
        return (self.decoder(self.encoder(to_signed(x))) + 1.0) * 0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        err = (x - self.reconstruct(x)).float() ** 2
        amap = err.mean(dim=1, keepdim=True)
        return amap.flatten(1).mean(dim=1), amap

    def _loss(self, x: torch.Tensor, rec: torch.Tensor) -> torch.Tensor:
        """Per-image training loss [B]."""
        if self.config.loss == "ssim":
            return 1.0 - ssim(rec, x, data_range=1.0, size_average=False)
        return ((rec - x) ** 2).flatten(1).mean(dim=1)

    def make_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        return {"ae": torch.optim.Adam(self.parameters(), lr=lr, betas=(0.5, 0.999))}

    def training_step(self, x: torch.Tensor, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        opt = optimizers["ae"]
        opt.zero_grad(set_to_none=True)
        loss = self._loss(x, self.reconstruct(x)).mean()
        loss.backward()
        opt.step()
        return {"loss": float(loss.detach())}

    @torch.no_grad()
    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        return self._loss(x, self.reconstruct(x))


__all__ = ["AEConfig", "AutoEncoder"]
