"""Building blocks shared by the detectors: the DCGAN pyramid encoder and decoder, and weight init.

DCGAN pyramid (Radford et al. 2016, as used by GANomaly and MODELS.md): 4x4 kernels, stride 2,
``base`` channels doubling at each level. The encoder goes image -> ... -> 4x4 -> (4x4 valid conv)
-> 1x1 latent map of ``latent`` channels; the decoder mirrors it. For a 32 px input that is
Conv-LReLU, [Conv-BN-LReLU] x 2, Conv; each doubling of the input adds one pyramid level.
"""

from __future__ import annotations

import torch
from torch import nn

from trainer.errors import UserError

MIN_PYRAMID_SIZE = 16
MAX_PYRAMID_SIZE = 1024


def check_pyramid_size(size: int, model: str) -> None:
    """Raise UserError unless ``size`` is a power of two in [16, 1024] (what a DCGAN pyramid can take)."""
    if size < MIN_PYRAMID_SIZE or size > MAX_PYRAMID_SIZE or size & (size - 1):
        raise UserError(
            f"model {model!r} cannot take image size {size}: it needs a power of two from "
            f"{MIN_PYRAMID_SIZE} to {MAX_PYRAMID_SIZE} (e.g. 32, 64, 128, 256)"
        )


def pyramid_levels(size: int) -> int:
    """Number of stride-2 convolutions from ``size`` down to 4x4 (3 for 32 px)."""
    return (size // 4).bit_length() - 1


def dcgan_encoder(
    size: int, channels: int, latent: int, base: int = 64, *, bias: bool = False, head: bool = True
) -> nn.Sequential:
    """DCGAN encoder: [N, channels, size, size] -> [N, latent, 1, 1] (linear output; add an activation yourself).

    ``head=False`` stops at the 4x4 feature map (for discriminators that want f_D features).
    The first conv has no BatchNorm (DCGAN); LeakyReLU slope 0.2.
    """
    layers: list[nn.Module] = [
        nn.Conv2d(channels, base, 4, 2, 1, bias=bias),
        nn.LeakyReLU(0.2, inplace=True),
    ]
    width = base
    for _ in range(pyramid_levels(size) - 1):
        layers += [
            nn.Conv2d(width, width * 2, 4, 2, 1, bias=bias),
            nn.BatchNorm2d(width * 2),
            nn.LeakyReLU(0.2, inplace=True),
        ]
        width *= 2
    if head:
        layers.append(nn.Conv2d(width, latent, 4, 1, 0, bias=bias))
    return nn.Sequential(*layers)


def encoder_width(size: int, base: int = 64) -> int:
    """Channels of the encoder's last 4x4 feature map."""
    return base * 2 ** (pyramid_levels(size) - 1)


def dcgan_decoder(
    size: int, channels: int, latent: int, base: int = 64, *, bias: bool = False, slope: float = 0.0
) -> nn.Sequential:
    """DCGAN decoder: [N, latent, 1, 1] -> [N, channels, size, size] in [-1, 1] (Tanh).

    ``slope`` 0 gives ReLU (DCGAN/GANomaly); 0.2 gives LeakyReLU (EDE's Fig. 3B).
    """

    def act() -> nn.Module:
        return nn.LeakyReLU(slope, inplace=True) if slope else nn.ReLU(inplace=True)

    width = encoder_width(size, base)
    layers: list[nn.Module] = [
        nn.ConvTranspose2d(latent, width, 4, 1, 0, bias=bias),
        nn.BatchNorm2d(width),
        act(),
    ]
    for _ in range(pyramid_levels(size) - 1):
        layers += [
            nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=bias),
            nn.BatchNorm2d(width // 2),
            act(),
        ]
        width //= 2
    layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1, bias=bias), nn.Tanh()]
    return nn.Sequential(*layers)


def dcgan_init(module: nn.Module) -> None:
    """DCGAN initialisation: conv weights N(0, 0.02), BatchNorm weights N(1, 0.02) and biases 0."""
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
        nn.init.normal_(module.weight, 0.0, 0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, 0.02)
        nn.init.zeros_(module.bias)


def to_signed(x: torch.Tensor) -> torch.Tensor:
    """[0, 1] -> [-1, 1]: the in-graph normalisation of Tanh-output models."""
    return x * 2.0 - 1.0
