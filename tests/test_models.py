"""The detector interface and registry: shapes, dtypes, parameter groups, bad settings.

(Training quality on real data is tested in test_train.py.)
"""

from __future__ import annotations

import pytest
import torch

from trainer.errors import UserError
from trainer.models import REGISTRY, build_config, build_model

# Small widths per model for quick generic checks (each model's own tests train it properly).
TINY: dict[str, dict[str, object]] = {
    "ae": {"base_channels": 8, "latent": 16},
    "ganomaly": {"base_channels": 8, "latent": 16},
    "ede": {"base_channels": 8, "latent": 16},
    "oclr": {"base_channels": 8, "latent": 16},
    "cbigan": {"base_channels": 2, "latent": 16, "d_z_width": 32},
    "alcn": {"base_channels": 4, "latent": 16},
}
# Sizes (a small and a larger one) and channel counts each model takes.
SHAPES: dict[str, list[tuple[int, int]]] = {"alcn": [(28, 1), (64, 3)]}
DEFAULT_SHAPES = [(32, 1), (64, 3)]
# Image sizes each model must refuse with a clear error.
BAD_SIZES: dict[str, list[int]] = {"alcn": [0, 8, 2048]}
DEFAULT_BAD_SIZES = [0, 8, 48, 100, 2048]
# EDE's two optimisers share the encoders E1 and E2 by design (MODELS.md: {E1, D1, E2} and {E1, D2, E2}).
SHARED_ENCODERS = {"ede": ("encoder1.", "encoder2.")}
# Parameters that cannot receive a gradient by construction: a WGAN critic's output bias cancels out of
# mean D(real) - mean D(fake), and the gradient penalty does not depend on it.
NEVER_UPDATED = {"cbigan": {"discriminator.head.2.bias"}}


def _cases() -> list[tuple[str, int, int]]:
    return [(name, size, ch) for name in sorted(REGISTRY) for size, ch in SHAPES.get(name, DEFAULT_SHAPES)]


@pytest.mark.parametrize(("name", "size", "channels"), _cases())
def test_forward_contract(name: str, size: int, channels: int) -> None:
    torch.manual_seed(0)
    model = build_model(name, build_config(name, image_size=size, channels=channels, **TINY.get(name, {})))
    model.eval()
    x = torch.rand(3, channels, size, size)
    with torch.no_grad():
        score, amap = model(x)
    assert score.shape == (3,) and score.dtype == torch.float32
    assert amap.shape == (3, 1, size, size) and amap.dtype == torch.float32
    assert torch.isfinite(score).all() and torch.isfinite(amap).all()
    assert (amap >= 0).all()
    # Scoring is per image: a batch gives the same scores as images one at a time (eval-mode BatchNorm).
    with torch.no_grad():
        single = torch.cat([model(x[i : i + 1])[0] for i in range(3)])
    torch.testing.assert_close(single, score, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_training_steps_update_every_parameter_group(name: str) -> None:
    torch.manual_seed(0)
    size, channels = SHAPES.get(name, DEFAULT_SHAPES)[0]
    cfg = build_config(name, image_size=size, channels=channels, **TINY.get(name, {}))
    model = build_model(name, cfg)
    opts = model.make_optimizers(cfg.lr)
    groups = [{id(p) for g in o.param_groups for p in g["params"]} for o in opts.values()]
    # Every trainable parameter is in an optimiser, and in exactly one unless the model shares it by design.
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert {id(p) for p in trainable.values()} == set().union(*groups)
    shared = {n for n, p in trainable.items() if sum(id(p) in g for g in groups) > 1}
    assert all(n.startswith(SHARED_ENCODERS.get(name, ("-",))) for n in shared), sorted(shared)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    x = torch.rand(8, channels, size, size)
    model.before_training(lambda: iter([x]))
    model.train()
    model.on_epoch_start(2)
    # Six steps: models with a schedule (CBiGAN trains its critic 5 steps of 6) reach every group.
    for _ in range(6):
        losses = model.training_step(x, opts)
        assert all(isinstance(v, float) and v == v for v in losses.values())
    changed = {n for n, p in model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    expected = set(before) - NEVER_UPDATED.get(name, set())
    assert changed == expected, f"parameters not updated: {sorted(expected - changed)}"


def test_ganomaly_optimisers_separate_generator_and_discriminator() -> None:
    cfg = build_config("ganomaly", image_size=32, channels=1, base_channels=8, latent=16)
    model = build_model("ganomaly", cfg)
    opts = model.make_optimizers(cfg.lr)
    d_ids = {id(p) for p in model.discriminator.parameters()}
    g_ids = {id(p) for p in model.generator_params()}
    assert {id(p) for g in opts["d"].param_groups for p in g["params"]} == d_ids
    assert {id(p) for g in opts["g"].param_groups for p in g["params"]} == g_ids
    # All convolutions are bias-free (MODELS.md).
    assert all(m.bias is None for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.ConvTranspose2d))


def test_ae_ssim_loss_trains() -> None:
    torch.manual_seed(0)
    cfg = build_config("ae", image_size=32, channels=1, base_channels=8, latent=16, loss="ssim")
    model = build_model("ae", cfg)
    opts = model.make_optimizers(cfg.lr)
    x = torch.rand(8, 1, 32, 32)
    first = model.training_step(x, opts)["loss"]
    for _ in range(20):
        last = model.training_step(x, opts)["loss"]
    assert 0.0 <= last < first <= 2.0


@pytest.mark.parametrize(
    ("name", "size"), [(n, size) for n in sorted(REGISTRY) for size in BAD_SIZES.get(n, DEFAULT_BAD_SIZES)]
)
def test_image_size_the_model_cannot_take(name: str, size: int) -> None:
    with pytest.raises(UserError, match=f"cannot take image size {size}"):
        build_config(name, image_size=size)


def test_unknown_model_and_bad_settings() -> None:
    with pytest.raises(UserError, match="unknown model 'nope'; known models: " + ", ".join(sorted(REGISTRY))):
        build_config("nope")
    with pytest.raises(UserError, match="invalid settings for model 'ae'"):
        build_config("ae", loss="l3")
    with pytest.raises(UserError, match="invalid settings for model 'ae'"):
        build_config("ae", no_such_setting=1)
