"""``alcn``: a denoising autoencoder trained against adversarially learned continuous noise.

Barker, Bhowmik, Gaus, Breckon, "Robust Semi-Supervised Anomaly Detection via Adversarially Learned
Continuous Noise Corruption", VISAPP 2023 (arXiv 2303.03925). No public code: the paper and
MODELS.md section 4 are the sources.

Nets (b = ``base_channels``, 16 in the paper; c = image channels; the paper's convolutions are all
5x5, stride 1, no padding ("valid"), with bias; G_noise's 3x3 upsampling stack for large images,
below, is ours):

- G_denoise: Conv(c, b)-ReLU-Conv(b, 2b)-ReLU-ConvT(2b, b)-ReLU-ConvT(b, c), no output activation.
  H x W -> (H-8) x (W-8) -> H x W.
- G_noise: z ~ N(0, I_latent) (latent 256) -> Linear(latent, 2b (H-8)(W-8)) -> ReLU -> reshape
  [2b, H-8, W-8] -> ConvT(2b, b)-ReLU-ConvT(b, c)-Sigmoid: noise in [0, 1] at H x W (at 28 x 28 the
  Linear has 32 x 20 x 20 = 12,800 outputs, as in the paper's figure).

Training, per batch x (float32 [0, 1]):

1. draw z [B, latent] ~ N(0, I) and alpha ~ U[alpha_min, alpha_max] ONCE (``draw``);
2. noise step (``noise_step``): xn = alpha x + (1 - alpha) G_noise(z); G_noise ASCENDS
   L(x, G_denoise(xn)) (its optimiser minimises -L); G_denoise is frozen (requires_grad off for the
   step, so its parameters neither change nor collect gradients);
3. denoise step (``denoise_step``): xn' = alpha x + (1 - alpha) G_noise'(z) with the UPDATED G_noise,
   the same z and alpha, G_noise evaluated without gradients; G_denoise descends L(x, G_denoise(xn')).

L is the Focal Frequency Loss (Jiang et al., ICCV 2021) from the authors' package
``focal-frequency-loss`` (``FocalFrequencyLoss(loss_weight=1, alpha=1)``): F = fft2(., norm='ortho'),
d = |F_pred - F_target|^2, w = sqrt(d)^alpha normalised by its max per image and channel, clamped
to [0, 1], detached; loss = mean(w d). tests/test_model_alcn.py checks the package against this
formula computed directly.

Score: mean |x - G_denoise(x)| over channels and pixels on the CLEAN input (no noise at test time);
map: |x - G_denoise(x)| per pixel, mean over channels (``score="l2"``: squared errors, below). Only
G_denoise (after the input standardisation with ``input_norm="standardise"``) is in the exported graph.

Choices the paper leaves open ("paper: ...; ours: ..."):

- paper: inputs standardised; ours by default (``input_norm="unit"``, MODELS.md): x in [0, 1], no
  normalisation inside ``forward``: the blend alpha x + (1 - alpha) noise mixes the image with sigmoid
  noise in [0, 1], which is only range-consistent for [0, 1] images (the paper's own argument
  assumes it). ``input_norm="standardise"`` is the paper's: x' = (x - mean) / std per channel, with
  mean and std of the training images measured by ``before_training`` (how the paper computes them
  is not stated) and kept as buffers, so the exported graph standardises too; blend, loss and score
  then work on x' (the score in standardised units). Measured (docs/benchmarks.md, denoiser lr 1e-3):
  one-class MNIST +0.03 (l1 score) and +0.005 (l2), ELPV -0.04 to -0.18, so MODELS.md's [0, 1] stays
  the default.
- paper: ablation against "random" and Gaussian noise, their parameters not stated; ours:
  ``noise="uniform"``, per-pixel U[0, 1] noise in the same blend, no G_noise and no noise step (what
  the learned noise adds over the noise it is initialised to resemble). Gaussian noise is not built.
- paper: "alpha ~ U[0.2, 0.9]" for each batch, per-sample not stated; ours: one alpha per batch
  (``alpha_per_sample=False``), reused in both steps; ``alpha_per_sample=True`` draws one per image.
- paper: z drawn once per batch; ours: z is [B, latent], one vector per image (so the images of a
  batch get different noise), drawn once per batch and reused by the denoise step.
- paper: the step-2 line drops alpha (xn' = x + G_noise(z)); ours: the same blend as step 1 with the
  same alpha (a typo in the paper, MODELS.md).
- paper: figure only for 28 x 28 (MNIST/CIFAR); a literal Linear at 256 x 256 would have ~0.5 G
  parameters. Ours: up to ``noise_literal_max_size`` (default 32: MNIST's 28 and CIFAR's 32) the
  figure is literal (at 32: a 4.7 M-parameter Linear); above it G_noise starts from a small seed
  map: Linear(latent, 2b s s) -> ReLU -> k x [bilinear upsample x2 -> Conv3x3(2b, 2b, padding 1)
  -> ReLU] -> centre crop to (H-8) x (W-8) -> the same two ConvT + Sigmoid. s = ceil((H-8) / 2^k)
  with the smallest k giving s <= ``noise_seed_size`` (default 8); at 256: s = 8, k = 5,
  8 -> 256 -> crop 248 -> 256 (Linear 256 -> 2,048 outputs, 0.5 M parameters).
- paper: Adam, lr 1e-5 (G_denoise) and 8e-3 (G_noise), betas not stated; ours: Adam with PyTorch's
  default betas (0.9, 0.999). The trainer's ``--lr`` (``lr``) is the denoiser's rate; the noise
  generator's is ``noise_lr``.
- paper: batch 4096 (MNIST); ours: ``batch_size`` 4096 by default up to ``noise_literal_max_size``
  (32 px), 16 above it (MODELS.md's batch for large images) unless set. The
  trainer drops the last incomplete batch of an epoch (one batch when the data are fewer): a one-class
  MNIST digit (digit 1: 6,742 images, 6,068 after the held-out 10%) gives ONE step of 4,096 per epoch.
- paper: number of epochs not stated; ours: 1000 by default (= 1000 steps at batch 4096 on one
  MNIST digit; at lr 1e-5 the denoiser needs many steps).
- paper: no weight initialisation stated; ours: PyTorch defaults.
- paper: no anomaly score defined; ours: mean |x - G_denoise(x)| on clean input (MODELS.md,
  ``score="l1"``), map |x - G_denoise(x)|. ``score="l2"``: the mean squared error and its map, the
  pixel-space form of the training loss without its focal weights (with norm='ortho' the FFT is
  unitary, so sum |F(a) - F(b)|^2 = sum |a - b|^2) and the ``ae`` baseline's score. Found with a
  diagnostic on the MNIST test split (scripts/score_variants.py), where it gains 0.08; ELPV, measured
  after that, gains nothing (-0.00 mono, -0.02 poly), so l1 stays the default (docs/benchmarks.md).
- paper: model selection not stated; ours: ``validation_loss`` = the anomaly score itself (as
  ``score`` and ``input_norm`` define it) per held-out normal image. It does not depend on G_noise (whose adversarial
  loss is not stationary), so it compares checkpoints on one fixed scale: how well the denoiser
  reproduces normal images, which is what the score measures.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from focal_frequency_loss import FocalFrequencyLoss
from pydantic import Field, model_validator
from torch import nn

from trainer.errors import UserError
from trainer.models.base import Detector, ModelConfig

KERNEL = 5
SHRINK = 2 * (KERNEL - 1)  # two valid 5x5 convolutions take 8 pixels off each side length
MIN_SIZE = 16
MAX_SIZE = 1024
LITERAL_MAX_SIZE = 32  # the paper's figure is literal up to CIFAR's 32 px
LARGE_IMAGE_BATCH = 16
MIN_INPUT_STD = 1e-6  # [0, 1] units: below it a channel is constant and cannot be standardised


class ALCNConfig(ModelConfig):
    image_size: int = Field(28, description="input height = width, pixels (paper: 28 for MNIST/CIFAR; 256 for MVTec)")
    channels: Literal[1, 3] = Field(1, description="1 grey, 3 colour (RGB)")
    lr: float = Field(1e-5, gt=0, description="Adam learning rate of G_denoise (the trainer's --lr); paper 1e-5")
    batch_size: int = Field(
        4096,
        ge=1,
        description="images per step; default: the paper's 4096 up to noise_literal_max_size, else 16 (large images)",
    )
    epochs: int = Field(1000, ge=1, description="paper: not stated; ours 1000")
    noise_lr: float = Field(8e-3, gt=0, description="Adam learning rate of G_noise; paper 8e-3")
    base_channels: int = Field(16, ge=1, description="b: G_denoise widths b, 2b; G_noise widths 2b, b (paper 16)")
    latent: int = Field(256, ge=1, description="dimension of z ~ N(0, I) fed to G_noise (paper 256)")
    alpha_min: float = Field(0.2, ge=0, le=1, description="blend weight of the clean image: alpha ~ U[min, max]")
    alpha_max: float = Field(0.9, ge=0, le=1, description="upper end of alpha's uniform range")
    alpha_per_sample: bool = Field(False, description="False: one alpha per batch (paper's text); True: one per image")
    ffl_alpha: float = Field(1.0, gt=0, description="focal frequency loss exponent of the spectral distance weight")
    noise_literal_max_size: int = Field(
        LITERAL_MAX_SIZE, ge=MIN_SIZE, description="largest image size at which G_noise is the paper's literal figure"
    )
    noise_seed_size: int = Field(8, ge=1, description="above the literal size: max side of G_noise's seed map, pixels")
    input_norm: Literal["unit", "standardise"] = Field(
        "unit",
        description="unit: x in [0, 1] as fed (MODELS.md); standardise: (x - mean) / std per channel of the "
        "training images, computed before training and kept in the graph (the paper)",
    )
    score: Literal["l1", "l2"] = Field(
        "l1",
        description="l1: mean |x - G_denoise(x)| (MODELS.md); l2: mean (x - G_denoise(x))^2, the unweighted pixel form "
        "of the training loss (Parseval) and the ae baseline's score",
    )
    noise: Literal["adversarial", "uniform"] = Field(
        "adversarial",
        description="adversarial: G_noise, the method; uniform: per-pixel U[0, 1] noise in the same blend and no "
        "G_noise (the paper's ablation against random noise)",
    )

    @model_validator(mode="before")
    @classmethod
    def _size_defaults(cls, data: Any) -> Any:
        """batch_size defaults by image size: the paper's 4096 for MNIST/CIFAR-sized images, 16 above
        ``noise_literal_max_size`` (MODELS.md: "16 for large images"; 4096 images of 256 px are 3 GB)."""
        if isinstance(data, dict) and "batch_size" not in data:
            literal = data.get("noise_literal_max_size", LITERAL_MAX_SIZE)
            if int(data.get("image_size", 28)) > int(literal):
                data = {**data, "batch_size": LARGE_IMAGE_BATCH}
        return data


@dataclass
class NoiseDraw:
    """The randomness of one training batch, drawn once and used by both steps."""

    z: torch.Tensor  # [B, latent]
    alpha: torch.Tensor  # [1 or B, 1, 1, 1]
    uniform: torch.Tensor | None = None  # [B, C, H, W] U[0, 1] noise, only with ``noise="uniform"``


def denoiser(channels: int, base: int) -> nn.Sequential:
    """G_denoise: valid 5x5 convs, H -> H-8 -> H; output unbounded (no activation)."""
    return nn.Sequential(
        nn.Conv2d(channels, base, KERNEL),
        nn.ReLU(inplace=True),
        nn.Conv2d(base, 2 * base, KERNEL),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(2 * base, base, KERNEL),
        nn.ReLU(inplace=True),
        nn.ConvTranspose2d(base, channels, KERNEL),
    )


def seed_plan(inner: int, max_seed: int) -> tuple[int, int]:
    """(seed side s, upsampling steps k): the smallest k with s = ceil(inner / 2^k) <= max_seed."""
    k = 0
    while math.ceil(inner / 2**k) > max_seed:
        k += 1
    return math.ceil(inner / 2**k), k


class NoiseGenerator(nn.Module):
    """G_noise: z [B, latent] -> noise [B, C, H, W] in [0, 1]; see the module docstring."""

    def __init__(self, c: ALCNConfig) -> None:
        super().__init__()
        wide = 2 * c.base_channels
        self.wide = wide
        self.inner = c.image_size - SHRINK
        self.literal = c.image_size <= c.noise_literal_max_size
        self.seed, steps = (self.inner, 0) if self.literal else seed_plan(self.inner, c.noise_seed_size)
        self.fc = nn.Linear(c.latent, wide * self.seed * self.seed)
        ups: list[nn.Module] = []
        for _ in range(steps):
            ups += [
                nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
                nn.Conv2d(wide, wide, 3, padding=1),
                nn.ReLU(inplace=True),
            ]
        self.upsample = nn.Sequential(*ups)
        self.head = nn.Sequential(
            nn.ConvTranspose2d(wide, c.base_channels, KERNEL),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(c.base_channels, c.channels, KERNEL),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc(z)).view(-1, self.wide, self.seed, self.seed)
        h = self.upsample(h)
        if h.shape[-1] != self.inner:  # centre crop of the upsampled seed map to (H-8) x (W-8)
            o = (h.shape[-1] - self.inner) // 2
            h = h[..., o : o + self.inner, o : o + self.inner]
        return self.head(h)


@contextlib.contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """Turn off requires_grad on ``module``'s parameters for the block (no gradients accumulate)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


