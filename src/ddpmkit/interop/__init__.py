"""Hugging Face diffusers interoperability: import and export, with no diffusers import
(``unet.diffusers_twin``, which builds diffusers' network for comparisons, is the exception).

- :mod:`.unet`: ``UNet2DModel`` config <-> :class:`~ddpmkit.config.ModelConfig`, weight names.
- :mod:`.scheduler`: ``DDPMScheduler`` config <-> diffusion settings (betas, prediction,
  variance, x0 clipping).
- :mod:`.folder`: finding the parts of a diffusers folder; writing a ``DDPMPipeline`` folder.

``ddpmkit.load`` reads diffusers folders through here; ``ddpmkit export`` writes them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import DataConfig, ModelConfig, RunConfig, SampleConfig
from ..diffusion import GaussianDiffusion
from ..errors import ConfigError
from .folder import (
    DiffusersFolder,
    check_export_target,
    find_diffusers,
    hub_id_error,
    is_diffusers_folder,
    looks_like_hub_id,
    write_pipeline,
)
from .scheduler import DDPM_PAPER_SCHEDULER, scheduler_config_from, settings_from_scheduler
from .unet import (
    from_diffusers_state_dict,
    model_config_from_unet2d,
    to_diffusers_state_dict,
    unet2d_config_from_model,
)

__all__ = [
    "DiffusersFolder", "find_diffusers", "is_diffusers_folder", "looks_like_hub_id",
    "hub_id_error", "check_export_target", "run_config_from_diffusers", "export_pipeline",
    "model_config_from_unet2d", "unet2d_config_from_model", "settings_from_scheduler",
    "scheduler_config_from", "to_diffusers_state_dict", "from_diffusers_state_dict",
    "DDPM_PAPER_SCHEDULER",
]


def run_config_from_diffusers(folder: DiffusersFolder) -> RunConfig:
    """The RunConfig a diffusers folder describes (no scheduler: the DDPM paper's).

    ``data.name`` is empty (a diffusers folder names no data set); ``data.image_size`` is the
    network's, so data passed later is resized to fit.
    """
    model = model_config_from_unet2d(folder.unet_config)
    settings = settings_from_scheduler(folder.scheduler_config or DDPM_PAPER_SCHEDULER)
    learned = settings.diffusion.variance == "learned_range"
    if model.out_channels != model.in_channels * (2 if learned else 1):
        raise ConfigError(f"UNet2DModel out_channels={model.out_channels} does not fit "
                          f"variance_type {settings.diffusion.variance!r} with "
                          f"in_channels={model.in_channels} (learned_range needs twice as many)")
    channels = model.in_channels if model.in_channels in (1, 3) else 0
    return RunConfig(data=DataConfig(name="", image_size=model.image_size, channels=channels),
                     model=model, diffusion=settings.diffusion,
                     sample=SampleConfig(clip_denoised=settings.clip_sample))


def export_pipeline(out: str | Path, model_config: ModelConfig, state: dict[str, torch.Tensor],
                    diffusion: GaussianDiffusion, clip_sample: bool) -> Path:
    """Write our U-Net's weights ``state`` and ``diffusion`` as a DDPMPipeline folder.

    What diffusers cannot express (the 2-D MLP, a respaced diffusion, per-level head
    counts) is a ConfigError raised before anything is written.
    """
    unet = unet2d_config_from_model(model_config)
    T = diffusion.num_timesteps
    if not torch.equal(diffusion.timestep_map, torch.arange(T)):
        raise ConfigError("a respaced diffusion (its steps map onto other network steps) has "
                          "no DDPMScheduler equivalent; export the full one")
    scheduler = scheduler_config_from(diffusion.betas, diffusion.prediction,
                                      diffusion.variance, clip_sample)
    return write_pipeline(out, unet, to_diffusers_state_dict(state), scheduler)
