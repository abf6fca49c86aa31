"""ddpmkit: denoising diffusion probabilistic models with exact bounds and fast samplers.

The public names below load on first use (PEP 562): ``import ddpmkit`` itself does not import
torch, so the ``ddpmkit`` command can print its help, check its flags and handle Ctrl-C before
the ~1-2 s that torch takes to load. ``from ddpmkit import sample`` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the submodule that defines it
_PUBLIC: dict[str, str] = {
    "GaussianDiffusion": "diffusion",
    "PMeanVariance": "diffusion",
    "make_betas": "schedules",
    "betas_from_alpha_bar": "schedules",
    "sample": "sampling",
    "space_timesteps": "sampling",
    "ddim_invert": "sampling",
    "build_unet": "nn",
    "build_model": "nn",
    "load": "loading",
    "LoadedRun": "loading",
    "normal_kl": "losses",
    "discretized_gaussian_log_likelihood": "losses",
    "DdpmkitError": "errors",
    "ConfigError": "errors",
    "DataError": "errors",
    "CheckpointError": "errors",
}

__all__ = [  # a literal list, for linters; test_safety checks that every name loads
    "GaussianDiffusion", "PMeanVariance", "make_betas", "betas_from_alpha_bar", "sample",
    "space_timesteps", "ddim_invert", "build_unet", "build_model", "load", "LoadedRun",
    "normal_kl", "discretized_gaussian_log_likelihood", "DdpmkitError", "ConfigError",
    "DataError", "CheckpointError", "__version__",
]

if TYPE_CHECKING:  # what type checkers and IDEs see
    from .diffusion import GaussianDiffusion, PMeanVariance
    from .errors import CheckpointError, ConfigError, DataError, DdpmkitError
    from .loading import LoadedRun, load
    from .losses import discretized_gaussian_log_likelihood, normal_kl
    from .nn import build_model, build_unet
    from .sampling import ddim_invert, sample, space_timesteps
    from .schedules import betas_from_alpha_bar, make_betas


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use; submodules (``ddpmkit.metrics``) too."""
    if name in _PUBLIC:
        value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    elif not name.startswith("__"):
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as e:
            if e.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