class ALCN(Detector):
    """DAE + adversarially learned continuous noise; see the module docstring."""

    name = "alcn"
    Config = ALCNConfig
    config: ALCNConfig
    input_mean: torch.Tensor  # [C], only with input_norm="standardise"
    input_std: torch.Tensor
    input_measured: torch.Tensor  # bool []: set by before_training

    def __init__(self, config: ALCNConfig) -> None:
        super().__init__(config)
        c = config
        self.g_denoise = denoiser(c.channels, c.base_channels)
        # Built only when it trains: the uniform-noise ablation has no noise generator at all.
        self.g_noise = NoiseGenerator(c) if c.noise == "adversarial" else None
        self.ffl = FocalFrequencyLoss(loss_weight=1.0, alpha=c.ffl_alpha)
        self.last_draw: NoiseDraw | None = None  # for inspection only (not state: redrawn every batch)
        if c.input_norm == "standardise":
            # The identity until ``before_training`` measures the training images (a fresh model scores like
            # an unstandardised one, never NaN); training before that is refused, by ``input_measured``.
            self.register_buffer("input_mean", torch.zeros(c.channels))
            self.register_buffer("input_std", torch.ones(c.channels))
            self.register_buffer("input_measured", torch.zeros((), dtype=torch.bool))

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        size = config.image_size
        if size < MIN_SIZE or size > MAX_SIZE:
            raise UserError(
                f"model {cls.name!r} cannot take image size {size}: it needs {MIN_SIZE} to {MAX_SIZE} pixels "
                "(28 for MNIST, 256 for MVTec-like images)"
            )
        if isinstance(config, ALCNConfig) and config.alpha_min > config.alpha_max:
            raise UserError(
                f"model {cls.name!r}: alpha_min ({config.alpha_min}) must not exceed alpha_max ({config.alpha_max})"
            )

    # -- input statistics -----------------------------------------------------------------------

    @torch.no_grad()
    def before_training(self, batches: Callable[[], Iterator[torch.Tensor]]) -> None:
        """With ``input_norm="standardise"``: the per-channel mean and standard deviation of the training
        images (in [0, 1] units, float64 sums), kept in buffers so that checkpoints and the exported
        graph carry them. Nothing to do for ``"unit"``."""
        if self.config.input_norm != "standardise":
            return
        c = self.config.channels
        total = torch.zeros(c, dtype=torch.float64)
        total_sq = torch.zeros(c, dtype=torch.float64)
        n = 0
        for x in batches():
            xd = x.detach().to("cpu", torch.float64)
            total += xd.sum(dim=(0, 2, 3))
            total_sq += (xd * xd).sum(dim=(0, 2, 3))
            n += xd.shape[0] * xd.shape[2] * xd.shape[3]
        if n == 0:
            raise RuntimeError("ALCN.before_training got no training images to standardise with")
        mean = total / n
        std = (total_sq / n - mean * mean).clamp(min=0).sqrt()
        flat = (std < MIN_INPUT_STD).nonzero().flatten().tolist()
        if flat:
            raise UserError(
                f"model {self.name!r} with input_norm=standardise: the training images are constant in channel(s) "
                f"{flat} (standard deviation below {MIN_INPUT_STD}), so they cannot be standardised; "
                "check the images, or use input_norm=unit"
            )
        self.input_mean.copy_(mean.float())
        self.input_std.copy_(std.float())
        self.input_measured.fill_(True)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """The model's input space: x itself (``"unit"``) or (x - mean) / std per channel (``"standardise"``)."""
        if self.config.input_norm != "standardise":
            return x
        shape = (1, -1, 1, 1)
        return (x - self.input_mean.view(shape)) / self.input_std.view(shape)

    # -- scoring --------------------------------------------------------------------------------

    def error_map(self, x: torch.Tensor) -> torch.Tensor:
        """|x' - G_denoise(x')| (``score="l1"``) or (x' - G_denoise(x'))^2 (``"l2"``) per pixel, mean over
        channels, float32 [B, 1, H, W], x' = ``normalise(x)`` (clean input; in standardised units with
        ``input_norm="standardise"``)."""
        xn = self.normalise(x)
        diff = xn - self.g_denoise(xn)
        err = diff.abs() if self.config.score == "l1" else diff * diff
        return err.float().mean(dim=1, keepdim=True)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        amap = self.error_map(x)
        return amap.flatten(1).mean(dim=1), amap

    @torch.no_grad()
    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        return self.error_map(x).flatten(1).mean(dim=1)

    # -- training -------------------------------------------------------------------------------

    def make_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        opts: dict[str, torch.optim.Optimizer] = {"denoise": torch.optim.Adam(self.g_denoise.parameters(), lr=lr)}
        if self.g_noise is not None:
            opts["noise"] = torch.optim.Adam(self.g_noise.parameters(), lr=self.config.noise_lr)
        return opts

    def draw(self, x: torch.Tensor) -> NoiseDraw:
        """z [B, latent] ~ N(0, I) and alpha ~ U[alpha_min, alpha_max] for one batch, then (uniform-noise
        ablation only) per-pixel U[0, 1] noise shaped like ``x``; torch's default RNG, in that order."""
        c = self.config
        b = x.shape[0]
        z = torch.randn(b, c.latent, device=x.device, dtype=x.dtype)
        n_alpha = b if c.alpha_per_sample else 1
        u = torch.rand(n_alpha, 1, 1, 1, device=x.device, dtype=x.dtype)
        uniform = torch.rand_like(x) if c.noise == "uniform" else None
        return NoiseDraw(z=z, alpha=c.alpha_min + (c.alpha_max - c.alpha_min) * u, uniform=uniform)

    @property
    def noise_generator(self) -> NoiseGenerator:
        """G_noise; a RuntimeError for the uniform-noise ablation, which has none."""
        if self.g_noise is None:
            raise RuntimeError("this ALCN has no noise generator (noise='uniform')")
        return self.g_noise

    @staticmethod
    def blend(x: torch.Tensor, noise: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """xn = alpha x + (1 - alpha) noise."""
        return alpha * x + (1.0 - alpha) * noise

    def noise_step(self, x: torch.Tensor, d: NoiseDraw, opt: torch.optim.Optimizer) -> float:
        """Step 1: G_noise ascends L(x, G_denoise(xn)); G_denoise frozen. Returns L."""
        opt.zero_grad(set_to_none=True)
        with frozen(self.g_denoise):
            loss = self.ffl(self.g_denoise(self.blend(x, self.noise_generator(d.z), d.alpha)), x)
            (-loss).backward()
        opt.step()
        return float(loss.detach())

    def denoise_step(self, x: torch.Tensor, d: NoiseDraw, opt: torch.optim.Optimizer) -> float:
        """Step 2: G_denoise descends L(x, G_denoise(xn')), xn' from the current G_noise (no gradients),
        or from the draw's uniform noise in the ablation."""
        opt.zero_grad(set_to_none=True)
        if d.uniform is not None:
            noise = d.uniform
        else:
            with torch.no_grad():
                noise = self.noise_generator(d.z)
        loss = self.ffl(self.g_denoise(self.blend(x, noise, d.alpha)), x)
        loss.backward()
        opt.step()
        return float(loss.detach())

    def training_step(self, x: torch.Tensor, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        if self.config.input_norm == "standardise" and not bool(self.input_measured):
            raise RuntimeError(
                "ALCN's input statistics are not set: call before_training(batches) over the training images "
                "before training (the trainer does this for a new run; a resumed run loads them)"
            )
        x = self.normalise(x)
        d = self.draw(x)
        self.last_draw = d
        if self.g_noise is None:
            return {"denoise": self.denoise_step(x, d, optimizers["denoise"])}
        l_noise = self.noise_step(x, d, optimizers["noise"])
        l_denoise = self.denoise_step(x, d, optimizers["denoise"])
        return {"noise": l_noise, "denoise": l_denoise}


__all__ = ["ALCN", "ALCNConfig", "NoiseDraw", "NoiseGenerator"]
