"""``oclr``: one-class latent-regularised dual autoencoder (seed 002 of MODELS.md, section 2).

The paper (no public code; MODELS.md was checked against it) trains a generator autoencoder
G = (Ge, Gd), a binary discriminator D and an auxiliary autoencoder D' = (Ge', Gd') that plays
the BEGAN/ADAE game against G, with the latent code of G pulled towards a fixed Deep-SVDD centre c.
An image is scored by how badly the chain D'(G(x)) reconstructs it.

Nets (all DCGAN pyramids from ``blocks``; images in [-1, 1] inside the graph):
- Ge: DCGAN encoder (Conv-LReLU(0.2), [Conv-BN-LReLU] x n, 4x4 valid conv), linear latent of
  ``latent`` channels; Gd: DCGAN decoder (ConvT-BN-ReLU ..., ConvT-Tanh).
- D: DCGAN encoder to one logit (BCE is applied as BCEWithLogits).
- D' = (Ge', Gd'): G's architecture with its own weights.
- Init N(0, 0.02), BatchNorm weights N(1, 0.02); all convolutions bias-free.

Centre: c = mean of Ge(x) over the training set, computed once in ``before_training`` with Ge in
eval mode (BatchNorm running statistics, not batch statistics), then fixed (a buffer, so it is in
``state_dict`` and every checkpoint). Deep SVDD's guard: components with |c_i| < eps (0.1) are set
to +eps or -eps by the sign of c_i (+eps for an exact 0). Until then the buffer holds NaN and
``training_step`` refuses to run.

Losses (weights from the paper: w_i=1, w_a=5, w_z=1, w_c=0.05, w_d=1, k=0.4; images in [-1, 1]):
- G:  w_i |x - G(x)|_1 + w_a BCE(D(G(x)), real) + w_z ||Ge(x) - Ge'(G(x))||_2
      + w_c mean ||Ge(x) - c||^2 + w_d |G(x) - D'(G(x))|_1
- D:  BCE(D(x), real) + BCE(D(G(x)), fake)
- D': |x - D'(x)|_1 - k |G(x) - D'(G(x))|_1
|.|_1 is the L1 norm of each image's difference (the SUM over pixels and channels; ``image_norm``);
||.||_2 is the Euclidean norm of the latent difference of each image (not squared); ||.||^2 its
square; all averaged over the batch.

Score: mean |x - D'(G(x))| over channels and pixels, in [0, 1] pixel units (L1, matching the paper's
L_irec). Map: the same per pixel, mean over channels.

Choices the paper leaves open ("paper: ...; ours: ..."):
- paper: no architecture, latent size or widths; ours: the DCGAN pyramid of MODELS.md with
  GANomaly's latent 100 and 64 base channels, ReLU in the decoders, bias-free convolutions.
- paper: no optimiser, lr, batch or epochs; ours: three Adam optimisers (G, D, D'), lr 2e-4,
  betas (0.5, 0.999), batch 64, 15 epochs (GANomaly's).
- paper: Eq. 1 literally gives G the term -w_d |G(x) - D'(G(x))|_1 (G would maximise D''s error);
  ours: +w_d, G minimises it, as in ADAE/BEGAN which the paper cites (MODELS.md).
- paper: k fixed at 0.4 (no BEGAN k_t control); ours: the same, fixed.
- paper: D is a sigmoid classifier with BCE; ours: the sigmoid folded into BCEWithLogits
  (numerically the same loss, stable). D is not part of the scoring graph.
- paper: the latent term ||Ge(x) - Ge'(G(x))||_2 sits in G's objective without saying whether D'
  learns from it; ours (MODELS.md): only G's weights get gradients from it (Ge' acts as a fixed
  function in G's step; D' weights get none).
- paper: image terms written as L1 norms, latent terms as L2 norms; ours: norms throughout, i.e. the
  image terms are per-image SUMS over pixels and channels, as the latent terms are per-image norms.
  Found after the GPU benchmarks (revision 2, re-run on all ten MNIST digits on CPU: docs/benchmarks.md): the
  image terms used to be MEANS over pixels and channels while the latent terms stayed norms, which
  divided w_i and w_d by the pixel count (1,024 at 32 px, 49,152 at 128 px RGB): G's loss was about
  2 % reconstruction and G did not learn to reconstruct (|x - G(x)| 0.92 -> 0.90 in 3 epochs), did
  not win its game against D', and D''s deliberately bad reconstruction of G(x) made the score rank
  NORMAL images as anomalous (one-class MNIST digit 3, base_channels 32, 5 epochs, CPU: AUROC 0.289
  with means, 0.871 with sums; digit 2 0.770 -> 0.797; digit 1 seed 2 0.962 -> 0.998).
  ``image_norm="mean"`` restores the old units. The D' loss uses the same units (its balance k does
  not depend on them). The score and the map stay means in [0, 1] pixel units (a monotone rescaling
  of the sum: the same AUROC).
- paper: update order and data per step unstated; ours: per batch one G step, then one D step and
  one D' step, both on the G(x) computed in the G step (before G's update, detached), as
  GANomaly's reference reuses its fake batch.
- paper: BatchNorm statistics during G's step unstated; ours: in G's step D and D' run in train
  mode (batch statistics) but their running statistics are restored afterwards, so G's step changes
  nothing of D or D' (their parameters are also frozen: no gradients reach them).
- paper: how c is computed (Deep SVDD: mean of the initial network's outputs over the training
  data); ours: mean of the freshly initialised Ge in eval mode over all training images (never the
  held-out ones), eps = 0.1 guard, fixed afterwards.
- paper: loss units unstated; ours: losses on [-1, 1] images; score and map in [0, 1] units (half
  the [-1, 1] error).
- paper: no rule for choosing the checkpoint; ours: best checkpoint by ``validation_loss`` on held-out
  normal images = the reconstruction terms of G's and D''s losses (see ``validation_loss``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from trainer.models.base import Detector, ModelConfig
from trainer.models.blocks import check_pyramid_size, dcgan_decoder, dcgan_encoder, dcgan_init, to_signed


class OCLRConfig(ModelConfig):
    latent: int = Field(100, ge=1, description="latent channels of Ge and Ge' (1x1 map); paper: unstated, ours 100")
    base_channels: int = Field(64, ge=1, description="channels of the first pyramid level (doubling per level)")
    w_i: float = Field(1.0, ge=0, description="weight of G's image reconstruction L1 |x - G(x)|")
    w_a: float = Field(5.0, ge=0, description="weight of G's adversarial BCE(D(G(x)), real)")
    w_z: float = Field(1.0, ge=0, description="weight of the latent norm ||Ge(x) - Ge'(G(x))||_2")
    w_c: float = Field(0.05, ge=0, description="weight of the centre loss ||Ge(x) - c||^2")
    w_d: float = Field(1.0, ge=0, description="weight of G's term |G(x) - D'(G(x))|_1")
    k: float = Field(0.4, ge=0, description="D' loss: |x - D'(x)| - k |G(x) - D'(G(x))| (fixed, no BEGAN k_t)")
    center_eps: float = Field(0.1, gt=0, description="Deep SVDD guard: |c_i| below this is set to +-center_eps")
    image_norm: Literal["sum", "mean"] = Field(
        "sum", description="image L1 terms of the losses: the norm (sum over pixels and channels) or its mean"
    )


def guard_center(c: torch.Tensor, eps: float) -> torch.Tensor:
    """Deep SVDD's guard: components with |c_i| < eps become +eps or -eps by sign (+eps for exact 0)."""
    small = c.abs() < eps
    signed = torch.where(c < 0, torch.full_like(c, -eps), torch.full_like(c, eps))
    return torch.where(small, signed, c)


