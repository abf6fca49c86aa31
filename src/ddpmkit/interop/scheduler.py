"""diffusers ``DDPMScheduler`` config <-> ddpmkit's diffusion settings, both ways.

Import reads the training-noise fields (the betas, prediction type, variance type, x0
clipping) and computes the betas in float64 with the scheduler's own formula; the
inference-only fields (``timestep_spacing``, ``steps_offset``, ...) are accepted and left
alone, since ddpmkit's samplers choose their steps themselves. Export writes the named
schedule whose formula reproduces our betas (linear / squaredcos_cap_v2 / scaled_linear) and
``trained_betas`` otherwise. Anything else is a one-line ConfigError naming the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from ..config import DiffusionConfig
from ..errors import ConfigError
from ..schedules import cosine_betas, linear_betas

__all__ = ["DDPM_PAPER_SCHEDULER", "SchedulerSettings", "settings_from_scheduler",
           "scheduler_config_from"]

# DDPM (Ho et al. 2020): linear 1e-4 .. 0.02 over T = 1000, eps prediction, sigma_t^2 = beta_t
# (the published CIFAR-10 sampler), x0 clipped to [-1, 1]. Used when a folder has no scheduler.
DDPM_PAPER_SCHEDULER: dict[str, Any] = {
    "_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_schedule": "linear",
    "beta_start": 1e-4, "beta_end": 0.02, "variance_type": "fixed_large",
    "prediction_type": "epsilon", "clip_sample": True}

_CLASSES = ("DDPMScheduler", "DDIMScheduler")
_DEFAULTS: dict[str, Any] = {  # DDPMScheduler.__init__'s defaults (diffusers 0.42)
    "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
    "beta_schedule": "linear", "trained_betas": None, "variance_type": "fixed_small",
    "clip_sample": True, "prediction_type": "epsilon", "thresholding": False,
    "clip_sample_range": 1.0, "rescale_betas_zero_snr": False}
# Fields that only steer diffusers' own inference loop (or are long gone): accepted, unused.
_INFERENCE_ONLY = {"timestep_spacing", "steps_offset", "set_alpha_to_one", "tensor_format",
                   "dynamic_thresholding_ratio", "sample_max_value"}
# The _log forms name the same variances (stored as logs). diffusers 0.42's own step() takes
# the square root of log(beta_t) for fixed_large_log, which is NaN; GLIDE's "max_log" means
# beta_t, which is what is read here.
_VARIANCES = {"fixed_small": "fixed_small", "fixed_small_log": "fixed_small",
              "fixed_large": "fixed_large", "fixed_large_log": "fixed_large",
              "learned_range": "learned_range"}
_PREDICTIONS = {"epsilon": "eps", "sample": "x0", "v_prediction": "v"}
_SAME = 1e-12  # float64 betas from two formulas of one schedule agree to ~1e-17


@dataclass(frozen=True)
class SchedulerSettings:
    """What a scheduler config means for ddpmkit: the diffusion and x0 clipping."""

    diffusion: DiffusionConfig
    clip_sample: bool


def _bad(field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"scheduler {field}={value!r} is not supported: {why}")


def _scaled_linear(start: float, end: float, T: int) -> torch.Tensor:
    return torch.linspace(start ** 0.5, end ** 0.5, T, dtype=torch.float64) ** 2


def _betas(c: dict) -> torch.Tensor:
    """The scheduler's betas in float64 (diffusers computes the same formulas in float32)."""
    T = c["num_train_timesteps"]
    if c["trained_betas"] is not None:
        betas = torch.as_tensor(c["trained_betas"], dtype=torch.float64).flatten()
        if betas.numel() != T:
            raise _bad("trained_betas", f"<{betas.numel()} values>",
                       f"num_train_timesteps is {T}")
        return betas
    name, start, end = c["beta_schedule"], float(c["beta_start"]), float(c["beta_end"])
    if name == "linear":
        return torch.linspace(start, end, T, dtype=torch.float64)
    if name == "scaled_linear":
        return _scaled_linear(start, end, T)
    if name == "squaredcos_cap_v2":
        return cosine_betas(T)  # the same alpha_bar formula (s = 0.008, cap 0.999)
    raise _bad("beta_schedule", name, "use linear, scaled_linear, squaredcos_cap_v2 or "
               "trained_betas")


def _schedule_fields(betas: torch.Tensor) -> dict:
    """Our betas -> the DiffusionConfig fields naming them (a named schedule if one fits)."""
    T = betas.numel()
    for name, make in (("linear", linear_betas), ("cosine", cosine_betas)):
        try:
            if (make(T) - betas).abs().max() <= _SAME:
                return dict(schedule=name, timesteps=T)
        except ValueError:  # the named schedule does not exist at this T
            pass
    return dict(schedule="custom", timesteps=T, betas=tuple(betas.tolist()))


