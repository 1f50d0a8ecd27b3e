"""``cbigan``: Carrara, Amato, Brombin, Falchi, Gennaro, "Combining GANs and AutoEncoders for
Efficient Anomaly Detection", ICPR 2020 (CBiGAN; reference code fabiocarrara/cbigan-ad, TensorFlow).

A BiGAN (encoder E: image -> z, generator G: z -> image, discriminator D(x, z)) trained with
WGAN-GP plus a cycle-consistency loss, scored by reconstruction (MODELS.md section 3).

Networks (multiplier ``base_channels`` = m, reference m = 3; no normalisation; LeakyReLU(0.2)):

- d_block(n): skip = conv1x1(n); main = conv3x3(n)-LReLU-conv3x3(n)-LReLU-conv1x1(n); add; LReLU;
  AvgPool 2x2 (not after the last block). g_block(n): bilinear upsample x2 (when it upsamples),
  same body. Only each block's last 1x1 conv has a bias.
- E: d_blocks m, 2m, 3m, 4m, 8m, 16m; flatten; Dense 16m (no bias); LReLU; Dense ``latent`` (bias).
- G: Dense 2*2*16m (no bias), reshape [16m, 2, 2], no activation; g_blocks 16m, 8m, 4m, 3m, 2m, m;
  conv1x1(channels, bias) + Tanh.
- D(x, z): x through a copy of E's conv trunk; z through Dense ``d_z_width`` x3 (no bias, LReLU);
  concat; Dense 16m (no bias); LReLU; Dense 1 (bias, linear critic).
  At 128 input, 3 channels, m = 3, latent 64 this gives the reference's 83,142 (G) / 87,892 (E) /
  666,437 (D) parameters (tested).

Training (``training_step``; every call takes a fresh batch and is ONE optimiser step):
a step counter buffer ``step`` counts calls; calls 1..5 of every 6 are ``d_step`` (D only), the 6th
is ``eg_step`` (E and G only). z ~ N(0, I).
- L_D = mean D(G(z), z) - mean D(x, E(x)) + 10 GP, GP = mean (||grad_(x^, z^) D(x^, z^)|| - 1)^2
  (two-sided) at the reference's crossed pairs x^ = e x + (1-e) G(z), z^ = e z + (1-e) E(x), one
  e ~ U(0, 1) per sample (``gp_pairs="crossed"``); ``gp_pairs="joint"`` interpolates the textbook
  pairs (x, E(x)) <-> (G(z), z): z^ = e E(x) + (1-e) z (see ``interpolate_pairs``).
- L_EG = mean D(x, E(x)) - mean D(G(z), z); L_C = |x - G(E(x))|_1 + |z - E(G(z))|_1 (per-sample
  sums, batch mean); L*_EG = (1 - alpha) L_EG + alpha L_C (alpha 1e-4 objects, 1e-5 textures;
  alpha = 0 is EGBAD). Adam lr 1e-4, betas (0, 0.1) for E/G and (0, 0.9) for D; batch 32.
- EMA (decay 0.999) of E and G, updated after every 10th step, the t-th update with decay
  min(0.999, (1 + t) / (10 + t)) (TF's ExponentialMovingAverage with num_updates; ``ema_warmup``).
  The EMA copies ``encoder_ema`` and ``generator_ema`` are submodules whose weights are BUFFERS (so
  they are checkpointed in the state_dict, are not trainable and belong to no optimiser). ``forward``
  (scoring, export) and ``validation_loss`` use the EMA weights of E and G and the raw D (whose first conv is f_D).

Modes:
- ``object``: the whole image (32, 64 or 128 px; the paper's 128) is one patch; optional random
  rotation of +-45 degrees (``rotate``), done on the device with affine_grid/grid_sample.
- ``texture``: images resized to ``image_size`` (a multiple of 64 from 128; the paper's 512); training on one
  random 64x64 crop per image, rotated by a uniform random angle in [0, 360) degrees and placed so that
  the rotated square lies inside the image (the reference rotates, crops away the empty corners and
  takes a random crop; its angle 2*pi*U(0, 45) rad is effectively uniform); scoring on the
  (image_size / 64)^2 non-overlapping 64x64 patches (64 at 512 px) inside the graph.

Score (per 64x64 patch for textures, per image for objects; lambda 0.1; x, G(E(x)) in [-1, 1]):
A = 0.9 |x - G(E(x))|_1 + 0.1 |f_D(x) - f_D(G(E(x)))|_1 (L1 SUMS over the patch), f_D = the first
3x3 conv of D's image path before its activation (an m-channel full-resolution map that ignores z);
image score = max over patches. Map: mean over channels of |x - G(E(x))| in [0, 1] pixel units
(half the [-1, 1] difference), assembled back to the full image.

Choices the paper and reference leave open ("paper: ...; ours: ..."):
- paper: 128 px objects only; ours: object mode also takes 32 and 64 px (for one-class MNIST and
  quick tests): E keeps its 6 blocks and 5 poolings (a 32 px input ends at 1x1), G keeps its 6
  blocks and lets only the last log2(size / 2) of them upsample (the reference's own device for
  64 px texture patches, where G's first block does not upsample), so widths stay those of the paper.
- paper/reference: G always outputs 3 channels; ours: G outputs ``channels`` (1 for grey images).
- paper: weight init he_normal (Keras: truncated normal, std sqrt(2 / fan_in)); ours: the same with
  torch.nn.init.trunc_normal_ (cut at 2 std, rescaled so the std is sqrt(2 / fan_in)), biases 0.
- reference: training step 1 trains D and E/G together (a tf.function compilation artefact);
  ours: step 1 trains D only (the 5:1 schedule from the first step).
- reference: EMA shadow variables start at the weights of the first EMA update (TF's
  ExponentialMovingAverage); ours: the same (the 10th step copies, later updates blend). The
  reference's ``v = ema.average(v)`` only rebinds a local name, so its checkpoints and scores use
  the RAW weights; ours follows MODELS.md and scores with the EMA weights (``ema_decay=0`` scores
  with the raw E and G instead).
- reference: constant decay 0.999 (harmless there: it never scores with the EMA, and 200k-1.2M
  batches are 20k-120k updates); ours: TF's num_updates warm-up, min(0.999, (1 + t) / (10 + t)) for
  the t-th update, 0.999 from t = 8991 (about 90k steps). Found after the GPU benchmarks: with the
  constant decay, a run of our budget (a few thousand steps, a few hundred updates) scored with a
  shadow that was still 75-90 % the weights of step 10 (0.999^(t-1)), i.e. a nearly untrained E and G
  (one-class MNIST digit 1, 1,200 steps: AUROC 0.09 with that EMA, 0.65 with the raw weights; 0.55
  with the warm-up EMA). ``ema_warmup=False`` restores the constant decay.
- reference: object rotation (off unless asked, as ours) with Keras' RandomRotation, filling the
  corners with its default ``reflect`` in earlier versions of mvtec_ad.py and ``nearest`` (edge pixels
  repeated) in the latest; ours: grid_sample with ``padding_mode="reflection"`` (the earlier one).
- reference: textures pre-compute a cache of 50,000 augmented crops; ours: one fresh crop per image
  per step, drawn on the device from torch's default generator (exact resume).
- paper: GP gradient norm sqrt(sum g^2); ours: sqrt(sum g^2 + 1e-12) so that a zero gradient
  cannot give an infinite second derivative.
- paper: 1.2M batches, checkpoint picked by test AUC; ours: ``epochs`` = 5000 by default (at batch
  32 with the held-out 10 % and the short last batch dropped: about 25k steps on an MVTec category of
  200 training images, 55k on one of 400, i.e. 2-5 % of the paper's budget),
  best checkpoint by ``validation_loss`` on held-out NORMAL images = the image term of L_C,
  |x - G(E(x))|_1 per patch (sum, [-1, 1] units), mean over patches, with the scoring (EMA)
  weights. The adversarial losses are not stationary (they measure a moving critic); the
  reconstruction error of normal images is, and it is what the score is made of.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field, model_validator
from torch import nn

from trainer.errors import UserError
from trainer.models.base import Detector, ModelConfig
from trainer.models.blocks import to_signed

PATCH = 64  # texture patch size (px)
TEXTURE_MIN_SIZE = 2 * PATCH  # a 64 px square rotated by 45 degrees spans 90.5 px: it fits from 128 up
OBJECT_SIZES = (32, 64, 128)
G_START = 2  # G's first feature map is 2x2
N_BLOCKS = 6
WIDTHS_E = (1, 2, 3, 4, 8, 16)  # d_block widths in units of base_channels
WIDTHS_G = (16, 8, 4, 3, 2, 1)  # g_block widths
DEFAULT_ALPHA = {"object": 1e-4, "texture": 1e-5}
DEFAULT_SIZE = {"object": 128, "texture": 512}


class CBiGANConfig(ModelConfig):
    """CBiGAN settings with the paper's defaults as MODELS.md gives them (the reference code's own
    command-line defaults differ: gp 2.5, one critic step per E/G step, 200k batches); see the module
    docstring."""

    mode: Literal["object", "texture"] = Field(
        default="object",
        description="object: whole image, 32/64/128 px; texture: 64x64 patches of a multiple-of-64 image",
    )
    image_size: int = Field(default=128, description="input height = width, pixels (default 128 objects, 512 textures)")
    channels: Literal[1, 3] = Field(default=3, description="1 grey, 3 colour (RGB)")
    lr: float = Field(default=1e-4, gt=0, description="Adam learning rate of both optimisers")
    batch_size: int = Field(default=32, ge=1)
    epochs: int = Field(default=5000, ge=1, description="our budget; the reference trains 1.2M batches")
    base_channels: int = Field(default=3, ge=1, description="width multiplier m: blocks m, 2m, 3m, 4m, 8m, 16m")
    latent: int = Field(default=64, ge=1, description="dimension of z ~ N(0, I)")
    d_z_width: int = Field(default=512, ge=1, description="width of D's three Dense layers on z")
    alpha: float = Field(
        default=1e-4, ge=0, le=1, description="consistency weight (1e-4 objects, 1e-5 textures; 0 = EGBAD)"
    )
    gp_weight: float = Field(default=10.0, ge=0, description="WGAN-GP weight")
    gp_pairs: Literal["crossed", "joint"] = Field(
        default="crossed", description="crossed: the reference's x^=(x,G(z)), z^=(z,E(x)); joint: (x,E(x))<->(G(z),z)"
    )
    d_iters: int = Field(default=5, ge=1, description="D-only steps per E/G step")
    betas_eg: tuple[float, float] = Field(default=(0.0, 0.1), description="Adam betas of E and G")
    betas_d: tuple[float, float] = Field(default=(0.0, 0.9), description="Adam betas of D")
    ema_decay: float = Field(
        default=0.999, ge=0, lt=1, description="EMA decay of E and G (0: score with the raw weights)"
    )
    ema_every: int = Field(default=10, ge=1, description="EMA update period, steps")
    ema_warmup: bool = Field(
        default=True,
        description="EMA decay of the t-th update min(ema_decay, (1 + t) / (10 + t)) (TF's num_updates); "
        "False: ema_decay from the second update on",
    )
    lambda_score: float = Field(default=0.1, ge=0, le=1, description="weight of the f_D term in the anomaly score")
    rotate: bool = Field(default=False, description="object mode: random rotation of +-45 degrees while training")

    @model_validator(mode="before")
    @classmethod
    def _mode_defaults(cls, data: Any) -> Any:
        """image_size and alpha default by mode (128 / 1e-4 objects, 512 / 1e-5 textures)."""
        if isinstance(data, dict):
            mode = data.get("mode", "object")
            data = dict(data)
            if mode in DEFAULT_SIZE:
                data.setdefault("image_size", DEFAULT_SIZE[mode])
                data.setdefault("alpha", DEFAULT_ALPHA[mode])
        return data


def he_init(module: nn.Module) -> None:
    """Keras he_normal: truncated normal (2 std) with std sqrt(2 / fan_in); biases 0."""
    if isinstance(module, nn.Conv2d | nn.Linear):
        fan_in = module.weight[0].numel()
        std = math.sqrt(2.0 / fan_in) / 0.87962566103423978
        nn.init.trunc_normal_(module.weight, 0.0, std, -2 * std, 2 * std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


class ResBlock(nn.Module):
    """d_block / g_block: [upsample x2] -> skip conv1x1 + (conv3x3-LReLU-conv3x3-LReLU-conv1x1) -> LReLU -> [pool]."""

    def __init__(self, cin: int, n: int, *, upsample: bool = False, pool: bool = False) -> None:
        super().__init__()
        self.upsample, self.pool = upsample, pool
        self.skip = nn.Conv2d(cin, n, 1, bias=False)
        self.conv1 = nn.Conv2d(cin, n, 3, padding=1, bias=False)
        self.conv2 = nn.Conv2d(n, n, 3, padding=1, bias=False)
        self.conv3 = nn.Conv2d(n, n, 1, bias=True)
        self.act = nn.LeakyReLU(0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.upsample:
            x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)
        h = self.conv3(self.act(self.conv2(self.act(self.conv1(x)))))
        h = self.act(h + self.skip(x))
        return F.avg_pool2d(h, 2) if self.pool else h


def conv_trunk(channels: int, m: int) -> nn.Sequential:
    """E's (and D's image path's) six d_blocks, pooling after all but the last (size -> size / 32)."""
    widths = [w * m for w in WIDTHS_E]
    cins = [channels, *widths[:-1]]
    return nn.Sequential(
        *(ResBlock(c, n, pool=i < N_BLOCKS - 1) for i, (c, n) in enumerate(zip(cins, widths, strict=True)))
    )