def _params(modules: list[nn.Module]) -> list[nn.Parameter]:
    return [p for m in modules for p in m.parameters()]


class OCLR(Detector):
    """One-class latent-regularised dual autoencoder; see the module docstring."""

    name = "oclr"
    Config = OCLRConfig
    revision = 2  # 2: image loss terms are per-image L1 norms (were means: w_i, w_d ~ 1/pixels)
    config: OCLRConfig
    center: torch.Tensor

    def __init__(self, config: OCLRConfig) -> None:
        super().__init__(config)
        c = config
        self.g_encoder = dcgan_encoder(c.image_size, c.channels, c.latent, c.base_channels)
        self.g_decoder = dcgan_decoder(c.image_size, c.channels, c.latent, c.base_channels)
        self.discriminator = dcgan_encoder(c.image_size, c.channels, 1, c.base_channels)
        self.aux_encoder = dcgan_encoder(c.image_size, c.channels, c.latent, c.base_channels)
        self.aux_decoder = dcgan_decoder(c.image_size, c.channels, c.latent, c.base_channels)
        self.apply(dcgan_init)
        # NaN until ``before_training`` computes it: training against an unset centre is refused.
        self.register_buffer("center", torch.full((c.latent,), float("nan")))

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        check_pyramid_size(config.image_size, cls.name)

    # --- parameter groups -------------------------------------------------------------------
    def generator_modules(self) -> list[nn.Module]:
        return [self.g_encoder, self.g_decoder]

    def auxiliary_modules(self) -> list[nn.Module]:
        return [self.aux_encoder, self.aux_decoder]

    def generator_params(self) -> list[nn.Parameter]:
        return _params(self.generator_modules())

    def discriminator_params(self) -> list[nn.Parameter]:
        return list(self.discriminator.parameters())

    def auxiliary_params(self) -> list[nn.Parameter]:
        return _params(self.auxiliary_modules())

    def make_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        return {
            "g": torch.optim.Adam(self.generator_params(), lr=lr, betas=(0.5, 0.999)),
            "d": torch.optim.Adam(self.discriminator_params(), lr=lr, betas=(0.5, 0.999)),
            "aux": torch.optim.Adam(self.auxiliary_params(), lr=lr, betas=(0.5, 0.999)),
        }

    # --- nets --------------------------------------------------------------------------------
    def generate(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """xs in [-1, 1] -> (Ge(x) [B, latent], G(x) in [-1, 1])."""
        z = self.g_encoder(xs)
        return z.flatten(1), self.g_decoder(z)

    def auxiliary(self, xs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """xs in [-1, 1] -> (Ge'(x) [B, latent], D'(x) in [-1, 1])."""
        z = self.aux_encoder(xs)
        return z.flatten(1), self.aux_decoder(z)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs = to_signed(x)
        _, fake = self.generate(xs)
        _, rec = self.auxiliary(fake)
        amap = (xs - rec).abs().float().mean(dim=1, keepdim=True) * 0.5  # in [0, 1] units
        return amap.flatten(1).mean(dim=1), amap

    # --- the centre --------------------------------------------------------------------------
    @torch.no_grad()
    def before_training(self, batches: Callable[[], Iterator[torch.Tensor]]) -> None:
        """c = mean of Ge(x) over the training images, Ge in eval mode, with the Deep SVDD guard.

        As MODELS.md specifies ("eval mode (BatchNorm!)"). A consequence worth knowing: a fresh
        BatchNorm's running statistics are mean 0 / variance 1, so the eval-mode codes of the initial
        DCGAN-initialised Ge are tiny (std about 0.01 at 32 px, against about 0.9 for the train-mode
        codes G's centre term compares with c) and nearly every component of the mean falls under the
        guard's 0.1: c is in effect a random vector of +-0.1. The centre term (w_c = 0.05) then pulls
        the codes towards that vector rather than towards the data's initial mean.
        """
        was_training = self.g_encoder.training
        self.g_encoder.eval()
        total = torch.zeros(self.config.latent, dtype=torch.float64, device=self.center.device)
        n = 0
        try:
            for x in batches():
                z = self.g_encoder(to_signed(x)).flatten(1)
                total += z.double().sum(dim=0)
                n += len(z)
        finally:
            self.g_encoder.train(was_training)
        if n == 0:
            raise RuntimeError("OCLR.before_training got no training images to compute the centre c from")
        self.center.copy_(guard_center((total / n).float(), self.config.center_eps))

    def _require_center(self) -> None:
        if bool(torch.isnan(self.center).any()):
            raise RuntimeError(
                "OCLR's centre c is not set: call before_training(batches) over the training images "
                "before training (the trainer does this for a new run; a resumed run loads it)"
            )

    # --- training ----------------------------------------------------------------------------
    def _img_l1(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """|a - b|_1 per image (the sum over pixels and channels, or its mean: ``image_norm``), batch mean."""
        per_image = (a - b).abs().flatten(1)
        return (per_image.sum(dim=1) if self.config.image_norm == "sum" else per_image.mean(dim=1)).mean()

    def g_step(self, xs: torch.Tensor, opt: torch.optim.Optimizer) -> tuple[torch.Tensor, dict[str, float]]:
        """G's update on xs in [-1, 1]; returns G(x) (detached, before the update) and the losses.

        D and D' are frozen (no gradients) and their BatchNorm running statistics are restored, so
        this step changes nothing but G.
        """
        c = self.config
        frozen = [self.discriminator, *self.auxiliary_modules()]
        params = _params(frozen)
        flags = [p.requires_grad for p in params]
        saved = [(b, b.detach().clone()) for m in frozen for b in m.buffers()]
        for p in params:
            p.requires_grad_(False)
        try:
            opt.zero_grad(set_to_none=True)
            z, fake = self.generate(xs)
            logit_fake = self.discriminator(fake).flatten()
            z_aux, rec_fake = self.auxiliary(fake)
            l_rec = self._img_l1(xs, fake)
            l_adv = F.binary_cross_entropy_with_logits(logit_fake, torch.ones_like(logit_fake))
            l_lat = (z - z_aux).norm(dim=1).mean()
            l_ctr = ((z - self.center) ** 2).sum(dim=1).mean()
            l_dgen = self._img_l1(fake, rec_fake)
            loss = c.w_i * l_rec + c.w_a * l_adv + c.w_z * l_lat + c.w_c * l_ctr + c.w_d * l_dgen
            loss.backward()
            opt.step()
        finally:
            for p, flag in zip(params, flags, strict=True):
                p.requires_grad_(flag)
            with torch.no_grad():
                for b, v in saved:
                    b.copy_(v)
        losses = {
            "g": float(loss.detach()),
            "rec": float(l_rec.detach()),
            "adv": float(l_adv.detach()),
            "lat": float(l_lat.detach()),
            "ctr": float(l_ctr.detach()),
            "dgen": float(l_dgen.detach()),
        }
        return fake.detach(), losses

    def d_step(self, xs: torch.Tensor, fake: torch.Tensor, opt: torch.optim.Optimizer) -> dict[str, float]:
        """D's update: BCE(D(x), real) + BCE(D(G(x)), fake), with G(x) given detached."""
        opt.zero_grad(set_to_none=True)
        logit_real = self.discriminator(xs).flatten()
        logit_fake = self.discriminator(fake.detach()).flatten()
        loss = F.binary_cross_entropy_with_logits(
            logit_real, torch.ones_like(logit_real)
        ) + F.binary_cross_entropy_with_logits(logit_fake, torch.zeros_like(logit_fake))
        loss.backward()
        opt.step()
        return {"d": float(loss.detach())}

    def aux_step(self, xs: torch.Tensor, fake: torch.Tensor, opt: torch.optim.Optimizer) -> dict[str, float]:
        """D''s update: |x - D'(x)|_1 - k |G(x) - D'(G(x))|_1, with G(x) given detached."""
        fake = fake.detach()
        opt.zero_grad(set_to_none=True)
        _, rec_real = self.auxiliary(xs)
        _, rec_fake = self.auxiliary(fake)
        l_real = self._img_l1(xs, rec_real)
        l_fake = self._img_l1(fake, rec_fake)
        loss = l_real - self.config.k * l_fake
        loss.backward()
        opt.step()
        return {"aux": float(loss.detach()), "aux_real": float(l_real.detach()), "aux_fake": float(l_fake.detach())}

    def training_step(self, x: torch.Tensor, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        self._require_center()
        xs = to_signed(x)
        fake, losses = self.g_step(xs, optimizers["g"])
        losses |= self.d_step(xs, fake, optimizers["d"])
        losses |= self.aux_step(xs, fake, optimizers["aux"])
        return losses

    @torch.no_grad()
    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        """Per image: w_i mean|x - G(x)| + mean|x - D'(x)| (images in [-1, 1]; per-pixel MEANS whatever
        ``image_norm`` is: both terms share the pixel count, so the checkpoint chosen is the same as
        with the training loss's sums, and the logged val_loss stays on one scale across image sizes).

        These are the reconstruction terms of G's and D''s losses, the two autoencoders of the
        scoring chain D'(G(x)): each is minimised by its own player with no opponent pushing it back
        up, so the sum is stationary as training goes on. Left out: the adversarial terms (BCE against
        D, |G(x) - D'(G(x))|), which oscillate by design, and the centre term ||Ge(x) - c||^2, which the
        initial network minimises trivially (c is the mean of the initial Ge), so it would favour the
        first epoch (measured: it picked epoch 1 at AUROC 0.61 over epoch 3 at 0.91 on MNIST digit 1;
        c is the guarded mean of the initial Ge, see ``before_training``).
        """
        self._require_center()
        xs = to_signed(x)
        _, fake = self.generate(xs)
        _, rec_real = self.auxiliary(xs)
        l_rec = (xs - fake).abs().flatten(1).mean(dim=1)
        l_aux = (xs - rec_real).abs().flatten(1).mean(dim=1)
        return (self.config.w_i * l_rec + l_aux).float()


__all__ = ["OCLR", "OCLRConfig", "guard_center"]
