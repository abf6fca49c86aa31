"""One frozen dataclass per component, and the run's config that groups them.

The same fields drive three things: config files (TOML or JSON, one table per section),
command-line flags (``--field-name``, with the default shown in ``--help``), and the
``config.json`` saved beside every checkpoint. Validation happens in ``__post_init__``, so a
bad value is a :class:`~ddpmkit.errors.ConfigError` naming the field and the value, wherever it
came from. This module imports nothing heavy (no torch), so ``--help`` stays instant.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import ConfigError

CONFIG_VERSION = 1

SCHEDULES = ("linear", "cosine", "sigmoid", "custom")
PREDICTIONS = ("eps", "x0", "v")
VARIANCES = ("fixed_small", "fixed_large", "learned_range")
LOSSES = ("simple", "vlb", "hybrid")
SAMPLERS = ("ancestral", "ddim", "dpm++2m", "dpm++3m", "heun")
SPACINGS = ("trailing", "quadratic")
PRECISIONS = ("fp32", "bf16", "fp16")
TIMESTEP_SAMPLERS = ("uniform", "loss_aware")
POINT_SETS = ("moons", "swissroll", "8gaussians", "checkerboard", "circles")

# Sizes refused before anything is built or allocated (README, "Your data is safe"): a config
# file or a checkpoint's config.json must not be able to ask for tens of GB. The network's
# parameter count is checked too, on the meta device (ddpmkit.nn.build_model).
LIMITS = {
    "timesteps": 100_000,          # T; each schedule buffer is T float64 values
    "image_size": 4096,            # data and network side length
    "image_channels": 64,          # network in/out channels
    "model_channels": 8192,        # base width
    "channel_mult": 64,            # each multiplier ...
    "levels": 10,                  # ... and at most this many resolution levels
    "num_res_blocks": 64,
    "num_heads": 1024,
    "feature_map": 1 << 28,        # channels * image_size^2 of one example's first feature map
    "num_points": 100_000_000,
    "batch_size": 1_000_000,
    "grad_accum": 100_000,
    "samples": 10_000_000,
    "seed": (1 << 32) - 1,
    "workers": 256,                # DataLoader processes per training process
}
MAX_PARAMETERS = 2_000_000_000     # network parameters (8 GB of float32 weights)


def _show(value: Any, limit: int = 60) -> str:
    """repr() for messages, shortened, so a pasted blob still makes a one-line error."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond sys.get_int_max_str_digits() has no repr
        return f"<an integer of about {value.bit_length() * 0.30103:.0f} digits>"
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _help(text: str, **extra: Any) -> dict:
    return {"help": text, **extra}


def _choice(name: str, value: Any, choices: tuple) -> None:
    if value not in choices:
        hint = difflib.get_close_matches(str(value), [str(c) for c in choices], n=1)
        more = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"{name}={_show(value)} is not one of "
                          f"{', '.join(map(str, choices))}{more}")