class Encoder(nn.Module):
    """E: image patch in [-1, 1] [B, C, P, P] -> z [B, latent]."""

    def __init__(self, channels: int, m: int, latent: int, patch: int) -> None:
        super().__init__()
        self.trunk = conv_trunk(channels, m)
        flat = 16 * m * (patch // 32) ** 2
        self.fc = nn.Sequential(nn.Linear(flat, 16 * m, bias=False), nn.LeakyReLU(0.2), nn.Linear(16 * m, latent))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.trunk(x).flatten(1))


class Generator(nn.Module):
    """G: z [B, latent] -> patch in [-1, 1] [B, C, P, P]; the last log2(P / 2) g_blocks upsample."""

    def __init__(self, channels: int, m: int, latent: int, patch: int) -> None:
        super().__init__()
        self.m = m
        n_up = int(math.log2(patch // G_START))
        self.fc = nn.Linear(latent, G_START * G_START * 16 * m, bias=False)
        widths = [w * m for w in WIDTHS_G]
        cins = [16 * m, *widths[:-1]]
        self.blocks = nn.Sequential(
            *(ResBlock(c, n, upsample=i >= N_BLOCKS - n_up) for i, (c, n) in enumerate(zip(cins, widths, strict=True)))
        )
        self.out = nn.Conv2d(m, channels, 1, bias=True)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.fc(z).reshape(-1, 16 * self.m, G_START, G_START)
        return torch.tanh(self.out(self.blocks(h)))


class Discriminator(nn.Module):
    """D(x, z) -> critic value [B] (linear); ``features`` = f_D, the first 3x3 conv of the image path."""

    def __init__(self, channels: int, m: int, latent: int, patch: int, z_width: int) -> None:
        super().__init__()
        self.trunk = conv_trunk(channels, m)
        self.z_path = nn.Sequential(
            nn.Linear(latent, z_width, bias=False),
            nn.LeakyReLU(0.2),
            nn.Linear(z_width, z_width, bias=False),
            nn.LeakyReLU(0.2),
            nn.Linear(z_width, z_width, bias=False),
            nn.LeakyReLU(0.2),
        )
        flat = 16 * m * (patch // 32) ** 2
        self.head = nn.Sequential(
            nn.Linear(flat + z_width, 16 * m, bias=False), nn.LeakyReLU(0.2), nn.Linear(16 * m, 1)
        )

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.trunk(x).flatten(1), self.z_path(z)], dim=1)
        return self.head(h).flatten()

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """f_D: the first 3x3 conv of the image path before its activation (ignores z)."""
        first: ResBlock = self.trunk[0]  # type: ignore[assignment]
        return first.conv1(x)


def _as_buffers(module: nn.Module) -> nn.Module:
    """Turn every parameter of ``module`` into a buffer of the same name (frozen, checkpointed, no optimiser)."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is None:
                continue
            del sub._parameters[name]
            sub.register_buffer(name, p.detach().clone())
    return module


def interpolate_pairs(
    x: torch.Tensor, gz: torch.Tensor, z: torch.Tensor, ex: torch.Tensor, eps: torch.Tensor, pairs: str = "crossed"
) -> tuple[torch.Tensor, torch.Tensor]:
    """GP interpolates, one ``eps`` [B] per sample.

    crossed (reference): x^ = e x + (1-e) G(z), z^ = e z + (1-e) E(x);
    joint (textbook, between the pairs (x, E(x)) and (G(z), z)): x^ = e x + (1-e) G(z), z^ = e E(x) + (1-e) z.
    """
    ex_ = eps.view(-1, 1, 1, 1)
    ez = eps.view(-1, 1)
    x_hat = ex_ * x + (1 - ex_) * gz
    z_hat = ez * z + (1 - ez) * ex if pairs == "crossed" else ez * ex + (1 - ez) * z
    return x_hat, z_hat


def gradient_penalty(
    disc: Discriminator, x_hat: torch.Tensor, z_hat: torch.Tensor, *, create_graph: bool = True
) -> torch.Tensor:
    """Two-sided WGAN-GP: mean over the batch of (||grad_(x^, z^) D(x^, z^)||_2 - 1)^2."""
    x_hat = x_hat.detach().requires_grad_(True)
    z_hat = z_hat.detach().requires_grad_(True)
    with torch.enable_grad():
        out = disc(x_hat, z_hat)
        gx, gz = torch.autograd.grad(out.sum(), [x_hat, z_hat], create_graph=create_graph)
    sq = gx.flatten(1).pow(2).sum(1) + gz.flatten(1).pow(2).sum(1)
    return ((torch.sqrt(sq + 1e-12) - 1.0) ** 2).mean()


class CBiGAN(Detector):
    """CBiGAN; see the module docstring."""

    name = "cbigan"
    Config = CBiGANConfig
    revision = 2  # 2: the EMA warms up (scored weights were ~76 % the step-10 copy at our budget)
    config: CBiGANConfig
    step: torch.Tensor

    def __init__(self, config: CBiGANConfig) -> None:
        super().__init__(config)
        c = config
        self.patch = PATCH if c.mode == "texture" else c.image_size
        self.grid = c.image_size // self.patch  # patches per side
        m = c.base_channels
        self.encoder = Encoder(c.channels, m, c.latent, self.patch)
        self.generator = Generator(c.channels, m, c.latent, self.patch)
        self.discriminator = Discriminator(c.channels, m, c.latent, self.patch, c.d_z_width)
        self.apply(he_init)
        self.encoder_ema = _as_buffers(copy.deepcopy(self.encoder))
        self.generator_ema = _as_buffers(copy.deepcopy(self.generator))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))

    @classmethod
    def check_config(cls, config: ModelConfig) -> None:
        c = config
        mode = getattr(c, "mode", "object")
        s = c.image_size
        ok = s in OBJECT_SIZES if mode == "object" else s >= TEXTURE_MIN_SIZE and s % PATCH == 0
        if not ok:
            raise UserError(
                f"model {cls.name!r} cannot take image size {s} in {mode} mode: object mode takes "
                f"{', '.join(map(str, OBJECT_SIZES))} (the paper's 128), texture mode a multiple of {PATCH} "
                f"from {TEXTURE_MIN_SIZE} (64x64 patches, each training crop rotated inside the image; the paper's 512)"
            )

    # ---- scoring -------------------------------------------------------------------------------

    def _scorers(self) -> tuple[nn.Module, nn.Module]:
        if self.config.ema_decay > 0:
            return self.encoder_ema, self.generator_ema
        return self.encoder, self.generator

    def to_patches(self, xs: torch.Tensor) -> torch.Tensor:
        """[B, C, S, S] -> [B * n * n, C, P, P], row-major patches of each image (n = S / P)."""
        n, p, ch = self.grid, self.patch, self.config.channels
        return xs.reshape(-1, ch, n, p, n, p).permute(0, 2, 4, 1, 3, 5).reshape(-1, ch, p, p)

    def from_patches(self, maps: torch.Tensor) -> torch.Tensor:
        """[B * n * n, 1, P, P] -> [B, 1, S, S] (inverse of ``to_patches``)."""
        n, p = self.grid, self.patch
        return maps.reshape(-1, n, n, 1, p, p).permute(0, 3, 1, 4, 2, 5).reshape(-1, 1, n * p, n * p)

    def patch_scores(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x in [0, 1] -> (A per patch [B, n*n], per-pixel map [B*n*n, 1, P, P] in [0, 1] units)."""
        enc, gen = self._scorers()
        xp = self.to_patches(to_signed(x))
        rec = gen(enc(xp))
        err = (xp - rec).abs().float()
        pix = err.flatten(1).sum(1)
        feat = (self.discriminator.features(xp) - self.discriminator.features(rec)).abs().float().flatten(1).sum(1)
        lam = self.config.lambda_score
        a = (1.0 - lam) * pix + lam * feat
        return a.reshape(-1, self.grid * self.grid), err.mean(dim=1, keepdim=True) * 0.5

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, err = self.patch_scores(x)
        return a.amax(dim=1), self.from_patches(err)

    @torch.no_grad()
    def validation_loss(self, x: torch.Tensor) -> torch.Tensor:
        enc, gen = self._scorers()
        xp = self.to_patches(to_signed(x))
        pix = (xp - gen(enc(xp))).abs().float().flatten(1).sum(1)
        return pix.reshape(-1, self.grid * self.grid).mean(dim=1)

    # ---- training ------------------------------------------------------------------------------

    def eg_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.generator.parameters()]

    def make_optimizers(self, lr: float) -> dict[str, torch.optim.Optimizer]:
        c = self.config
        return {
            "eg": torch.optim.Adam(self.eg_parameters(), lr=lr, betas=c.betas_eg),
            "d": torch.optim.Adam(self.discriminator.parameters(), lr=lr, betas=c.betas_d),
        }

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """Training input: x [B, C, S, S] in [0, 1] -> [B, C, P, P] in [-1, 1] (crops/rotations on x's device)."""
        c = self.config
        b = x.shape[0]
        if c.mode == "texture":
            s, p = c.image_size, PATCH
            angle = torch.rand(b, device=x.device) * (2 * math.pi)
            cos, sin = torch.cos(angle), torch.sin(angle)
            # Half extent of the rotated square; its centre is drawn so that it lies inside the image.
            r = 0.5 * p * (cos.abs() + sin.abs())
            centre = r.unsqueeze(1) + torch.rand(b, 2, device=x.device) * (s - 2 * r).unsqueeze(1)
            k = p / s
            theta = torch.stack(
                [
                    torch.stack([k * cos, -k * sin, 2 * centre[:, 0] / s - 1], dim=1),
                    torch.stack([k * sin, k * cos, 2 * centre[:, 1] / s - 1], dim=1),
                ],
                dim=1,
            )
            grid = F.affine_grid(theta, [b, c.channels, p, p], align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        elif c.rotate:
            angle = (torch.rand(b, device=x.device) * 2 - 1) * (math.pi / 4)
            cos, sin = torch.cos(angle), torch.sin(angle)
            zero = torch.zeros_like(cos)
            theta = torch.stack([torch.stack([cos, -sin, zero], 1), torch.stack([sin, cos, zero], 1)], dim=1)
            grid = F.affine_grid(theta, list(x.shape), align_corners=False)
            x = F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)
        return to_signed(x)

    def _consistency(self, xs: torch.Tensor, rec: torch.Tensor, z: torch.Tensor, zrec: torch.Tensor) -> torch.Tensor:
        """L_C = |x - G(E(x))|_1 + |z - E(G(z))|_1, per-sample sums, batch mean."""
        return (xs - rec).abs().flatten(1).sum(1).mean() + (z - zrec).abs().sum(1).mean()

    def _gp(self, xs: torch.Tensor, gz: torch.Tensor, z: torch.Tensor, ex: torch.Tensor, create: bool) -> torch.Tensor:
        eps = torch.rand(xs.shape[0], device=xs.device)
        x_hat, z_hat = interpolate_pairs(xs, gz.detach(), z, ex.detach(), eps, self.config.gp_pairs)
        return gradient_penalty(self.discriminator, x_hat, z_hat, create_graph=create)

    def d_step(self, xs: torch.Tensor, opt: torch.optim.Optimizer) -> dict[str, float]:
        """One D update (E and G fixed) on a training batch ``xs`` in [-1, 1]; returns all losses."""
        c = self.config
        z = torch.randn(xs.shape[0], c.latent, device=xs.device)
        with torch.no_grad():
            ex, gz = self.encoder(xs), self.generator(z)
        opt.zero_grad(set_to_none=True)
        real, fake = self.discriminator(xs, ex), self.discriminator(gz, z)
        gp = self._gp(xs, gz, z, ex, create=True)
        wgan = fake.mean() - real.mean()
        loss_d = wgan + c.gp_weight * gp
        loss_d.backward()
        opt.step()
        with torch.no_grad():
            l_c = self._consistency(xs, self.generator(ex), z, self.encoder(gz))
            loss_eg = (1 - c.alpha) * -wgan + c.alpha * l_c
        return self._report(loss_d, gp, loss_eg, l_c)

    def eg_step(self, xs: torch.Tensor, opt: torch.optim.Optimizer) -> dict[str, float]:
        """One E/G update (D fixed) on a training batch ``xs`` in [-1, 1]: L*_EG; returns all losses."""
        c = self.config
        z = torch.randn(xs.shape[0], c.latent, device=xs.device)
        opt.zero_grad(set_to_none=True)
        self.discriminator.requires_grad_(False)
        try:
            ex, gz = self.encoder(xs), self.generator(z)
            real, fake = self.discriminator(xs, ex), self.discriminator(gz, z)
            l_eg = real.mean() - fake.mean()
            l_c = self._consistency(xs, self.generator(ex), z, self.encoder(gz))
            loss_eg = (1 - c.alpha) * l_eg + c.alpha * l_c
            loss_eg.backward()
            opt.step()
            gp = self._gp(xs, gz, z, ex, create=False).detach()  # for the log only
        finally:
            self.discriminator.requires_grad_(True)
        loss_d = -l_eg.detach() + c.gp_weight * gp
        return self._report(loss_d, gp, loss_eg, l_c)

    @staticmethod
    def _report(loss_d: torch.Tensor, gp: torch.Tensor, loss_eg: torch.Tensor, l_c: torch.Tensor) -> dict[str, float]:
        return {
            "d": float(loss_d.detach()),
            "gp": float(gp.detach()),
            "eg": float(loss_eg.detach()),
            "cons": float(l_c.detach()),
        }

    def ema_decay_at(self, t: int) -> float:
        """Decay of the t-th EMA update (t from 1; the first copies): ema_decay, or with ``ema_warmup``
        min(ema_decay, (1 + t) / (10 + t)), TF's ExponentialMovingAverage with num_updates = t."""
        c = self.config
        if t <= 1:
            return 0.0
        return min(c.ema_decay, (1.0 + t) / (10.0 + t)) if c.ema_warmup else c.ema_decay

    @torch.no_grad()
    def update_ema(self) -> None:
        """EMA of E and G: the first update copies (TF's shadow initialisation), later ones blend with
        ``ema_decay_at(t)``."""
        c = self.config
        decay = self.ema_decay_at(int(self.step) // c.ema_every)
        for raw, ema in ((self.encoder, self.encoder_ema), (self.generator, self.generator_ema)):
            shadow = dict(ema.named_buffers())
            for name, p in raw.named_parameters():
                if decay == 0.0:
                    shadow[name].copy_(p)
                else:
                    shadow[name].mul_(decay).add_(p, alpha=1.0 - decay)

    def training_step(self, x: torch.Tensor, optimizers: dict[str, torch.optim.Optimizer]) -> dict[str, float]:
        c = self.config
        self.step += 1
        step = int(self.step)
        xs = self.augment(x)
        eg_turn = step % (c.d_iters + 1) == 0
        losses = self.eg_step(xs, optimizers["eg"]) if eg_turn else self.d_step(xs, optimizers["d"])
        if c.ema_decay > 0 and step % c.ema_every == 0:
            self.update_ema()
        return losses


__all__ = ["CBiGAN", "CBiGANConfig", "gradient_penalty", "interpolate_pairs"]
