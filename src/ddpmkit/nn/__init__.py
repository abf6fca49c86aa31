"""Denoising networks: the DDPM U-Net for images and a residual MLP for 2-D points.

Networks only: nothing here knows about noise schedules or sampling.
"""

from __future__ import annotations

import torch
from torch import nn

from ..config import MAX_PARAMETERS, ModelConfig
from ..errors import ConfigError
from .embeddings import ClassEmbedding, TimeEmbedding, timestep_embedding
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
    "ClassEmbedding",
    "timestep_embedding",
    "build_unet",
    "build_model",
    "check_size",
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
    check_size(cfg)
    return _construct(cfg)


def _construct(cfg: ModelConfig) -> nn.Module:
    return MLPDenoiser(cfg) if cfg.arch == "mlp" else UNet(cfg)


def _parameter_bound(cfg: ModelConfig) -> int:
    """A loose upper bound on the parameter count, from the config alone: every block as wide
    as the widest level, with concatenated (doubled) inputs, two 3x3 convs, attention and the
    timestep projection."""
    width = cfg.channels * max(cfg.channel_mult)
    blocks = len(cfg.channel_mult) * (2 * cfg.num_res_blocks + 2) + 4
    return blocks * (40 * width * width + 8 * cfg.channels * width) + 10**6


def check_size(cfg: ModelConfig) -> int | None:
    """Refuse a network above :data:`ddpmkit.config.MAX_PARAMETERS` parameters, before any
    weight is allocated, so that a config file (or a checkpoint's config.json) cannot ask
    for tens of GB. Cheap: only a network whose loose bound (:func:`_parameter_bound`) is
    above the limit is built, on the meta device, to count exactly; returns that count."""
    if _parameter_bound(cfg) <= MAX_PARAMETERS:
        return None
    with torch.device("meta"):
        n = sum(p.numel() for p in _construct(cfg).parameters())
    if n > MAX_PARAMETERS:
        raise ConfigError(f"this network would have {n / 1e9:.1f}B parameters, above "
                          f"ddpmkit's limit of {MAX_PARAMETERS / 1e9:.0f}B; lower channels, "
                          "channel_mult or num_res_blocks")
    return n