def _positive(name: str, value: float, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok:
        raise ConfigError(f"{name}={_show(value)} must be {'>= 0' if allow_zero else '> 0'}")


def _at_most(name: str, value: int, limit_name: str) -> None:
    limit = LIMITS[limit_name]
    if value > limit:
        raise ConfigError(f"{name}={_show(value)} is above ddpmkit's limit of {limit:,}")


def _seed(name: str, value: int) -> None:
    if not 0 <= value <= LIMITS["seed"]:
        raise ConfigError(f"{name}={_show(value)} must be in [0, {LIMITS['seed']}]")


@dataclass(frozen=True)
class DataConfig:
    name: str = field(default="digits", metadata=_help(
        "data set: digits | moons | swissroll | 8gaussians | checkerboard | circles, "
        "or a path to an image folder, a .npy/.npz array, a prepared folder, tar shards "
        "('train-{000..099}.tar', a glob, a .txt list, 'pipe:CMD'), a Hugging Face "
        "datasets folder (save_to_disk) or parquet files (pip install 'ddpmkit[hf]')",
        flag="data"))
    image_size: int = field(default=0, metadata=_help(
        "resize + centre-crop images to this size (0: keep the data's own size)"))
    channels: int = field(default=0, metadata=_help("1 (grey) or 3 (RGB); 0: the data's own"))
    flip: bool = field(default=False, metadata=_help("random horizontal flips while training"))
    bad_files: str = field(default="skip", metadata=_help(
        "unreadable images: 'skip' (warn, count in metrics.csv, read the next example "
        "instead) or 'fail' (stop with an error naming the file)"))
    num_points: int = field(default=20000, metadata=_help("training points for the 2-D sets"))
    fingerprint: str = field(default="", metadata=_help(
        "content fingerprint of the data folder or file, set when a run starts", cli=False))
    workers: int = field(default=-1, metadata=_help(
        "DataLoader worker processes per training process for file data (images are "
        "decoded there); -1: up to 4, half the CPUs; built-in sets are read in memory"))

    def __post_init__(self) -> None:
        _positive("image_size", self.image_size, allow_zero=True)
        _at_most("image_size", self.image_size, "image_size")
        _choice("channels", self.channels, (0, 1, 3))
        _choice("bad_files", self.bad_files, ("skip", "fail"))
        _positive("num_points", self.num_points)
        _at_most("num_points", self.num_points, "num_points")
        if not isinstance(self.workers, int) or self.workers < -1:
            raise ConfigError(f"workers={_show(self.workers)} must be -1 (auto) or >= 0")
        _at_most("workers", self.workers, "workers")

    @property
    def is_points(self) -> bool:
        return self.name in POINT_SETS


@dataclass(frozen=True)
class ModelConfig:
    """The denoising network. ``arch='unet'`` for images, ``'mlp'`` for 2-D points.

    ``in_channels``, ``out_channels`` and ``image_size`` are filled in from the data and the
    diffusion (``out_channels`` doubles for ``learned_range``) when a run starts.
    """

    arch: str = field(default="unet", metadata=_help("unet (images) or mlp (2-D points)"))
    channels: int = field(default=128, metadata=_help("U-Net base channels / MLP width",
                                                      flag="model_channels"))
    channel_mult: tuple[int, ...] = field(default=(1, 2, 2, 2), metadata=_help(
        "U-Net channel multiplier per resolution level"))
    num_res_blocks: int = field(default=2, metadata=_help(
        "residual blocks per U-Net level / MLP residual blocks"))
    attention_resolutions: tuple[int, ...] = field(default=(16,), metadata=_help(
        "feature-map sizes that get self-attention"))
    num_heads: int = field(default=1, metadata=_help("attention heads"))
    dropout: float = field(default=0.1, metadata=_help("dropout in residual blocks"))
    groups: int = field(default=32, metadata=_help("GroupNorm groups"))
    in_channels: int = field(default=3, metadata=_help("data channels (set from the data)",
                                                        cli=False))
    out_channels: int = field(default=0, metadata=_help(
        "output channels; 0: in_channels, doubled for learned_range", cli=False))
    image_size: int = field(default=32, metadata=_help("input size (set from the data)",
                                                        cli=False))
    grad_checkpointing: bool = field(default=False, metadata=_help(
        "recompute activations in the backward pass to save memory"))
    class_cond: bool = field(default=False, metadata=_help(
        "class-conditional network: labels from the data (num_classes found from them), a "
        "null class for classifier-free guidance"))
    num_classes: int = field(default=0, metadata=_help(
        "classes of a class-conditional network, which also learns a null class with index "
        "num_classes for classifier-free guidance (0: unconditional; set from the data when "
        "class_cond)", cli=False))

    def __post_init__(self) -> None:
        _choice("arch", self.arch, ("unet", "mlp"))
        if isinstance(self.num_classes, bool) or not isinstance(self.num_classes, int):
            raise ConfigError(f"num_classes={_show(self.num_classes)} must be an integer")
        _positive("num_classes", self.num_classes, allow_zero=True)
        for name in ("channels", "num_res_blocks", "num_heads", "groups", "in_channels",
                     "image_size"):
            _positive(name, getattr(self, name))
        _positive("out_channels", self.out_channels, allow_zero=True)
        if not self.channel_mult or any(m <= 0 for m in self.channel_mult):
            raise ConfigError(f"channel_mult={_show(self.channel_mult)} must be positive integers")
        for name, limit in (("image_size", "image_size"), ("in_channels", "image_channels"),
                            ("out_channels", "image_channels"), ("channels", "model_channels"),
                            ("num_res_blocks", "num_res_blocks"), ("num_heads", "num_heads")):
            _at_most(name, getattr(self, name), limit)
        _at_most("channel_mult", max(self.channel_mult), "channel_mult")
        _at_most("number of levels in channel_mult", len(self.channel_mult), "levels")
        _at_most("channels * image_size^2", self.channels * self.image_size ** 2, "feature_map")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout={_show(self.dropout)} must be in [0, 1)")


@dataclass(frozen=True)
class DiffusionConfig:
    schedule: str = field(default="linear", metadata=_help("beta schedule: linear | cosine | "
                                                           "sigmoid | custom (betas listed)"))
    timesteps: int = field(default=1000, metadata=_help("number of diffusion steps T"))
    # The schedule itself for schedule='custom': set when a diffusers scheduler's betas
    # (scaled_linear, trained_betas, other endpoints) match no named schedule.
    betas: tuple[float, ...] = field(default=(), metadata=_help(
        "beta_1..beta_T for schedule='custom'", cli=False))
    prediction: str = field(default="eps", metadata=_help("network target: eps | x0 | v"))
    variance: str = field(default="fixed_small", metadata=_help(
        "reverse variance: fixed_small | fixed_large | learned_range"))
    loss: str = field(default="simple", metadata=_help("simple | vlb | hybrid"))
    hybrid_lambda: float = field(default=0.001, metadata=_help(
        "weight of the bound in the hybrid loss (Improved DDPM)"))
    min_snr_gamma: float = field(default=0.0, metadata=_help(
        "min-SNR-gamma weighting of the simple loss (Hang et al. 2023): each example's "
        "squared error times min(SNR_t, gamma) / SNR_t for eps, / (SNR_t + 1) for v, "
        "min(SNR_t, gamma) for x0 (0: off; 5 in the paper)"))

    def __post_init__(self) -> None:
        _choice("schedule", self.schedule, SCHEDULES)
        if not isinstance(self.timesteps, int) or self.timesteps < 1:
            raise ConfigError(f"timesteps={_show(self.timesteps)} must be an integer >= 1")
        _at_most("timesteps", self.timesteps, "timesteps")
        if self.schedule == "custom":
            if len(self.betas) != self.timesteps:
                raise ConfigError(f"schedule='custom' needs betas with timesteps="
                                  f"{self.timesteps} entries, got {len(self.betas)}")
            bad = [i for i, b in enumerate(self.betas) if not 0.0 < b < 1.0]
            if bad:
                raise ConfigError(f"betas[{bad[0]}]={_show(self.betas[bad[0]])} must lie in (0, 1)")
        elif self.betas:
            raise ConfigError(f"betas are only read with schedule='custom' (schedule="
                              f"{_show(self.schedule)})")
        _choice("prediction", self.prediction, PREDICTIONS)
        _choice("variance", self.variance, VARIANCES)
        _choice("loss", self.loss, LOSSES)
        _positive("hybrid_lambda", self.hybrid_lambda, allow_zero=True)
        _positive("min_snr_gamma", self.min_snr_gamma, allow_zero=True)
        if self.loss == "hybrid" and self.variance != "learned_range":
            # With a fixed variance the hybrid's bound term has no gradient at all.
            raise ConfigError("loss='hybrid' trains the variance: use variance='learned_range'")


@dataclass(frozen=True)
class TrainConfig:
    batch_size: int = field(default=128, metadata=_help("images per optimizer step, per process"))
    lr: float = field(default=2e-4, metadata=_help("peak learning rate (AdamW)"))
    weight_decay: float = field(default=0.0, metadata=_help("AdamW weight decay"))
    warmup_steps: int = field(default=100, metadata=_help("linear learning-rate warm-up steps"))
    lr_decay: str = field(default="none", metadata=_help(
        "after warm-up: 'none' (constant) or 'cosine' (to 0 at max_steps)"))
    max_steps: int = field(default=0, metadata=_help("stop after this many steps (0: no limit)"))
    max_minutes: float = field(default=0.0, metadata=_help(
        "stop after this much wall time (0: no limit); a clock budget trains a different "
        "model on every machine and load: prefer max_steps"))
    threads: int = field(default=0, metadata=_help(
        "CPU threads of the training process (0: auto, the cores that other programs leave "
        "free at start, measured over 0.3 s; a note when that is fewer than the cores)"))
    grad_clip: float = field(default=1.0, metadata=_help("clip the gradient norm (0: off)"))
    grad_accum: int = field(default=1, metadata=_help("micro-batches per optimizer step"))
    ema_half_life: float = field(default=50_000.0, metadata=_help(
        "EMA half-life in training images"))
    ema_rampup: float = field(default=0.1, metadata=_help(
        "EMA half-life at most this fraction of images seen so far (0: off)"))
    precision: str = field(default="fp32", metadata=_help(
        "fp32 | bf16 | fp16 (mixed precision; CUDA only)"))
    timestep_sampler: str = field(default="uniform", metadata=_help(
        "uniform | loss_aware (Improved DDPM importance sampling, for vlb)"))
    stratified_t: bool = field(default=False, metadata=_help(
        "stratified timesteps (VDM's low-variance t): example i of a global batch of B draws "
        "its uniform from [i/B, (i+1)/B), so every batch covers all of 0..T-1 evenly"))
    checkpoint_every: int = field(default=1000, metadata=_help("steps between checkpoints"))
    keep_checkpoints: int = field(default=3, metadata=_help("newest checkpoints kept"))
    sample_every: int = field(default=0, metadata=_help(
        "steps between sample grids (0: only at the end)"))
    log_every: int = field(default=50, metadata=_help("steps between metric rows"))
    max_bad_steps: int = field(default=10, metadata=_help(
        "consecutive non-finite steps before training stops"))
    seed: int = field(default=0, metadata=_help("random seed"))
    device: str = field(default="auto", metadata=_help("auto | cpu | cuda | cuda:N"))
    compile: bool = field(default=False, metadata=_help("torch.compile the network"))
    channels_last: str = field(default="auto", metadata=_help(
        "channels_last weights: auto (on for CUDA, off on the CPU) | on | off"))
    tf32: bool = field(default=True, metadata=_help(
        "TF32 matmuls and convolutions on Ampere+ GPUs (PyTorch's default for convolutions; "
        "no effect on the CPU)"))
    fid_every: int = field(default=0, metadata=_help(
        "steps between FIDs of EMA samples, logged in metrics.csv (0: off; needs fid_ref)"))
    fid_ref: str = field(default="", metadata=_help(
        "FID reference: images (folder, .npy/.npz, data set) or a `ddpmkit fid-stats` file"))
    fid_num: int = field(default=5000, metadata=_help(
        "samples per training-time FID (the sample options' sampler, steps and seed)"))
    fid_inception: str = field(default="", metadata=_help(
        "TF-Inception weights for FID ('': $DDPMKIT_INCEPTION, then ~/.cache/ddpmkit/)"))
    log: str = field(default="", metadata=_help(
        "extra metric log beside metrics.csv: '' (none) or 'tensorboard' (events in the run "
        "folder; needs the ddpmkit[tensorboard] extra)"))
    class_dropout: float = field(default=0.1, metadata=_help(
        "class-conditional runs: share of training examples given the null class, so that "
        "one network learns p(x | y) and p(x) for classifier-free guidance (0: off)"))

    def __post_init__(self) -> None:
        if not 0.0 <= self.class_dropout < 1.0:
            raise ConfigError(f"class_dropout={_show(self.class_dropout)} must be in [0, 1)")
        for name in ("batch_size", "lr", "grad_accum", "checkpoint_every", "keep_checkpoints",
                     "log_every", "max_bad_steps", "fid_num"):
            _positive(name, getattr(self, name))
        for name in ("weight_decay", "warmup_steps", "max_steps", "max_minutes", "grad_clip",
                     "ema_half_life", "ema_rampup", "sample_every", "fid_every"):
            _positive(name, getattr(self, name), allow_zero=True)
        _at_most("batch_size", self.batch_size, "batch_size")
        _at_most("grad_accum", self.grad_accum, "grad_accum")
        _seed("seed", self.seed)
        if self.fid_every and not self.fid_ref.strip():
            raise ConfigError(f"fid_every={self.fid_every} needs fid_ref: reference images "
                              "or a statistics file from `ddpmkit fid-stats`")
        if self.fid_every and self.fid_num < 2:
            raise ConfigError(f"fid_num={self.fid_num} must be >= 2 (a covariance needs two)")
        _choice("lr_decay", self.lr_decay, ("none", "cosine"))
        _choice("precision", self.precision, PRECISIONS)
        _choice("timestep_sampler", self.timestep_sampler, TIMESTEP_SAMPLERS)
        _choice("channels_last", self.channels_last, ("auto", "on", "off"))
        _choice("log", self.log, ("", "tensorboard"))
        if isinstance(self.threads, bool) or not 0 <= self.threads <= 4096:
            raise ConfigError(f"threads={_show(self.threads)} must be 0 (auto) or 1..4096")


@dataclass(frozen=True)
class SampleConfig:
    # Default from benchmarks/results/digits: DPM-Solver++ 2M at 20 calls scores FD 3.58
    # against 3.91 for 1000-step ancestral sampling (real digits: 2.6-3.1 at the same N).
    sampler: str = field(default="dpm++2m", metadata=_help(
        "ancestral | ddim | dpm++2m | dpm++3m | heun"))
    steps: int = field(default=20, metadata=_help("network calls / kept steps (0: all T)"))
    spacing: str = field(default="trailing", metadata=_help(
        "which steps to keep: trailing | quadratic | a list of section counts like '10,15,20'"))
    eta: float = field(default=0.0, metadata=_help("DDIM noise: 0 deterministic, 1 ancestral"))
    # --num-samples: torchrun reads a bare --num as its own --numa-binding
    num: int = field(default=64, metadata=_help("number of samples", aliases=("num_samples",)))
    seed: int = field(default=0, metadata=_help("random seed (sample i uses seed + i)"))
    batch_size: int = field(default=256, metadata=_help("samples per network call"))
    clip_denoised: bool = field(default=True, metadata=_help("clip predicted x0 to [-1, 1]"))
    # Default from benchmarks/results/guidance (digits, 2,200-step models, 1000 samples per
    # row, two disjoint seed sets): S = 1.25 reads as the asked class 99.2% of the time with
    # FD 2.60 (the unconditional model 2.92, real digits 2.52); S = 1 is at 97.5%, too close to
    # the 97% target; S = 1.5 (99.8%) costs FD 2.91.
    guidance: float = field(default=1.25, metadata=_help(
        "classifier-free guidance scale S with --class: eps = eps_uncond + S (eps_cond - "
        "eps_uncond); 1 = the plain conditional model, 0 = unconditional"))

    def __post_init__(self) -> None:
        _choice("sampler", self.sampler, SAMPLERS)
        _positive("steps", self.steps, allow_zero=True)
        _positive("num", self.num)
        _positive("batch_size", self.batch_size)
        _at_most("num", self.num, "samples")
        _at_most("batch_size", self.batch_size, "batch_size")
        _at_most("steps", self.steps, "timesteps")
        _seed("seed", self.seed)
        if not 0.0 <= self.eta <= 1.0:
            raise ConfigError(f"eta={_show(self.eta)} must be in [0, 1]")
        if self.spacing not in SPACINGS:
            parts = self.spacing.split(",")
            # isdecimal, not isdigit: int() rejects digits such as '²' that isdigit accepts
            if not all(p.strip().isdecimal() and int(p) > 0 for p in parts):
                raise ConfigError(f"spacing={_show(self.spacing)} must be trailing, quadratic or "
                                  "a comma-separated list of positive counts")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "model": ModelConfig,
    "diffusion": DiffusionConfig,
    "train": TrainConfig,
    "sample": SampleConfig,
}


