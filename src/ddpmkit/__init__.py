"""ddpmkit: denoising diffusion probabilistic models with exact bounds and fast samplers.

The public names are loaded on first use (PEP 562), so ``import ddpmkit`` and the command
line's start-up do not import torch: ``ddpmkit --help`` is instant, and a Ctrl-C while torch
loads reaches the command's own handler (``interrupted``, status 130) instead of a traceback.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING

from .errors import CheckpointError, ConfigError, DataError, DdpmkitError

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ loads these
    from .diffusion import GaussianDiffusion, PMeanVariance
    from .load import LoadedRun, load
    from .losses import discretized_gaussian_log_likelihood, normal_kl
    from .nn import build_model, build_unet
    from .sampling import ddim_invert, sample, space_timesteps
    from .schedules import betas_from_alpha_bar, make_betas

__version__ = "0.1.0"

# public name -> the module that defines it
_LAZY = {
    "GaussianDiffusion": "diffusion",
    "PMeanVariance": "diffusion",
    "make_betas": "schedules",
    "betas_from_alpha_bar": "schedules",
    "sample": "sampling",
    "space_timesteps": "sampling",
    "ddim_invert": "sampling",
    "build_unet": "nn",
    "build_model": "nn",
    "load": "load",
    "LoadedRun": "load",
    "normal_kl": "losses",
    "discretized_gaussian_log_likelihood": "losses",
}

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


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:  # a submodule (ddpmkit.viz, ...), as an eager package would have it
        try:
            return importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module 'ddpmkit' has no attribute {name!r}") from None
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


class _Package(types.ModuleType):
    """``ddpmkit.load`` is the function: importing the submodule of the same name (which
    sets it as an attribute of the package) must not replace it, as with eager imports."""

    def __setattr__(self, name: str, value) -> None:
        if name in _LAZY and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
