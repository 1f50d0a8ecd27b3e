"""``ede``: the shared-autoencoder encoder-decoder-encoder detector (seed-001 paper; MODELS.md section 1).

Nets (paper Fig. 3): encoders E1, E2 and decoders D1, D2 on the DCGAN pyramid (4x4 kernels,
stride 2, ``base_channels`` doubling per level; a 4x4 valid conv to a 1x1 latent of ``latent``
channels). Encoder: Conv-LReLU(0.2), [Conv-BN-LReLU(0.2)] x (levels - 1), Conv-Tanh (the latent is
bounded). Decoder (Fig. 3B): [ConvT-BN-LReLU(0.2)] x levels, ConvT-Tanh. Images are mapped to
[-1, 1] inside the graph.

Paths: z = E1(x); x1 = D1(z); x2 = D2(z); z1 = E2(x1); z2 = E2(x2); xh = D1(z2); zh = E2(xh).
Losses, n = epoch counted from 1 (epoch 1 is pure reconstruction), a = ``alpha``, b = ``beta``:

    L_EDE1 = (1/n)(a|x - x1| + b|z - z1|) - (1 - 1/n)(a|x - xh| + b|z - zh|)
    L_EDE2 = (1/n)(a|x - x2| + b|z - z2|) + (1 - 1/n)(a|x - xh| + b|z - zh|)

Score: A(x) = w1 mean|z - z2| + (1 - w1) mean|z - zh| over the latent dims (w1 = ``score_w1`` = 0.5).

The optimisers and the two sub-steps (``step_ede1`` then ``step_ede2`` in every ``training_step``):
- "ede1" = Adam over {E1, D1, E2} on L_EDE1; "ede2" = Adam over {E1, D2, E2} on L_EDE2 (as USAD
  does). E1 and E2 are therefore in BOTH optimisers, each of which keeps its own Adam moments for
  them: within one training step the shared encoders get two Adam updates, first ede1's (from
  L_EDE1's gradient) and then ede2's (from L_EDE2's gradient, computed after ede1's update).
- Each sub-step runs its own FRESH forward pass from the current weights (so step 2 sees the
  encoders and D1 that step 1 has just updated; this is USAD's reference loop, and it is the only
  valid choice once step 1 has changed weights in place: the old graph would be stale, and autograd
  refuses to reuse it after an in-place update). The cost is a second forward pass per batch.
- No gradient leak (USAD's reference leaks: its zero_grad clears only its own group, so a decoder
  accumulates the OTHER loss's gradient into its next update): each sub-step computes gradients
  with ``torch.autograd.grad`` with respect to its own optimiser's parameters only, writes them to
  ``.grad``, steps, and clears them. No other parameter's ``.grad`` is ever written, so the EDE1
  step never touches D2 and the EDE2 step never touches D1 (gradients still FLOW through the other
  decoder, e.g. L_EDE1's xh term reaches E1 through D2, as the paper's paths require).
- The epoch n is kept in the buffer ``n_epoch`` (set by ``on_epoch_start``), so it is in state_dict.

Ablation (paper: AE 0.957, one EDE 0.961, two EDE without the adversarial phase 0.974, full 0.989
on MNIST), ``variant``:
- ``full``: the above.
- ``two_ede_no_adv``: same nets, optimisers and score; the losses keep only their reconstruction
  terms with weight 1 (1/n = 1 and 1 - 1/n = 0 in every epoch).
- ``one_ede``: E1, D1, E2 only (no D2), one optimiser "ede1" on a|x - x1| + b|z - z1|;
  score mean|z - z1|, map |x - x1| (a GANomaly-style generator without the discriminator).
- ``ae``: E1, D1 only, one optimiser "ede1" on a|x - x1|; score = map mean = |x - x1|.

Choices the paper leaves open ("paper: ...; ours: ..."):
- paper: widths, kernel sizes, latent size not given; ours: DCGAN/GANomaly pyramid, 64 base
  channels, latent 100 as a 1x1 map, 32x32 input for digit-sized data; larger inputs add levels.
- paper: LeakyReLU slope not given; ours: 0.2 (encoder and decoder).
- paper: bias and init not given; ours: bias-free convolutions (BatchNorm follows), DCGAN init
  N(0, 0.02), BatchNorm weights N(1, 0.02).
- paper: norms of the loss terms illegible; ours: images mean absolute error, latents mean squared
  error (as GANomaly), both computed in the [-1, 1] image space; alpha = beta = 1.
- paper: "update using L_EDE1 and L_EDE2" only; ours: two Adam optimisers as above, lr 2e-4,
  betas (0.5, 0.999), batch 64, 15 epochs (DCGAN/GANomaly settings), sequential sub-steps with a
  fresh forward each, no gradient leak.
- paper: score norm not legible; ours: mean absolute difference over the latent dims, w1 = w2 = 0.5.
- paper: no anomaly map; ours: |x - x2| per pixel (the D2 reconstruction the score's z2 comes
  from), mean over channels, in [0, 1] units. It is NOT what the score measures.
- paper: model selection not stated; ours: best checkpoint by ``validation_loss`` on held-out
  normal images = the mean of the two losses' reconstruction parts,
  0.5 (a|x - x1| + b|z - z1|) + 0.5 (a|x - x2| + b|z - z2|) per image, without the 1/n weights
  and without the adversarial term (which L_EDE1 maximises and L_EDE2 minimises, so it is not a
  quantity that should fall), hence comparable across epochs. ``one_ede``/``ae``: their own loss.
  Measured (3000 digit-1 MNIST images, base 16, latent 32, batch 32, 10 epochs, CPU): from n = 3 the
  adversarial term dominates L_EDE1; since z2 ~ z, xh ~ x1, so D1 maximises its own reconstruction
  error (|x - x1| 0.59 at epoch 2, 1.28 at epoch 10) while the D2 path keeps improving. This loss is
  then lowest at epoch 2 (test AUROC 0.997; the last epoch gives 0.953; two_ede_no_adv 0.997).
- Train-mode BatchNorm statistics are updated by both sub-steps' forward passes.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field
from torch import nn

from trainer.models.base import Detector, ModelConfig
from trainer.models.blocks import check_pyramid_size, dcgan_decoder, dcgan_encoder, dcgan_init, to_signed

Variant = Literal["full", "two_ede_no_adv", "one_ede", "ae"]
LEAKY_SLOPE = 0.2  # paper Fig. 3B: LeakyReLU in the decoder; 0.2 as in DCGAN's encoder


class EDEConfig(ModelConfig):
    latent: int = Field(100, ge=1, description="latent channels (1x1 map)")
    base_channels: int = Field(64, ge=1, description="channels of the first pyramid level; doubled per level")
    alpha: float = Field(1.0, gt=0, description="weight a of the image terms (mean absolute error, [-1, 1] units)")
    beta: float = Field(1.0, ge=0, description="weight b of the latent terms (mean squared error)")
    score_w1: float = Field(
        0.5, ge=0, le=1, description="w1 of the score A = w1 mean|z - z2| + (1 - w1) mean|z - zh| (w2 = 1 - w1)"
    )
    variant: Variant = Field(
        "full",
        description="paper's ablation: full | two_ede_no_adv (no adversarial phase) | one_ede (E1-D1-E2) | ae (E1-D1)",
    )


def _encoder(c: EDEConfig) -> nn.Sequential:
    enc = dcgan_encoder(c.image_size, c.channels, c.latent, c.base_channels)
    enc.append(nn.Tanh())
    return enc


def _decoder(c: EDEConfig) -> nn.Sequential:
    return dcgan_decoder(c.image_size, c.channels, c.latent, c.base_channels, slope=LEAKY_SLOPE)


def _img_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean absolute error [B]."""
    return (a - b).abs().flatten(1).mean(dim=1)