@dataclass(frozen=True)
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    version: int = CONFIG_VERSION

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=False)

    @classmethod
    def from_dict(cls, d: dict, base: RunConfig | None = None) -> RunConfig:
        """Build from nested dicts, on top of ``base``; unknown keys are errors."""
        if not isinstance(d, dict):
            raise ConfigError(f"a config must be a table of sections, got {type(d).__name__}")
        base = base or cls()
        version = d.get("version", CONFIG_VERSION)
        if not isinstance(version, int) or version > CONFIG_VERSION:
            raise ConfigError(f"config version {_show(version)} is newer than this ddpmkit "
                              f"understands ({CONFIG_VERSION}); upgrade ddpmkit")
        unknown = set(d) - set(SECTIONS) - {"version"}
        if unknown:
            key = sorted(unknown)[0]
            raise ConfigError(f"unknown config section {_show(key)}{did_you_mean(key, SECTIONS)}")
        parts = {}
        for name, section_cls in SECTIONS.items():
            parts[name] = section_from_dict(section_cls, d.get(name, {}), getattr(base, name),
                                            where=name)
        return cls(**parts)

    @classmethod
    def from_json(cls, text: str) -> RunConfig:
        try:
            d = json.loads(text)
        except ValueError as e:  # JSONDecodeError, or an integer too long to convert
            raise ConfigError(f"config is not valid JSON: {_show(str(e), 200)}") from None
        except RecursionError:
            raise ConfigError("config is nested too deeply to be a config") from None
        return cls.from_dict(d)

    @classmethod
    def load(cls, path: str | Path, base: RunConfig | None = None) -> RunConfig:
        """Read a ``.toml`` or ``.json`` config file."""
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as e:
            raise ConfigError(f"cannot read config file {path}: {e.strerror or e}") from None
        except UnicodeDecodeError as e:
            raise ConfigError(f"config file {path} is not UTF-8 text: {e.reason} at byte "
                              f"{e.start}") from None
        # ValueError covers the decode errors and integers too long to convert.
        kind = "JSON" if path.suffix == ".json" else "TOML"
        try:
            d = json.loads(text) if kind == "JSON" else _tomllib().loads(text)
        except ValueError as e:
            raise ConfigError(f"{path} is not valid {kind}: {_show(str(e), 200)}") from None
        except RecursionError:  # "[[[[..." : the parsers recurse once per level
            raise ConfigError(f"{path} is nested too deeply to be a config") from None
        try:
            return cls.from_dict(d, base=base)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def replace(self, **sections: Any) -> RunConfig:
        return dataclasses.replace(self, **sections)


