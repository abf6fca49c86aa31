"""Denoising networks: the DDPM U-Net for images and a residual MLP for 2-D points.

Networks only: nothing here knows about noise schedules or sampling.
"""

from __future__ import annotations

from torch import nn

from ..config import ModelConfig
from .embeddings import TimeEmbedding, timestep_embedding
from .mlp import MLP_PRESETS, MLPDenoiser
from .unet import (
    UNET_PRESETS,
    UNet,
    apply_overrides,
    build_unet,
    count_parameters,
    resolve_preset,
)

__all__ = [
    "UNet",
    "MLPDenoiser",
    "TimeEmbedding",
    "timestep_embedding",
    "build_unet",
    "build_model",
    "UNET_PRESETS",
    "MLP_PRESETS",
    "PRESETS",
    "count_parameters",
]

# Every preset by name, both kinds (names are unique across the two).
PRESETS: dict[str, ModelConfig] = {**UNET_PRESETS, **MLP_PRESETS}


def build_model(cfg: ModelConfig | str, **overrides) -> nn.Module:
    """The network a config describes: :class:`UNet` for ``arch='unet'``, :class:`MLPDenoiser`
    for ``arch='mlp'``. ``cfg`` may also be a preset name from :data:`PRESETS`; keyword
    arguments override ``ModelConfig`` fields."""
    cfg = apply_overrides(resolve_preset(cfg, PRESETS, "model"), overrides)
    if cfg.arch == "mlp":
        return MLPDenoiser(cfg)
    return UNet(cfg)