def _lat_err(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error over latent dims [B]."""
    return ((a - b) ** 2).flatten(1).mean(dim=1)


class EDE(Detector):
    """Shared-autoencoder EDE; see the module docstring."""

    name = "ede"
    Config = EDEConfig
    config: EDEConfig
    n_epoch: torch.Tensor

    def __init__(self, config: EDEConfig) -> None:
        super().__init__(config)
        c = config
        self.encoder1 = _encoder(c)
        self.decoder1 = _decoder(c)
        self.encoder2: nn.Sequential | None = _encoder(c) if c.variant != "ae" else None
        self.decoder2: nn.Sequential | None = _decoder(c) if c.variant in ("full", "two_ede_no_adv") else None
        self.apply(dcgan_init)
        self.register_buffer("n_epoch", torch.ones((), dtype=torch.long))

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        check_pyramid_size(config.image_size, cls.name)

    # ---- nets -------------------------------------------------------------------------------

    @property
    def two_ede(self) -> bool:
        return self.config.variant in ("full", "two_ede_no_adv")

    def _e2(self) -> nn.Sequential:
        if self.encoder2 is None:
            raise RuntimeError(f"variant {self.config.variant!r} has no E2")
        return self.encoder2

    def _d2(self) -> nn.Sequential:
        if self.decoder2 is None:
            raise RuntimeError(f"variant {self.config.variant!r} has no D2")
        return self.decoder2

    def group1_params(self) -> list[nn.Parameter]:
        """{E1, D1, E2} (the "ede1" optimiser; {E1, D1} for ``ae``)."""
        params = [*self.encoder1.parameters(), *self.decoder1.parameters()]
        if self.encoder2 is not None:
            params += list(self.encoder2.parameters())
        return params

    def group2_params(self) -> list[nn.Parameter]:
        """{E1, D2, E2} (the "ede2" optimiser; two-EDE variants only)."""
        return [*self.encoder1.parameters(), *self._d2().parameters(), *self._e2().parameters()]

    # ---- scoring ----------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        xs = to_signed(x)
        z = self.encoder1(xs)
        variant = self.config.variant
        if variant == "ae":
            x1 = self.decoder1(z)
            amap = (xs - x1).abs().float().mean(dim=1, keepdim=True) * 0.5
            return amap.flatten(1).mean(dim=1), amap
        if variant == "one_ede":
            x1 = self.decoder1(z)
            z1 = self._e2()(x1)
            score = (z.float() - z1.float()).abs().flatten(1).mean(dim=1)
            return score, (xs - x1).abs().float().mean(dim=1, keepdim=True) * 0.5
        x2 = self._d2()(z)
        z2 = self._e2()(x2)
        xh = self.decoder1(z2)
        zh = self._e2()(xh)
        zf = z.float()
        w1 = self.config.score_w1
        score = w1 * (zf - z2.float()).abs().flatten(1).mean(dim=1) + (1.0 - w1) * (zf - zh.float()).abs().flatten(
            1
        ).mean(dim=1)
        amap = (xs - x2).abs().float().mean(dim=1, keepdim=True) * 0.5  # [0, 1] units
        return score, amap

    # ---- training ---------------------------------------------------------------------------

    def on_epoch_start(self, epoch: int) -> None:
        self.n_epoch.fill_(epoch)

    def loss_weights(self) -> tuple[float, float]:
        """(reconstruction weight 1/n, adversarial weight 1 - 1/n) for the current epoch n."""
        if self.config.variant != "full":
            return 1.0, 0.0
        n = max(1, int(self.n_epoch))
        return 1.0 / n, 1.0 - 1.0 / n

    def make_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        betas = (0.5, 0.999)
        opts: dict[str, torch.optim.Optimizer] = {"ede1": torch.optim.Adam(self.group1_params(), lr=lr, betas=betas)}
        if self.two_ede:
            opts["ede2"] = torch.optim.Adam(self.group2_params(), lr=lr, betas=betas)
        return opts

    @staticmethod
    def _update(loss: torch.Tensor, opt: torch.optim.Optimizer) -> None:
        """One update of ``opt`` on ``loss``: gradients for ``opt``'s parameters ONLY, then cleared."""
        params = [p for g in opt.param_groups for p in g["params"]]
        grads = torch.autograd.grad(loss, params)
        for p, g in zip(params, grads, strict=True):
            p.grad = g
        opt.step()
        opt.zero_grad(set_to_none=True)

    def _adv(self, xs: torch.Tensor, z: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """a|x - xh| + b|z - zh| with xh = D1(z2), zh = E2(xh), batch mean."""
        c = self.config
        xh = self.decoder1(z2)
        zh = self._e2()(xh)
        return (c.alpha * _img_err(xs, xh) + c.beta * _lat_err(z, zh)).mean()

    def step_ede1(self, x: torch.Tensor, opt: torch.optim.Optimizer) -> dict[str, float]:
        """The EDE1 sub-step: a fresh forward, L_EDE1, an update of {E1, D1, E2} only.

        (``one_ede``: a|x - x1| + b|z - z1|; ``ae``: a|x - x1|.)
        """
        c = self.config
        xs = to_signed(x)
        z = self.encoder1(xs)
        x1 = self.decoder1(z)
        rec = c.alpha * _img_err(xs, x1)
        if self.encoder2 is not None:
            rec = rec + c.beta * _lat_err(z, self.encoder2(x1))
        rec = rec.mean()
        w_rec, w_adv = self.loss_weights()
        loss = w_rec * rec
        out = {"rec1": float(rec.detach())}
        if w_adv > 0.0:
            z2 = self._e2()(self._d2()(z))
            adv = self._adv(xs, z, z2)
            loss = loss - w_adv * adv
            out["adv1"] = float(adv.detach())
        self._update(loss, opt)
        out["ede1"] = float(loss.detach())
        return out

    def step_ede2(self, x: torch.Tensor, opt: torch.optim.Optimizer) -> dict[str, float]:
        """The EDE2 sub-step: a fresh forward (after step 1's update), L_EDE2, an update of {E1, D2, E2} only."""
        c = self.config
        xs = to_signed(x)
        z = self.encoder1(xs)
        x2 = self._d2()(z)
        z2 = self._e2()(x2)
        rec = (c.alpha * _img_err(xs, x2) + c.beta * _lat_err(z, z2)).mean()
        w_rec, w_adv = self.loss_weights()
        loss = w_rec * rec
        out = {"rec2": float(rec.detach())}
        if w_adv > 0.0:
            adv = self._adv(xs, z, z2)
            loss = loss + w_adv * adv
            out["adv2"] = float(adv.detach())
        self._update(loss, opt)
        out["ede2"] = float(loss.detach())
        return out

    def training_step(self, x: torch.Tensor, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        losses = self.step_ede1(x, optimizers["ede1"])
        if self.two_ede:
            losses.update(self.step_ede2(x, optimizers["ede2"]))
        return losses

    @torch.no_grad()
    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        c = self.config
        xs = to_signed(x)
        z = self.encoder1(xs)
        x1 = self.decoder1(z)
        loss1 = c.alpha * _img_err(xs, x1)
        if self.encoder2 is not None:
            loss1 = loss1 + c.beta * _lat_err(z, self.encoder2(x1))
        if not self.two_ede:
            return loss1.float()
        x2 = self._d2()(z)
        loss2 = c.alpha * _img_err(xs, x2) + c.beta * _lat_err(z, self._e2()(x2))
        return (0.5 * (loss1 + loss2)).float()


__all__ = ["EDE", "EDEConfig"]
