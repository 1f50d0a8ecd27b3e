"""The model registry: the one place where detectors are registered by name.

Every entry implements ``trainer.models.base.Detector``. To add a model, write its module
(config + nets + training step) and add one line here.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from trainer.errors import UserError
from trainer.models.ae import AutoEncoder
from trainer.models.alcn import ALCN
from trainer.models.base import Detector, ModelConfig
from trainer.models.cbigan import CBiGAN
from trainer.models.ede import EDE
from trainer.models.ganomaly import GANomaly
from trainer.models.oclr import OCLR

REGISTRY: dict[str, type[Detector]] = {
    # baselines
    AutoEncoder.name: AutoEncoder,
    GANomaly.name: GANomaly,
    # the four published detectors (MODELS.md)
    EDE.name: EDE,
    OCLR.name: OCLR,
    CBiGAN.name: CBiGAN,
    ALCN.name: ALCN,
}


def model_class(name: str) -> type[Detector]:
    """The registered class for ``name``; UserError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UserError(f"unknown model {name!r}; known models: {', '.join(sorted(REGISTRY))}") from None


def build_config(name: str, **overrides: Any) -> ModelConfig:
    """The model's config with the paper's defaults and ``overrides`` (None values ignored), validated."""
    cls = model_class(name)
    values = {k: v for k, v in overrides.items() if v is not None}
    try:
        config = cls.Config(**values)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        raise UserError(f"invalid settings for model {name!r}: {problems}") from None
    cls.check_config(config)
    return config


def build_model(name: str, config: ModelConfig) -> Detector:
    """A fresh model of ``name`` built from ``config`` (already validated by ``build_config``)."""
    return model_class(name)(config)


__all__ = ["REGISTRY", "Detector", "ModelConfig", "build_config", "build_model", "model_class"]
