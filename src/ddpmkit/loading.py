"""``ddpmkit.load``: a trained model ready for inference, from a ddpmkit run or checkpoint
folder or from a diffusers folder. (The module is ``ddpmkit.loading`` so that its name never
shadows the function ``ddpmkit.load`` in the lazily loaded package.)

Sampling, evaluation and the other inference commands start here, so none of them imports
the trainer. Nothing is unpickled: ddpmkit checkpoints and diffusers ``.safetensors`` are
plain tensors; an older diffusers ``.bin`` is read with ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import dist
from .config import RunConfig
from .diffusion import GaussianDiffusion
from .errors import CheckpointError, ConfigError
from .nn import build_model
from .schedules import make_betas
from .train.checkpoint import load_checkpoint, load_state_dict_file

__all__ = ["load", "LoadedRun", "build_diffusion", "clip_denoised_for", "load_for_inference"]


@dataclass
class LoadedRun:
    """A trained network ready for sampling or evaluation.

    ``model(x_t, t)`` in eval mode on ``device``; ``diffusion`` its GaussianDiffusion;
    ``config`` the RunConfig (for a diffusers folder: the one it maps onto, with no data set);
    ``step`` the training step (None for a diffusers folder); ``source`` "ddpmkit" or
    "diffusers".
    """

    path: Path
    config: RunConfig
    model: nn.Module
    diffusion: GaussianDiffusion
    device: torch.device
    step: int | None
    source: str = "ddpmkit"

    @property
    def kind(self) -> str:
        """"image" or "points" (2-D data)."""
        return "points" if self.config.model.arch == "mlp" else "image"

    @property
    def data_shape(self) -> tuple[int, ...]:
        """One example's shape: (C, H, W) for images, (2,) for points."""
        m = self.config.model
        if self.kind == "points":
            return (m.in_channels,)
        return (m.in_channels, m.image_size, m.image_size)


def build_diffusion(cfg: RunConfig) -> GaussianDiffusion:
    """The GaussianDiffusion a run's config describes."""
    d = cfg.diffusion
    try:
        betas = (torch.tensor(d.betas, dtype=torch.float64) if d.schedule == "custom"
                 else make_betas(d.schedule, d.timesteps))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return GaussianDiffusion(betas, prediction=d.prediction, variance=d.variance, loss=d.loss,
                             hybrid_lambda=d.hybrid_lambda, min_snr_gamma=d.min_snr_gamma)


def clip_denoised_for(data_kind: str) -> bool:
    """x0 clipping to [-1, 1] is right for images, wrong for unbounded 2-D points."""
    return data_kind == "image"


def state_dict_mismatch(e: RuntimeError) -> str:
    """The telling line of a load_state_dict error (its first line only names the class)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    text = lines[1] if len(lines) > 1 else (lines[0] if lines else type(e).__name__)
    return text if len(text) <= 300 else text[:297] + "..."


def load(path: str | Path, device: str = "auto", use_ema: bool = True) -> LoadedRun:
    """Load a model for inference from any folder ``ddpmkit`` commands take as --checkpoint.

    ``path``: a ddpmkit run folder (its newest complete checkpoint) or checkpoint folder; a
    diffusers pipeline folder (``model_index.json``, ``unet/``, ``scheduler/``); or a bare
    ``UNet2DModel`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``, or
    ``.bin``). ``device``: "auto" (a GPU if present), "cpu", "cuda:N". ``use_ema``: the EMA
    weights of a ddpmkit checkpoint (a diffusers folder holds one set of weights).
    Hub ids are not fetched: download the folder first.
    """
    from . import interop

    p = Path(path)
    if not p.exists():
        if interop.looks_like_hub_id(str(path)):
            raise interop.hub_id_error(str(path))
        raise CheckpointError(f"checkpoint {p} does not exist")
    dev = dist.resolve_device(device)
    if interop.is_diffusers_folder(p):
        return _load_diffusers(p, dev)
    return _load_run(p, dev, use_ema)


load_for_inference = load  # the name used before ddpmkit.load existed


def _load_run(path: Path, dev: torch.device, use_ema: bool) -> LoadedRun:
    ckpt = load_checkpoint(path, with_trainer=False)
    try:
        model = build_model(ckpt.config.model)
    except ConfigError as e:  # a config.json edited by hand, or from another version
        raise CheckpointError(f"{ckpt.path / 'config.json'}: {e}") from None
    try:
        model.load_state_dict(ckpt.ema if use_ema else ckpt.model)
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt.path}: the weights do not fit the network in its "
                              f"config.json: {state_dict_mismatch(e)}") from None
    model.to(dev).eval()
    try:
        diffusion = build_diffusion(ckpt.config)
    except ConfigError as e:
        raise CheckpointError(f"{ckpt.path / 'config.json'}: {e}") from None
    return LoadedRun(ckpt.path, ckpt.config, model, diffusion, dev, ckpt.step)


def _note(message: str) -> None:
    if dist.is_main():
        print(f"note: {message}", file=sys.stderr, flush=True)


def _load_diffusers(path: Path, dev: torch.device) -> LoadedRun:
    from . import interop

    folder = interop.find_diffusers(path)
    try:
        cfg = interop.run_config_from_diffusers(folder)
    except ConfigError as e:
        raise ConfigError(f"{folder.path}: {e}") from None
    if folder.scheduler_config is None:
        _note(f"{folder.path} has no scheduler config: using the DDPM paper's (linear betas "
              "1e-4..0.02, T = 1000, eps prediction, variance beta_t, x0 clipped to [-1, 1])")
    if folder.weights.suffix == ".bin":
        _note(f"reading {folder.weights} with torch.load(weights_only=True); a .safetensors "
              "copy is preferred (plain tensors, no pickle)")
    state = load_state_dict_file(folder.weights)
    for name, value in state.items():
        if value.dtype.is_floating_point and not torch.isfinite(value).all():
            raise CheckpointError(f"{folder.weights}: tensor {name!r} contains NaN or "
                                  "infinite values")
    model = build_model(cfg.model)
    try:
        state = interop.from_diffusers_state_dict(state, model.state_dict())
    except CheckpointError as e:
        raise CheckpointError(f"{folder.weights}: {e}") from None
    model.load_state_dict(state)
    model.to(dev).eval()
    return LoadedRun(folder.path, cfg, model, build_diffusion(cfg), dev, None, "diffusers")
