"""Baseline ``ganomaly``: Akcay, Atapour-Abarghouei, Breckon, "GANomaly: Semi-Supervised Anomaly
Detection via Adversarial Training", ACCV 2018 (reference code: samet-akcay/ganomaly).

- NetG = encoder E1 -> decoder -> encoder E2. Encoders: DCGAN pyramid, LeakyReLU(0.2), linear
  latent of ``latent`` (nz) channels. Decoder: DCGAN, ReLU, Tanh output. All convolutions
  bias-free; init N(0, 0.02), BatchNorm weights N(1, 0.02).
- NetD = DCGAN encoder with one output and a sigmoid; f_D = NetD without its last conv.
- L_G = w_adv * MSE(f_D(x), f_D(G(x))) + w_con * |x - G(x)|_1 + w_enc * MSE(z, z_hat), weights 1/50/1.
  L_D = 0.5 (BCE(D(x), 1) + BCE(D(G(x)), 0)); NetD re-initialised when L_D < 1e-5.
  Adam 2e-4, betas (0.5, 0.999), batch 64, isize 32, nz 100, 64 channels, 15 epochs.
- Score: mean over latent dims of (z - z_hat)^2. No min-max over the test set (the reference
  scales scores by the test set's min/max, which leaks test statistics; calibration lives in the
  bundle instead).

Choices the paper and reference leave open ("paper: ...; ours: ..."):
- paper: sigmoid output + BCE; ours: the sigmoid folded into BCEWithLogits (numerically the same
  loss, stable). NetD is not part of the scoring graph, so nothing changes at export.
- paper: no pixel map (latent score); ours: the map is the reconstruction error |x - G(x)| per
  pixel, mean over channels, used for crops and pixel AUROC. It is NOT what the score measures.
- reference: f_D(x) carries gradients into NetD during the G step (then cleared by D's
  zero_grad); ours: f_D(x) is detached in the G step, which gives G identical gradients.
- paper: model selection by test AUC; ours: best checkpoint by ``validation_loss`` on held-out
  normal images = w_con * |x - G(x)|_1 + w_enc * MSE(z, z_hat) (the non-adversarial part of L_G,
  which is stationary as training goes on).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from trainer.models.base import Detector, ModelConfig
from trainer.models.blocks import check_pyramid_size, dcgan_decoder, dcgan_encoder, dcgan_init, to_signed


class GANomalyConfig(ModelConfig):
    latent: int = Field(100, ge=1, description="nz: latent channels")
    base_channels: int = Field(64, ge=1, description="ngf = ndf")
    w_adv: float = Field(1.0, ge=0)
    w_con: float = Field(50.0, ge=0)
    w_enc: float = Field(1.0, ge=0)
    d_reinit_below: float = Field(1e-5, ge=0, description="re-initialise NetD when its loss falls below this")


class _Discriminator(nn.Module):
    def __init__(self, c: GANomalyConfig) -> None:
        super().__init__()
        self.features = dcgan_encoder(c.image_size, c.channels, 1, c.base_channels, head=False)
        self.classifier = dcgan_encoder(c.image_size, c.channels, 1, c.base_channels)[-1:]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [-1, 1] -> (logit [B], f_D features [B, C, 4, 4])."""
        f = self.features(x)
        return self.classifier(f).flatten(), f


class GANomaly(Detector):
    """GANomaly; see the module docstring."""

    name = "ganomaly"
    Config = GANomalyConfig
    config: GANomalyConfig

    def __init__(self, config: GANomalyConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder1 = dcgan_encoder(c.image_size, c.channels, c.latent, c.base_channels)
        self.decoder = dcgan_decoder(c.image_size, c.channels, c.latent, c.base_channels)
        self.encoder2 = dcgan_encoder(c.image_size, c.channels, c.latent, c.base_channels)
        self.discriminator = _Discriminator(c)
        self.apply(dcgan_init)

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        check_pyramid_size(config.image_size, cls.name)

    def generator_params(self) -> list[nn.Parameter]:
        return [*self.encoder1.parameters(), *self.decoder.parameters(), *self.encoder2.parameters()]

    def generate(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """xs in [-1, 1] -> (z [B, nz], G(x) in [-1, 1], z_hat [B, nz])."""
        z = self.encoder1(xs)
        fake = self.decoder(z)
        zh = self.encoder2(fake)
        return z.flatten(1), fake, zh.flatten(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs = to_signed(x)
        z, fake, zh = self.generate(xs)
        score = ((z.float() - zh.float()) ** 2).mean(dim=1)
        amap = (xs - fake).abs().float().mean(dim=1, keepdim=True) * 0.5  # in [0, 1] units
        return score, amap

    def make_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        return {
            "g": torch.optim.Adam(self.generator_params(), lr=lr, betas=(0.5, 0.999)),
            "d": torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=(0.5, 0.999)),
        }

    def training_step(self, x: torch.Tensor, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        c = self.config
        xs = to_signed(x)
        z, fake, zh = self.generate(xs)

        # Generator step. D's parameters receive gradients here too; they are cleared before D's step.
        opt_g = optimizers["g"]
        opt_g.zero_grad(set_to_none=True)
        with torch.no_grad():
            _, f_real = self.discriminator(xs)
        _, f_fake = self.discriminator(fake)
        l_adv = F.mse_loss(f_fake, f_real)
        l_con = (xs - fake).abs().mean()
        l_enc = F.mse_loss(zh, z)
        loss_g = c.w_adv * l_adv + c.w_con * l_con + c.w_enc * l_enc
        loss_g.backward()
        opt_g.step()

        # Discriminator step on the same batch, G(x) detached.
        opt_d = optimizers["d"]
        opt_d.zero_grad(set_to_none=True)
        logit_real, _ = self.discriminator(xs)
        logit_fake, _ = self.discriminator(fake.detach())
        loss_d = 0.5 * (
            F.binary_cross_entropy_with_logits(logit_real, torch.ones_like(logit_real))
            + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))
        )
        loss_d.backward()
        opt_d.step()
        if float(loss_d.detach()) < c.d_reinit_below:
            self.discriminator.apply(dcgan_init)

        return {
            "g": float(loss_g.detach()),
            "d": float(loss_d.detach()),
            "adv": float(l_adv.detach()),
            "con": float(l_con.detach()),
            "enc": float(l_enc.detach()),
        }

    @torch.no_grad()
    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        xs = to_signed(x)
        z, fake, zh = self.generate(xs)
        l_con = (xs - fake).abs().flatten(1).mean(dim=1)
        l_enc = ((zh - z) ** 2).mean(dim=1)
        return c.w_con * l_con + c.w_enc * l_enc
