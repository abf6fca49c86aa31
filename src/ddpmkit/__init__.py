"""ddpmkit: denoising diffusion probabilistic models with exact bounds and fast samplers."""

from .diffusion import GaussianDiffusion, PMeanVariance
from .errors import CheckpointError, ConfigError, DataError, DdpmkitError
from .load import LoadedRun, load
from .losses import discretized_gaussian_log_likelihood, normal_kl
from .nn import build_model, build_unet
from .sampling import ddim_invert, sample, space_timesteps
from .schedules import betas_from_alpha_bar, make_betas

__version__ = "0.1.0"

__all__ = [
    "GaussianDiffusion",
    "PMeanVariance",
    "make_betas",
    "sample",
    "space_timesteps",
    "ddim_invert",
    "build_unet",
    "build_model",
    "load",
    "LoadedRun",
    "betas_from_alpha_bar",
    "normal_kl",
    "discretized_gaussian_log_likelihood",
    "DdpmkitError",
    "ConfigError",
    "DataError",
    "CheckpointError",
    "__version__",
]