def _tomllib():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    return tomllib


def did_you_mean(key: str, options) -> str:
    hint = difflib.get_close_matches(key, list(options), n=1)
    return f" (did you mean {hint[0]!r}?)" if hint else ""


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def coerce(name: str, value: Any, tp: Any) -> Any:
    """Check/convert one value to a field's declared type; strings (from flags) are parsed."""
    origin = typing.get_origin(tp)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{name}={_show(value)} must be true or false")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name}={_show(value)} must be an integer")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value.replace("_", ""))
            except ValueError:
                pass
        raise ConfigError(f"{name}={_show(value)} must be an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            try:
                out = float(value)
            except OverflowError:  # an int beyond the float range
                raise ConfigError(f"{name}={_show(value)} must be a finite number") from None
        elif isinstance(value, str):
            try:
                out = float(value)
            except ValueError:
                raise ConfigError(f"{name}={_show(value)} must be a number") from None
        else:
            raise ConfigError(f"{name}={_show(value)} must be a number")
        if out != out or out in (float("inf"), float("-inf")):
            raise ConfigError(f"{name}={_show(value)} must be a finite number")
        return out
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name}={_show(value)} must be a string")
    if origin is tuple:
        if isinstance(value, str):
            items = [v for v in value.replace(" ", "").split(",") if v != ""]
        elif isinstance(value, (list, tuple)):
            items = list(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            items = [value]
        else:
            raise ConfigError(f"{name}={_show(value)} must be a list of numbers")
        item_type = (typing.get_args(tp) or (int,))[0]
        return tuple(coerce(name, v, item_type) for v in items)
    if origin in (typing.Union, types.UnionType):  # pragma: no cover - not used yet
        return value
    raise ConfigError(f"{name}: unsupported type {tp}")  # pragma: no cover


def section_from_dict(cls: type, d: Any, base: Any = None, where: str = "") -> Any:
    """Override ``base`` (or the defaults) of dataclass ``cls`` with the keys of ``d``."""
    label = where or cls.__name__
    if not isinstance(d, dict):
        raise ConfigError(f"config section [{label}] must be a table, got {_show(d)}")
    hints = _field_types(cls)
    names = [f.name for f in fields(cls)]
    values = {}
    for key, value in d.items():
        if key not in hints:
            raise ConfigError(f"unknown key {_show(key)} in [{label}]{did_you_mean(key, names)}")
        values[key] = coerce(f"{label}.{key}" if where else key, value, hints[key])
    base = base if base is not None else cls()
    try:
        return dataclasses.replace(base, **values)
    except TypeError as e:  # pragma: no cover - guarded above
        raise ConfigError(str(e)) from None


# ---- resuming: which settings may change ---------------------------------------------------

# The weights mean nothing under other values of these (the network, the diffusion, the data's
# shape, which fills the network's in/out channels and size): a resume never changes them.
FIXED_ON_RESUME = frozenset({
    "model.arch", "model.channels", "model.channel_mult", "model.num_res_blocks",
    "model.attention_resolutions", "model.num_heads", "model.groups", "model.in_channels",
    "model.out_channels", "model.image_size", "diffusion.schedule", "diffusion.timesteps",
    "diffusion.betas", "diffusion.prediction", "diffusion.variance"})
# These change what the run learns from: only with --allow-changes. Everything else
# (learning rate, batch, budgets, logging, sampling, device, precision) changes freely on a
# resume, and is printed.
GUARDED_ON_RESUME = frozenset({
    "data.name", "data.fingerprint", "data.flip", "data.num_points", "model.dropout",
    "diffusion.loss", "diffusion.hybrid_lambda", "diffusion.min_snr_gamma", "train.seed",
    "train.timestep_sampler", "train.stratified_t"})


def config_changes(old: RunConfig, new: RunConfig) -> list[tuple[str, Any, Any]]:
    """``[("section.field", old value, new value), ...]`` for every field that differs."""
    changes = []
    for section in SECTIONS:
        a, b = getattr(old, section), getattr(new, section)
        for f in fields(a):
            if getattr(a, f.name) != getattr(b, f.name):
                changes.append((f"{section}.{f.name}", getattr(a, f.name), getattr(b, f.name)))
    return changes


def describe_changes(changes: list[tuple[str, Any, Any]]) -> str:
    """``"diffusion.timesteps 40 -> 50, ..."`` (values shortened to keep one line)."""
    return ", ".join(f"{k} {_show(a, 40)} -> {_show(b, 40)}" for k, a, b in changes)


# ---- command-line flags derived from the dataclasses -------------------------------------

def flag_dest(f: dataclasses.Field, prefix: str = "") -> str:
    """The argparse destination of a field's flag (unique across sections)."""
    return prefix + f.metadata.get("flag", f.name)


def flag_name(f: dataclasses.Field, prefix: str = "") -> str:
    return "--" + flag_dest(f, prefix).replace("_", "-")


def add_flags(parser, cls: type, prefix: str = "", group_title: str | None = None,
              defaults: Any = None) -> None:
    """Add one ``--flag`` per CLI-visible field of ``cls``; parsed values stay strings.

    Flags default to ``None`` (meaning: not given), so a config file's value is only
    overridden by flags the user actually typed. ``--help`` shows the built-in default.
    """
    group = parser.add_argument_group(group_title or cls.__name__)
    defaults = defaults if defaults is not None else cls()
    hints = _field_types(cls)
    for f in fields(cls):
        if not f.metadata.get("cli", True):
            continue
        default = getattr(defaults, f.name)
        shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
        kwargs = dict(default=None, dest=flag_dest(f, prefix),
                      help=f"{f.metadata.get('help', '')} (default: {shown})")
        if hints[f.name] is bool:
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        else:
            kwargs.update(metavar=f.name.upper())
        aliases = ["--" + (prefix + a).replace("_", "-") for a in f.metadata.get("aliases", ())]
        group.add_argument(flag_name(f, prefix), *aliases, **kwargs)


def flags_to_dict(args, cls: type, prefix: str = "") -> dict:
    """The flags of ``cls`` that were given on the command line, as a section dict."""
    out = {}
    for f in fields(cls):
        if not f.metadata.get("cli", True):
            continue
        value = getattr(args, flag_dest(f, prefix), None)
        if value is not None:
            out[f.name] = value
    return out


# ---- TOML output (the subset our configs use: tables of str/int/float/bool/int lists) -------

def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, (tuple, list)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {v!r} as TOML")  # pragma: no cover


def to_toml(cfg: RunConfig) -> str:
    """The config as TOML, readable back by :meth:`RunConfig.load`."""
    lines = [f"version = {cfg.version}"]
    for name in SECTIONS:
        lines.append(f"\n[{name}]")
        for key, value in dataclasses.asdict(getattr(cfg, name)).items():
            lines.append(f"{key} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


# ---- presets ---------------------------------------------------------------------------------

MODEL_PRESETS: dict[str, ModelConfig] = {
    # The published DDPM CIFAR-10 network (Ho et al. 2020, appendix B): 35.7M parameters.
    "cifar10": ModelConfig(),
    # The published 256x256 DDPM networks (CelebA-HQ, LSUN).
    "celebahq256": ModelConfig(channel_mult=(1, 1, 2, 2, 4, 4), dropout=0.0, image_size=256),
    # Built-in digits (8x8, 1 channel), sized for 8 minutes of training on 2 CPU cores:
    # 1.6M parameters, ~4.5 steps/s at batch 128 on a quiet 2-core machine (2,155 steps in
    # 8 min); wider variants (4.4M, 6.5M) ran 1.4-2x slower per step.
    "digits": ModelConfig(channels=32, channel_mult=(1, 2, 2), num_res_blocks=2,
                          attention_resolutions=(4,), dropout=0.1, groups=32, in_channels=1,
                          image_size=8),
    # A tiny network for tests.
    "tiny": ModelConfig(channels=32, channel_mult=(1, 2), num_res_blocks=1,
                        attention_resolutions=(4,), dropout=0.0, groups=8, in_channels=1,
                        image_size=8),
    # 2-D points.
    "toy2d": ModelConfig(arch="mlp", channels=128, num_res_blocks=3, dropout=0.0,
                         attention_resolutions=(), in_channels=2, image_size=1),
}
MODEL_PRESETS["lsun256"] = MODEL_PRESETS["celebahq256"]

RUN_PRESETS: dict[str, RunConfig] = {
    "digits": RunConfig(
        data=DataConfig(name="digits"),
        model=MODEL_PRESETS["digits"],
        # The sigmoid schedule with v-prediction (issue 14's recipe sweep): against cosine
        # with eps, a test bound ~0.9 bits/dim lower at equal training and samples at least as
        # good (README, "Time to quality"). Cosine spends ~2 more e-folds of SNR at noise far
        # below the 17-level spacing, where every step costs bound and teaches the net little.
        diffusion=DiffusionConfig(schedule="sigmoid", timesteps=1000, prediction="v"),
        # A step budget, not a clock: the same command trains the same model on any machine
        # and load. 2,200 steps is what 8 minutes gave on a quiet 2-core machine (README).
        train=TrainConfig(batch_size=128, lr=1e-3, warmup_steps=200, max_steps=2200,
                          ema_half_life=20_000.0, checkpoint_every=500, log_every=50),
        # Ancestral sampling with 100 respaced steps: on this preset's model (sigmoid, v) it
        # beats DPM-Solver++ 2M at 20 calls in 1,000 samples x 2 seed sets: the share of
        # recognisable digits 0.832 / 0.829 against 0.715 / 0.752, FD 2.53 / 1.95 against
        # 2.68 / 2.18 (README, "Against denoising-diffusion-pytorch"); 100 digits in ~8 s.
        sample=SampleConfig(num=100, seed=0, sampler="ancestral", steps=100),
    ),
    "toy2d": RunConfig(
        data=DataConfig(name="moons"),
        model=MODEL_PRESETS["toy2d"],
        # Linear, not cosine: cosine's last beta is capped at 0.999, so its first reverse step
        # multiplies eps errors by 1/sqrt(1 - 0.999) ~ 32, and unclipped 2-D points (no [-1, 1]
        # range to clip x0 to) landed hundreds of units away.
        diffusion=DiffusionConfig(schedule="linear", timesteps=1000),
        train=TrainConfig(batch_size=512, lr=1e-3, warmup_steps=100, max_minutes=1.5,
                          ema_half_life=100_000.0, checkpoint_every=1000, log_every=50),
        sample=SampleConfig(num=2000, seed=0),
    ),
    "cifar10": RunConfig(
        data=DataConfig(name="cifar10", flip=True),
        model=MODEL_PRESETS["cifar10"],
        diffusion=DiffusionConfig(schedule="linear", timesteps=1000),
        train=TrainConfig(batch_size=128, lr=2e-4, warmup_steps=5000, max_steps=800_000,
                          # DDPM's EMA decay 0.9999 per step of 128 images, as a half-life:
                          # ln 0.5 / ln 0.9999 = 6931 steps = 887k images.
                          grad_clip=1.0, ema_half_life=887_000.0,
                          checkpoint_every=10_000, sample_every=10_000),
    ),
}

# The likelihood preset (issue 14): the digits preset (sigmoid schedule, v-prediction) with
# learned variances (learned_range) trained by the hybrid loss (Improved DDPM sec. 3.1), 2,300
# steps: 9.8 quiet minutes at the 3.90 steps/s measured on the 2-core development CPU (the
# hybrid loss's bound term makes a step ~10% slower than the digits preset's). Test bound
# after them: 2.31 +- 0.02 bits/dim (3.10 on the former cosine/eps base; README, "Likelihood").
RUN_PRESETS["digits-nll"] = RUN_PRESETS["digits"].replace(
    diffusion=dataclasses.replace(RUN_PRESETS["digits"].diffusion, variance="learned_range",
                                  loss="hybrid"),
    train=dataclasses.replace(RUN_PRESETS["digits"].train, max_steps=2300))


def default_preset_for(data_name: str) -> str:
    """The run preset used when only ``--data`` is given."""
    if data_name in POINT_SETS:
        return "toy2d"
    if data_name == "digits":
        return "digits"
    return "cifar10"