def settings_from_scheduler(config: dict) -> SchedulerSettings:
    """A DDPMScheduler config (its scheduler_config.json) -> our settings; errors name fields."""
    cls = config.get("_class_name", "DDPMScheduler")
    if cls not in _CLASSES:
        raise ConfigError(f"scheduler class {cls!r} is not supported: ddpmkit reads "
                          f"{' and '.join(_CLASSES)} configs")
    unknown = [k for k in config if not k.startswith("_") and k not in _DEFAULTS
               and k not in _INFERENCE_ONLY]
    if unknown:
        raise ConfigError(f"scheduler config field {unknown[0]!r} is unknown to ddpmkit")
    c = {**_DEFAULTS, **config}
    if cls == "DDIMScheduler":  # no variance_type: its eta = 1 variance is beta_tilde
        c["variance_type"] = "fixed_small"
    T = c["num_train_timesteps"]
    if not isinstance(T, int) or isinstance(T, bool) or T < 1:
        raise _bad("num_train_timesteps", T, "expected an integer >= 1")
    if c["variance_type"] not in _VARIANCES:
        raise _bad("variance_type", c["variance_type"],
                   f"use one of {', '.join(_VARIANCES)}")
    if c["prediction_type"] not in _PREDICTIONS:
        raise _bad("prediction_type", c["prediction_type"],
                   f"use one of {', '.join(_PREDICTIONS)}")
    if c["thresholding"]:
        raise _bad("thresholding", c["thresholding"], "dynamic thresholding is not read from "
                   "a scheduler (ddpmkit.sample(..., dynamic_threshold=p) does it)")
    if c["rescale_betas_zero_snr"]:
        raise _bad("rescale_betas_zero_snr", True, "a zero-SNR schedule has beta_T = 1")
    clip = bool(c["clip_sample"])
    if clip and float(c["clip_sample_range"]) != 1.0:
        raise _bad("clip_sample_range", c["clip_sample_range"], "ddpmkit's data lie in "
                   "[-1, 1] and x0 is clipped to that range only")
    betas = _betas(c)
    bad = ~((betas > 0) & (betas < 1))
    if bad.any():
        i = int(bad.nonzero()[0])
        raise ConfigError(f"scheduler betas[{i}]={betas[i].item()!r} must lie in (0, 1)")
    variance = _VARIANCES[c["variance_type"]]
    diffusion = DiffusionConfig(
        **_schedule_fields(betas), prediction=_PREDICTIONS[c["prediction_type"]],
        variance=variance, loss="hybrid" if variance == "learned_range" else "simple")
    return SchedulerSettings(diffusion, clip)


def _named_schedule(betas: torch.Tensor) -> dict:
    """diffusers fields for our betas: a named schedule whose formula gives them, else
    ``trained_betas``."""
    T = betas.numel()
    start, end = betas[0].item(), betas[-1].item()
    candidates = [
        ("linear", lambda: torch.linspace(start, end, T, dtype=torch.float64)),
        ("squaredcos_cap_v2", lambda: cosine_betas(T)),
        ("scaled_linear", lambda: _scaled_linear(start, end, T)),
    ]
    for name, make in candidates:
        if (make() - betas).abs().max() <= _SAME:
            return dict(beta_schedule=name, beta_start=start, beta_end=end, trained_betas=None)
    return dict(beta_schedule="linear", beta_start=start, beta_end=end,
                trained_betas=betas.tolist())


def scheduler_config_from(betas: torch.Tensor, prediction: str, variance: str,
                          clip_sample: bool) -> dict:
    """Our diffusion (float64 betas [T], prediction, variance) -> a DDPMScheduler config."""
    betas = torch.as_tensor(betas, dtype=torch.float64).flatten()
    if not math.isfinite(betas.sum().item()):
        raise ConfigError("the diffusion's betas are not finite")
    return {
        "_class_name": "DDPMScheduler", "num_train_timesteps": betas.numel(),
        **_named_schedule(betas),
        "variance_type": variance,  # our three names are diffusers' names too
        "prediction_type": {v: k for k, v in _PREDICTIONS.items()}[prediction],
        "clip_sample": bool(clip_sample), "clip_sample_range": 1.0, "thresholding": False,
        "dynamic_thresholding_ratio": 0.995, "sample_max_value": 1.0,
        # "trailing" visits the last training step whatever the number of inference steps
        # (diffusers' default "leading" never does), as ddpmkit's samplers do.
        "timestep_spacing": "trailing", "steps_offset": 0, "rescale_betas_zero_snr": False,
    }
