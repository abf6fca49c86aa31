"""The training loop: data -> losses -> AdamW -> EMA, with checkpoints, metrics and pictures.

Randomness is arranged so that a run is reproducible and resumable exactly, and does not
depend on the number of processes:
- the data order is a fresh permutation per epoch, seeded by (seed, epoch), consumed as one
  stream whose position (``images_seen``) is saved; each rank reads only its rows of each
  global batch, through DataLoader workers for file sources (``ddpmkit.data.loader``);
- each example's timestep, flip and noise are drawn on the device from a generator seeded by
  (seed, the example's index in the data stream) alone (train/randomness.py), so each rank
  draws only its own examples and no generator state needs saving;
- the dropout RNG states (CPU, and CUDA's on a GPU) of every rank are saved.
So an interrupted run resumed from step k continues bit-identically on the CPU. The step never
waits for the device: figures are read once per log row (train/monitor.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import dist
from ..config import (
    FIXED_ON_RESUME,
    GUARDED_ON_RESUME,
    RunConfig,
    config_changes,
    describe_changes,
)
from ..data import Batch, Dataset, Loader, data_path, fingerprint, load_data
from ..diffusion import GaussianDiffusion
from ..errors import CheckpointError, ConfigError, DdpmkitError
from ..loading import (  # noqa: F401  LoadedRun and load_for_inference live in ddpmkit.loading
    LoadedRun,
    build_diffusion,
    clip_denoised_for,
    load_for_inference,
    state_dict_mismatch,
)
from ..nn import build_model
from ..outputs import check_output, check_writable, open_nofollow
from ..runtime import choose_threads, set_tf32, tune_allocator
from . import run_dir
from .checkpoint import find_checkpoint as find_checkpoint_folder
from .checkpoint import (
    incomplete_checkpoints,
    list_checkpoints,
    load_checkpoint,
    optimizer_from_flat,
    optimizer_to_flat,
    save_checkpoint,
    write_json_atomic,
)
from .ema import EMA, ema_decay
from .labels import num_classes_of, require_labels
from .monitor import LogWindow, StepHealth
from .randomness import ExampleDraws, example_seed, rng_state, set_rng_state
from .timesteps import TimestepSampler, stratify

METRIC_FIELDS = ["step", "images", "loss", "mse", "vb", "lr", "grad_norm", "loss_q0", "loss_q1",
                 "loss_q2", "loss_q3", "steps_per_s", "elapsed_s", "skipped", "overflow",
                 "bad_files", "fid"]

# The data order of checkpoints: "stream-v1" is DataOrder's epoch permutations consumed by
# images_seen (checkpoints from before this key was written used the same order).
DATA_ORDER = "stream-v1"


class TrainingDiverged(DdpmkitError):
    """Too many consecutive non-finite losses or gradients."""


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    checkpoint: Path | None
    stopped: str          # "max_steps" | "max_minutes" | "signal"
    final_loss: float
    elapsed_s: float


# ---- building blocks --------------------------------------------------------------------------

def resolve_config(cfg: RunConfig, data: Dataset,
                   labels: torch.Tensor | None = None) -> RunConfig:
    """Fill the network's input/output shape from the data and the variance type, and, for a
    class-conditional run, its number of classes from the labels."""
    learned = cfg.diffusion.variance == "learned_range"
    if data.kind == "points":
        if cfg.model.arch != "mlp":
            raise ConfigError(f"data {cfg.data.name!r} is 2-D points: use model arch 'mlp' "
                              "(e.g. --config toy2d)")
        model = dataclasses.replace(cfg.model, in_channels=2, out_channels=4 if learned else 2,
                                    image_size=1)
    else:
        if cfg.model.arch != "unet":
            raise ConfigError(f"data {cfg.data.name!r} is images: use model arch 'unet'")
        c, h, w = data.shape
        model = dataclasses.replace(cfg.model, in_channels=c,
                                    out_channels=c * (2 if learned else 1), image_size=h)
    if labels is not None:
        found = num_classes_of(labels)
        if model.num_classes and model.num_classes < found:
            raise ConfigError(f"num_classes={model.num_classes}, but the data has labels up to "
                              f"{found - 1}")
        model = dataclasses.replace(model, class_cond=True,
                                    num_classes=model.num_classes or found)
    if cfg.train.batch_size > len(data):
        raise ConfigError(f"batch_size={cfg.train.batch_size} is larger than the data set "
                          f"({len(data)} examples)")
    return cfg.replace(model=model)


class _Stop:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (then saves).

    Copies of one stop request must not abort the save: SLURM's ``--signal`` sends SIGTERM to
    every process of the job step, and torchrun forwards the SIGTERM (or the terminal's SIGINT,
    which also reaches every worker directly) once more. So a repeated SIGTERM is ignored, and
    only a SIGINT more than ``REPEAT_WINDOW`` seconds after the first signal (a person pressing
    Ctrl-C again) aborts at once.
    """

    REPEAT_WINDOW = 2.0  # seconds; torchrun forwards within milliseconds

    def __init__(self):
        self.reason: str | None = None
        self._first_at = 0.0
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        now = time.monotonic()
        if self.reason is None:
            self.reason, self._first_at = "signal", now
            dist.print0(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint, then "
                        "stopping (press Ctrl-C again to abort)")
        elif signum == signal.SIGINT and now - self._first_at > self.REPEAT_WINDOW:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _check_writable(out: Path) -> None:
    try:
        check_writable(out)
    except ConfigError as e:
        raise ConfigError(f"cannot write to the output folder {out}: "
                          f"{str(e).rpartition(': ')[2]}") from None


def _check_disk_space(out: Path, model: nn.Module, keep: int) -> None:
    """Fail now, not at the first checkpoint hours from now, if not even one checkpoint fits.

    A checkpoint holds the weights, their EMA and AdamW's two moments: about 4 copies of the
    float weights. Room for fewer than ``keep + 1`` of them (the kept ones plus the one being
    written) is only a warning: old ones are pruned, and free space reports can be rough.
    """
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    per_checkpoint = 4 * weights + (1 << 20)
    try:
        free = shutil.disk_usage(out).free
    except OSError:
        return  # no figure to judge by; the writes themselves will report
    mib = 1 << 20
    if free < per_checkpoint:
        raise DdpmkitError(f"the disk of {out} has {free / mib:.0f} MiB free, but one checkpoint "
                           f"of this model needs about {per_checkpoint / mib:.0f} MiB: free some "
                           "space or pass another --out")
    have = len(list_checkpoints(out))
    need = max(1, keep + 1 - have) * per_checkpoint
    if free < need:
        dist.print0(f"warning: the disk of {out} has {free / mib:.0f} MiB free; "
                    f"keep_checkpoints={keep} needs about {need / mib:.0f} MiB more (lower "
                    "--keep-checkpoints or free some space)")


def make_optimizer(model: nn.Module, lr: float, weight_decay: float = 0.0
                   ) -> torch.optim.Optimizer:
    """AdamW (betas 0.9, 0.999) over ``model``'s parameters, fused where PyTorch has it.

    The fused kernel updates each parameter in one pass instead of the ~10 per-tensor ops of
    the default implementation on the CPU; on the benchmark machine that cut the optimizer
    from ~90 to ~30 ms of a 3.3 s CIFAR-10 step (docs/speed.md). PyTorch before 2.4 has no
    fused CPU AdamW: there, and wherever it refuses, the default implementation is used.
    """
    params = list(model.parameters())
    settings = dict(lr=lr, betas=(0.9, 0.999), weight_decay=weight_decay)
    try:
        return torch.optim.AdamW(params, **settings, fused=True)
    except (RuntimeError, TypeError, ValueError):
        return torch.optim.AdamW(params, **settings)


# What belongs to the optimizer object, not to the training state in a checkpoint.
_IMPLEMENTATION_FLAGS = ("fused", "foreach", "capturable", "differentiable")


def load_optimizer_state(optimizer: torch.optim.Optimizer, state_dict: dict) -> None:
    """``optimizer.load_state_dict``, keeping what belongs to this optimizer, not the file.

    - Implementation flags (fused, foreach, capturable): load_state_dict would take the
      checkpoint's, so a state saved by a non-fused AdamW turned a fused one non-fused,
      which GradScaler then fails on ("Expected grad_scale and found_inf to be None").
    - Each moment gets its parameter's memory layout. Checkpoints store tensors contiguous,
      and the fused kernels walk a parameter and its moments as flat memory: channels_last
      weights with contiguous moments would be updated with other elements' moments (on the
      CPU silently; CUDA refuses the mismatch).
    """
    keep = [{k: g[k] for k in _IMPLEMENTATION_FLAGS if k in g} for g in optimizer.param_groups]
    optimizer.load_state_dict(state_dict)
    for group, flags in zip(optimizer.param_groups, keep, strict=True):
        group.update(flags)
        for p in group["params"]:
            state = optimizer.state.get(p, {})
            for key, value in state.items():
                if isinstance(value, torch.Tensor) and value.shape == p.shape \
                        and value.stride() != p.stride():
                    state[key] = torch.empty_like(p, dtype=value.dtype).copy_(value)


def make_grad_scaler(device: torch.device, enabled: bool) -> torch.amp.GradScaler:
    """fp16's loss scaler (disabled: a pass-through); its state is saved in checkpoints."""
    return torch.amp.GradScaler(device.type if device.type == "cuda" else "cpu",
                                enabled=enabled)


def use_channels_last(setting: str, device: torch.device) -> bool:
    """channels_last weights: "auto" is on for CUDA (cuDNN's fast layout), off on the CPU."""
    return setting == "on" or (setting == "auto" and device.type == "cuda")


def _lr_at(cfg, step: int) -> float:
    tc = cfg.train
    if tc.warmup_steps > 0 and step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.lr_decay == "cosine" and tc.max_steps > 0:
        progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
        return tc.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return tc.lr


def _count(state: dict, key: str, default: int) -> int:
    """A non-negative integer of the saved trainer state (a tampered one raises ValueError)."""
    value = state.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 1 << 62:
        raise ValueError(f"{key}={str(value)[:40]} is not a count")
    return value


def drop_labels(y: torch.Tensor, p: float, null_class: int, u: torch.Tensor) -> torch.Tensor:
    """Classifier-free guidance training (Ho & Salimans 2022): label y[i] [B] replaced by the
    null class where the uniform u[i] < ``p``, so one network learns p(x | y) and p(x)."""
    if p <= 0:
        return y
    return torch.where(u < p, torch.full_like(y, null_class), y)


def label_uniforms(seed: int, stream: list[int]) -> torch.Tensor:
    """One U[0, 1) per example [N] (CPU) from its place in the data stream alone, on its own
    seeds (not the noise's), so the same example drops its label on any number of ranks."""
    g = torch.Generator()
    return torch.stack([torch.rand((), generator=g.manual_seed(example_seed(seed ^ _LABEL_SALT,
                                                                             int(i))))
                        for i in stream])


_LABEL_SALT = 0x6C61_6265_6C73  # "labels": a seed family apart from the noise draws


def _dropout_seed(seed: int, rank: int, step: int) -> int:
    """A fresh dropout seed for a rank that has no saved RNG state (start, or more ranks)."""
    return ((seed * 1_000_003 + rank) * 1_000_033 + step) % (1 << 63)  # manual_seed's range




def _append_metrics(path: Path, row: dict) -> None:
    """One row onto metrics.csv (header first); a full disk is a one-line error."""
    try:
        run_dir.append_row(path, row, METRIC_FIELDS)
    except OSError as e:
        raise DdpmkitError(f"cannot write {path}: {e.strerror or e}") from None


# ---- the loop --------------------------------------------------------------------------------

class _RunDirLock:
    """An exclusive lock on ``out/.lock`` for one training run (rank 0 holds it).

    Two trainers writing into one folder would rotate each other's checkpoints away. The lock
    is ``flock``: the kernel drops it when the process ends, however it ends (a SIGKILLed run
    leaves no stale lock behind). Where ``fcntl`` is missing (Windows) there is no lock.
    """

    def __init__(self, out: Path):
        self.file = None
        try:
            import fcntl
        except ImportError:
            return
        # held open for the whole run (closing unlocks); never through a link
        f = os.fdopen(open_nofollow(out / ".lock", os.O_RDWR | os.O_CREAT, "the lock"), "r+")
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ConfigError(f"{out} is in use by another training run ({holder}); stop it "
                              "or train into another --out") from None
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self.file = f
        # A forked child (a DataLoader worker) shares this open file and with it the lock: a
        # SIGKILLed trainer's workers, which outlive it by a moment, would block the resume.
        # Children point the descriptor at /dev/null instead; the parent's lock stays.
        os.register_at_fork(after_in_child=self._drop_in_child)

    def _drop_in_child(self) -> None:
        if self.file is not None and not self.file.closed:
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, self.file.fileno())
            os.close(null)
            self.file = None

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing drops the flock
            self.file = None


def train(cfg: RunConfig, out_dir: str | Path, resume: str | None = "auto",
          progress: bool = True, overwrite: bool = False,
          allow_changes: bool = False) -> TrainResult:
    """Train per ``cfg`` into ``out_dir``; ``resume`` is "auto", None or a checkpoint path.

    Tunes this process's allocator first (:func:`ddpmkit.runtime.tune_allocator`: freed memory
    stays in the process; ``DDPMKIT_TUNE_MALLOC=0`` opts out). ``out_dir`` is locked for the
    run: a second trainer on the same folder stops with a ConfigError. What a start does to
    an earlier run in ``out_dir`` (refused, moved aside with ``overwrite``, branched) is
    described in :mod:`ddpmkit.train.run_dir`; ``allow_changes`` lets a resume change the
    settings that alter what the run learns (:data:`ddpmkit.config.GUARDED_ON_RESUME`).
    """
    out = Path(out_dir)
    lock = None
    if dist.is_main():  # before the process group exists: reads RANK from the environment
        check_output(out, data=data_path(cfg.data.name), writable=False)
        _check_writable(out)
        lock = _RunDirLock(out)
        run_dir.check_start(out, resume, overwrite)
    try:
        return _train(cfg, out, resume, progress, allow_changes)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, out: Path, resume: str | None, progress: bool,
           allow_changes: bool) -> TrainResult:
    t_start = time.time()
    tune_allocator()
    threads_before = torch.get_num_threads()
    _, note = choose_threads(cfg.train.threads)
    if note:
        dist.print0(note)
    try:
        trainer = _Trainer(cfg, out, t_start)
        trainer.allow_changes = allow_changes
        trainer.restore(trainer.find_checkpoint(resume), resume)
        trainer.announce()
        return trainer.run(progress)
    finally:
        torch.set_num_threads(threads_before)  # a process-wide setting: the caller's again


@dataclass
class _StepResult:
    """One global step's outcome as every rank sees it, on the device (read at log rows)."""

    lr: float
    loss: torch.Tensor                # mean over the global batch
    grad_norm: torch.Tensor
    ok: torch.Tensor                  # bool: the update was applied (loss and gradient finite)


class _KeyLog:
    """``DDPMKIT_KEY_LOG=FILE``: append ``STEP<tab>KEY<tab>KEY...`` per step (this rank's
    examples; rank r > 0 writes FILE.rankR), to audit the data order (the resume tests read
    it)."""

    def __init__(self, rank: int):
        path = os.environ.get("DDPMKIT_KEY_LOG")
        self.enabled = bool(path)
        self._file = None
        if path:
            self._file = open(path + (f".rank{rank}" if rank else ""), "a", buffering=1)

    def write(self, step: int, keys: list[str] | None) -> None:
        if self._file is not None and keys is not None:
            self._file.write(f"{step}\t{chr(9).join(keys)}\n")


class _Trainer:
    """One training run, in named parts: set-up (``__init__``), :meth:`restore`, :meth:`step`,
    :meth:`log`, :meth:`save` and the loop that calls them (:meth:`run`)."""

    # ---- set-up --------------------------------------------------------------------------

    def __init__(self, cfg: RunConfig, out: Path, t_start: float):
        self.out, self.t_start = out, t_start
        self.device = dist.resolve_device(cfg.train.device)
        self.distributed = dist.init_process_group(self.device)
        self.rank, self.world = dist.rank(), dist.world_size()

        self.data = load_data(cfg.data, "train")
        # Class labels (class-conditional runs only; None otherwise).
        self.labels = (require_labels(cfg.data, "train", self.data)
                       if cfg.model.class_cond or cfg.model.num_classes else None)
        path = data_path(cfg.data.name)
        if path is not None:  # absolute, fingerprinted: eval from elsewhere checks the same data
            cfg = cfg.replace(data=dataclasses.replace(
                cfg.data, name=str(path), fingerprint=fingerprint(str(path))))
        self.cfg = cfg = resolve_config(cfg, self.data, self.labels)
        tc = cfg.train
        if self.data.skipped:
            dist.print0(f"skipped {len(self.data.skipped)} unreadable file(s); first: "
                        f"{self.data.skipped[0]}")
        self.bad_files = len(self.data.skipped)  # unreadable images met, in all ranks
        self.diffusion = build_diffusion(cfg)
        self._build_model()
        self._set_precision()
        self.timesteps = TimestepSampler(self.diffusion.num_timesteps, tc.timestep_sampler,
                                         device=self.device)
        self.loader: Loader | None = None  # made at the first step, at the resumed position
        self._stream_saved: dict | None = None  # a pipe: stream's position from the checkpoint
        self._bad_here = 0                 # this rank's unreadable images since the last count
        self._key_log = _KeyLog(self.rank)
        self.draws = ExampleDraws(tc.seed, self.device)
        self.global_batch = tc.batch_size * self.world * tc.grad_accum
        # This rank's positions in the global batch: micro-batch a of rank r is slice
        # (a * world + r) of the global batch, so any split trains on the same examples.
        self.mine = [(a * self.world + self.rank) * tc.batch_size + i
                     for a in range(tc.grad_accum) for i in range(tc.batch_size)]
        self.step_count, self.images_seen = 0, 0
        self.window = LogWindow(self.device)
        self.health = StepHealth(self.device)
        self.skipped_total = self.overflow_total = 0  # as last read from self.health
        self.last_loss = torch.full((), math.nan, device=self.device)
        self.last_ckpt: Path | None = None
        self.allow_changes = False  # resume despite GUARDED_ON_RESUME changes (see train())
        self.fid = _TrainingFID(cfg, self.data, self.device) if tc.fid_every else None
        self.tb = None  # the TensorBoard log (rank 0, --log tensorboard): made in restore()

    def _build_model(self) -> None:
        tc = self.cfg.train
        # The same initial weights on every rank (DDP would broadcast rank 0's anyway, but the
        # EMA copies them first); then each rank its own dropout stream, saved and restored.
        torch.manual_seed(tc.seed)
        self.model = build_model(self.cfg.model).to(self.device)
        if self.rank > 0:
            torch.manual_seed(_dropout_seed(tc.seed, self.rank, 0))
        if use_channels_last(tc.channels_last, self.device):
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model)
        self.optimizer = make_optimizer(self.model, tc.lr, tc.weight_decay)

    def _set_precision(self) -> None:
        """Autocast dtype, and the GradScaler (fp16 only; its state is checkpointed)."""
        tc = self.cfg.train
        set_tf32(tc.tf32)
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.precision)
        self.use_amp = self.amp_dtype is not None and self.device.type == "cuda"
        if self.amp_dtype is not None and self.device.type != "cuda":
            dist.print0(f"precision={tc.precision} needs CUDA; training in fp32 on {self.device}")
        fp16 = self.use_amp and self.amp_dtype == torch.float16
        self.scaler = make_grad_scaler(self.device, fp16)

    def _wrap_for_training(self) -> None:
        """DDP and torch.compile around the plain module."""
        tc = self.cfg.train
        # DDP wraps the plain module (its state_dict keys stay unprefixed in checkpoints, and
        # the EMA reads the same parameters), then torch.compile wraps DDP, as PyTorch
        # recommends so that gradient all-reduces overlap the compiled backward.
        self.train_model: nn.Module = self.model
        self.ddp = None
        if self.distributed:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.model,
                device_ids=[self.device.index] if self.device.type == "cuda" else None)
            self.train_model = self.ddp
        if tc.compile:
            self.train_model = torch.compile(self.train_model)

    # ---- restore -------------------------------------------------------------------------

    def find_checkpoint(self, resume: str | None) -> str | Path | None:
        """The checkpoint to resume from, as rank 0 resolves it, on every rank.

        Rank 0 lists the folder and every rank gets its answer, so that all resume from the
        same step even if a shared file system's listing lags on some machines.
        """
        if not resume:
            return None
        found: str | Path | None = None
        error = None
        if dist.is_main():
            try:
                if resume == "auto":
                    listed = list_checkpoints(self.out)
                    found = listed[-1] if listed else None
                else:  # a run folder means its newest complete checkpoint
                    found = find_checkpoint_folder(resume)
            except DdpmkitError as e:
                error = str(e)
        found, error = dist.broadcast_object((found, error))
        if error is not None:
            raise CheckpointError(error)
        return found

    def restore(self, ckpt_path: str | Path | None, resume: str | None) -> None:
        """Load weights, EMA, optimizer, RNG states and counters from a checkpoint, or say
        that a new run starts (an earlier run's leftovers move aside: run_dir.py); then write
        the resolved config.json."""
        if ckpt_path is None:
            dist.print0(f"starting a new run in {self.out}")
            broken = incomplete_checkpoints(self.out) if resume == "auto" and dist.is_main() \
                else []
            if broken:  # never silently: the user may have expected to resume from these
                dist.print0(f"ignoring {len(broken)} incomplete checkpoint folder(s) in "
                            f"{self.out / 'checkpoints'} (e.g. {broken[-1].name}: files are "
                            "missing)")
            if dist.is_main():
                self._move_old_run_aside()
        else:
            self._restore_from(load_checkpoint(ckpt_path))
        if dist.is_main():
            write_json_atomic(self.out / "config.json", self.cfg.to_json())
            self._open_tensorboard()

    def _open_tensorboard(self) -> None:
        """--log tensorboard: events in out/tensorboard, from the resumed step on."""
        if self.cfg.train.log == "tensorboard":
            from .tb import TensorBoardLog
            self.tb = TensorBoardLog(self.out, purge_step=self.step_count)

    def _move_old_run_aside(self) -> None:
        moved = run_dir.move_old_run_aside(self.out)
        if moved is not None:
            dist.print0(f"moved the earlier run's files ({', '.join(sorted(os.listdir(moved)))}) "
                        f"to {moved}")

    def _check_settings(self, ckpt) -> None:
        """Refuse a resume under settings the weights were not trained with (one line)."""
        old = ckpt.config
        path = data_path(old.data.name)  # an old run's relative path means the current folder
        if path is not None:
            old = old.replace(data=dataclasses.replace(old.data, name=str(path)))
        changes = [c for c in config_changes(old, self.cfg)
                   if not (c[0] == "data.fingerprint" and not c[1])]  # none saved: no verdict
        fixed = [c for c in changes if c[0] in FIXED_ON_RESUME]
        if fixed:
            raise CheckpointError(
                f"{ckpt.path} was trained with other settings: {describe_changes(fixed)}; the "
                "network, the diffusion and the data's shape must match to resume: use the "
                "checkpoint's values, or train into a new --out")
        guarded = [c for c in changes if c[0] in GUARDED_ON_RESUME]
        if guarded and not self.allow_changes:
            raise ConfigError(
                f"resuming {ckpt.path} with {describe_changes(guarded)} changes what the run "
                "learns from; pass --allow-changes to do it anyway, or train into a new --out")
        if changes:
            dist.print0(f"resuming with changed settings: {describe_changes(changes)}")

    def _restore_from(self, ckpt) -> None:
        self._check_settings(ckpt)
        try:
            self.model.load_state_dict(ckpt.model)
        except RuntimeError as e:
            raise CheckpointError(f"{ckpt.path} does not fit this config's network: "
                                  f"{state_dict_mismatch(e)} (train into a new --out, or pass "
                                  "--resume none to start over here)") from None
        try:
            self._restore_state(ckpt)
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError,
                IndexError, OverflowError) as e:
            # A damaged or hand-made trainer state must not surface as a raw traceback.
            raise CheckpointError(f"{ckpt.path}: the trainer state (EMA, optimizer, RNG) "
                                  f"cannot be restored: {type(e).__name__}: "
                                  f"{str(e)[:200]}") from None
        step = self.step_count
        dist.print0(f"resuming from {ckpt.path} at step {step}")
        old_world, old_batch = self._saved_world
        if old_world != self.world:
            dist.print0(f"the checkpoint was written by {old_world} process(es), this run has "
                        f"{self.world}: global batch {old_batch} -> {self.global_batch}; data "
                        "order and noise continue from the checkpoint; ranks without a saved "
                        "dropout RNG state are seeded from (seed, rank, step)")
        own = ckpt.path.parent.resolve() == (self.out / "checkpoints").resolve()
        if dist.is_main():
            self._tidy_run_dir(step, own)
        if own:
            # This step is already on disk: never re-save it at the end (with keep=1, a kill
            # between the swap's two renames would leave no complete checkpoint at all).
            self.last_ckpt = ckpt.path

    def _restore_state(self, ckpt) -> None:
        """EMA, optimizer, scaler, RNG states and counters; any damage raises (the caller
        reports it in one line)."""
        state = ckpt.trainer_state
        self.ema.load_state_dict(ckpt.ema)
        load_optimizer_state(self.optimizer, optimizer_from_flat(ckpt.trainer_tensors,
                                                                 state["optimizer"]))
        if self.scaler.is_enabled() and "grad_scaler" in state:
            self.scaler.load_state_dict(state["grad_scaler"])
        self.step_count = step = _count({"step": ckpt.step}, "step", 0)
        saved = {kind: ckpt.trainer_tensors[f"rng.{kind}.rank{self.rank}"]
                 for kind in ("torch", "cuda")
                 if f"rng.{kind}.rank{self.rank}" in ckpt.trainer_tensors}
        if not set_rng_state(self.device, saved):
            # written by fewer processes (or on the CPU): a new, reproducible dropout stream
            torch.manual_seed(_dropout_seed(self.cfg.train.seed, self.rank, step))
        self.timesteps.load_state_dict(ckpt.trainer_tensors)
        self.images_seen = _count(state, "images_seen", 0)
        self.skipped_total = _count(state, "skipped", 0)
        self.overflow_total = _count(state, "overflow", 0)
        self._restore_data_state(state.get("data", {}))
        self.health.load(self.skipped_total, self.overflow_total)
        self.window.load(state.get("log_window"))
        self._saved_world = (_count(state, "world_size", 1),
                             _count(state, "global_batch", 0) or "?")
        self._keep_threads(_count(state, "threads", 0))

    def _keep_threads(self, saved: int) -> None:
        """--threads 0 (auto) on a resume: the run's own thread count, not today's load's, so
        the CPU results continue bit-identically (the count changes float rounding)."""
        if self.cfg.train.threads == 0 and saved and saved != torch.get_num_threads() \
                and not os.environ.get("OMP_NUM_THREADS"):
            dist.print0(f"resuming with the run's {saved} thread(s) (--threads N to change)")
            torch.set_num_threads(min(saved, os.cpu_count() or saved))

    def _tidy_run_dir(self, step: int, own: bool) -> None:
        """Move aside what the resumed checkpoint makes stale (never delete it): run_dir.py."""
        if own:
            branch = run_dir.branch_aside(self.out, step, METRIC_FIELDS)
            if branch is not None:
                dist.print0(f"resuming an older checkpoint starts a branch: the newer "
                            f"checkpoints, their metric rows and pictures moved to {branch}")
        else:  # a checkpoint from elsewhere: an earlier run here (allowed by --overwrite)
            self._move_old_run_aside()
        cut = run_dir.trim_metrics(self.out / "metrics.csv", step, METRIC_FIELDS,
                                   self.out / "metrics.cut.csv")
        if cut:
            dist.print0(f"moved {cut} metric row(s) after step {step} (not in the checkpoint) "
                        f"to {self.out / 'metrics.cut.csv'}")

    def _restore_data_state(self, saved: dict) -> None:
        """The loader's state is the stream position (images_seen) plus what defines the
        stream; checkpoints without it (older ones) used the same stream."""
        self.bad_files = _count(saved, "bad_files", self.bad_files)
        self._stream_saved = saved.get("stream")  # checked by the loader
        order = saved.get("order", DATA_ORDER)
        if order != DATA_ORDER:
            raise CheckpointError(f"the checkpoint's data order {order!r} is unknown to this "
                                  "ddpmkit; upgrade ddpmkit to resume it")
        n = _count(saved, "examples", len(self.data))
        if n != len(self.data):
            dist.print0(f"warning: the checkpoint was trained on {n} examples, the data now "
                        f"has {len(self.data)}: the epoch permutations differ, so the order "
                        "does not continue exactly")

    def announce(self) -> None:
        cfg, data = self.cfg, self.data
        n_params = sum(p.numel() for p in self.model.parameters())
        dist.print0(f"data: {cfg.data.name} ({len(data)} examples, shape {tuple(data.shape)}, "
                    f"levels {data.levels}{self._data_note()}); model: {n_params / 1e6:.2f}M "
                    f"parameters; device: {self.device}; processes: {self.world}")
        if dist.is_main():
            _check_disk_space(self.out, self.model, cfg.train.keep_checkpoints)

    # ---- one step ------------------------------------------------------------------------

    def _data_note(self) -> str:
        labels = self.data.class_names
        note = f", {len(labels)} classes" if labels else ""
        if not self.data.in_memory:
            workers = self.cfg.data.workers
            note += f", read by {'auto' if workers < 0 else workers} worker(s) per process"
        return note

    def _next_examples(self) -> Batch:
        """This rank's rows of the next global batch of the data stream (CPU, float32)."""
        if self.loader is None:
            self.loader = Loader(self.data, self.cfg.train.seed, self.images_seen,
                                 self.global_batch, torch.as_tensor(self.mine),
                                 self.cfg.data.workers, pin_memory=self.device.type == "cuda",
                                 keys=self._key_log.enabled, rank=self.rank, world=self.world,
                                 stream_state=self._stream_saved)
        batch = self.loader.next()
        self._bad_here += len(batch.bad)
        self._key_log.write(self.step_count + 1, batch.keys)
        return batch

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                              torch.Tensor | None]:
        """This rank's examples of the global batch, on the device: x0, t, weights, noise, and
        the labels (None for an unconditional run).

        Timestep, flip and noise of each example are drawn on the device from its place in
        the data stream alone (:mod:`.randomness`), so the global batch is never built; so is
        a class-conditional run's label dropout (:func:`label_uniforms`).
        """
        data = self.data
        batch = self._next_examples()
        x0 = batch.data.to(self.device, non_blocking=True)  # uint8 from files: 4x fewer bytes
        u, noise = self.draws([self.images_seen + i for i in self.mine], data.shape)
        u_t = u[:, 0]
        if self.cfg.train.stratified_t:
            u_t = stratify(u_t, torch.as_tensor(self.mine), self.global_batch)
        t, w = self.timesteps.from_uniform(u_t)
        mirror = u[:, 1] < 0.5 if self.cfg.data.flip and data.kind == "image" else None
        x0 = Batch.to_float(x0, mirror)
        y = None
        if self.labels is not None:
            stream = [self.images_seen + i for i in self.mine]
            y = drop_labels(batch.y, self.cfg.train.class_dropout,
                            self.cfg.model.num_classes,
                            label_uniforms(self.cfg.train.seed, stream)).to(self.device)
        return x0, t, w, noise, y

    def _forward_backward(self, x0, t, w, noise, y=None
                          ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Losses and gradients of this rank's micro-batches; returns the per-example losses
        ([grad_accum * batch_size], this rank's) and the loss terms."""
        tc = self.cfg.train
        micro = tc.batch_size
        step_losses, step_terms = [], {"mse": [], "vb": []}
        for a in range(tc.grad_accum):
            sl = slice(a * micro, (a + 1) * micro)
            sync = contextlib.nullcontext()
            if self.ddp is not None and a < tc.grad_accum - 1:
                sync = self.ddp.no_sync()  # all-reduce once, after the last micro-batch
            with sync:
                with torch.autocast(self.device.type, dtype=self.amp_dtype,
                                    enabled=self.use_amp):
                    terms = self.diffusion.training_losses(
                        self.train_model, x0[sl], t[sl], noise[sl], levels=self.data.levels,
                        y=None if y is None else y[sl])
                loss = (terms["loss"] * w[sl]).mean() / tc.grad_accum
                self.scaler.scale(loss).backward()
            step_losses.append(terms["loss"].detach())
            for k in step_terms:
                if k in terms:
                    step_terms[k].append(terms[k].detach())
        return torch.cat(step_losses).float(), step_terms

    def _gather(self, local: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every rank's per-example losses and timesteps in global-batch order (device)."""
        if not self.distributed:
            return local, t
        tc = self.cfg.train
        both = torch.stack([local, t.float()])  # t < 2**24: exact in float32
        gathered = [torch.empty_like(both) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, both)
        # rank-major within each accumulation step, as sliced in __init__ (self.mine)
        full = torch.stack(gathered).reshape(self.world, 2, tc.grad_accum, tc.batch_size)
        full = full.permute(1, 2, 0, 3).reshape(2, -1)
        return full[0], full[1].long()

    def _term_means(self, step_terms: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
        """The global batch's mean of each loss term (every rank has as many examples)."""
        names = [k for k, v in step_terms.items() if v]
        if not names:
            return {}
        means = torch.stack([torch.cat(step_terms[k]).float().mean() for k in names])
        if self.distributed:
            torch.distributed.all_reduce(means)
            means = means / self.world
        return dict(zip(names, means.unbind(), strict=True))

    def step(self) -> _StepResult:
        """One optimizer step on the global batch; skipped, and counted, if not finite.

        Nothing here waits for the device: the skip is decided on the device (see
        :meth:`_apply_update`), and the figures go into device tensors read at log rows.
        """
        tc = self.cfg.train
        lr = _lr_at(self.cfg, self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x0, t, w, noise, y = self._batch()
        self.optimizer.zero_grad(set_to_none=True)
        local, step_terms = self._forward_backward(x0, t, w, noise, y)
        full, t_all = self._gather(local, t)
        loss = full.mean()
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf"))
        finite_loss = torch.isfinite(loss)
        ok = finite_loss & torch.isfinite(grad_norm)
        self._apply_update(ok)
        self.ema.update(self.model, ema_decay(
            self.global_batch, self.images_seen + self.global_batch, tc.ema_half_life,
            tc.ema_rampup), where=ok)
        self.timesteps.update(t_all, full, ok)
        values = {"loss": loss, "grad_norm": grad_norm, **self._term_means(step_terms)}
        self.window.add(ok, values, t_all, full, self.diffusion.num_timesteps)
        self.health.update(self.step_count + 1, ok, finite_loss, self.scaler.is_enabled(),
                           tc.max_bad_steps, values)
        self.last_loss = torch.where(ok, loss.detach(), self.last_loss)
        self.images_seen += self.global_batch
        self.step_count += 1
        return _StepResult(lr, loss, grad_norm, ok)

    def _apply_update(self, ok: torch.Tensor) -> None:
        """optimizer.step() unless ``ok`` is false, decided on the device where it can be.

        With fp16 the GradScaler skips overflowing steps itself (a non-finite gradient is
        exactly when ``ok`` is false with a finite loss). PyTorch's fused AdamW takes a
        ``found_inf`` flag and then leaves weights, moments and step count unchanged (the
        protocol GradScaler uses); only the non-fused fallback needs one host read per step.
        """
        if self.scaler.is_enabled():
            self.scaler.step(self.optimizer)
            self.scaler.update()
        elif getattr(self.optimizer, "_step_supports_amp_scaling", False):
            self.optimizer.grad_scale = None
            self.optimizer.found_inf = (~ok).float()
            try:
                self.optimizer.step()
            finally:
                del self.optimizer.grad_scale, self.optimizer.found_inf
        elif bool(ok):
            self.optimizer.step()

    def _check_health(self) -> None:
        """Read the skip counters (one host read); stop if the run has diverged."""
        skipped, overflow, trip = self.health.read()
        self.skipped_total, self.overflow_total = skipped, overflow
        if trip is None:
            return
        parts = ", ".join(f"{k}={v:.4g}" for k, v in trip.values.items()
                          if k not in ("loss", "grad_norm"))
        # Steps are counted from 1 here, as in checkpoint names (step-N: N done). A skipped
        # step never changes the weights, and no checkpoint is written after the trip, so
        # every checkpoint on disk holds finite ones.
        raise TrainingDiverged(
            f"{self.cfg.train.max_bad_steps} consecutive non-finite steps ending at step "
            f"{trip.step} (loss={trip.values['loss']:.4g}, "
            f"grad_norm={trip.values['grad_norm']:.4g}{', ' if parts else ''}{parts}; "
            f"{trip.skipped} skipped in all); the last checkpoint "
            f"({self.last_ckpt or 'none written yet'}) is untouched: resume from it with a "
            "lower --lr, keep --grad-clip on, use --precision fp32 / bf16, or check the data "
            "for NaN")

    # ---- log, save -----------------------------------------------------------------------

    def log(self, lr: float, fid: float | None = None) -> dict:
        """One row of metrics.csv (rank 0); returns it."""
        now = time.time()
        row = {"step": self.step_count, "images": self.images_seen, "lr": lr,
               "steps_per_s": (self.step_count - self._last_log_step)
               / max(now - self._last_log_time, 1e-9),
               "elapsed_s": now - self.t_start, "skipped": self.skipped_total,
               "overflow": self.overflow_total, "bad_files": self.bad_files,
               **self.window.row(), "fid": "" if fid is None else fid}
        _append_metrics(self.out / "metrics.csv", row)
        if self.tb is not None:
            self.tb.row(row)
        self._last_log_time, self._last_log_step = now, self.step_count
        return row

    def _count_bad_files(self) -> None:
        """Add every rank's unreadable images since the last call (all ranks call it)."""
        n = self._bad_here
        if self.distributed:
            t = torch.tensor([n], dtype=torch.float64, device=dist.comm_device())
            torch.distributed.all_reduce(t)
            n = int(t.item())
        self.bad_files += n
        self._bad_here = 0

    def save(self) -> Path:
        """Rank 0 writes; every rank must call it (it gathers each rank's dropout RNG)."""
        self._check_health()  # never write a checkpoint after the run diverged
        step = self.step_count
        rng = {kind: dist.all_gather_equal(state)
               for kind, state in rng_state(self.device).items()}
        stream = self._stream_position()
        path = self.out / "checkpoints" / f"step-{step:07d}"
        if dist.is_main():
            opt_tensors, opt_meta = optimizer_to_flat(self.optimizer.state_dict())
            tensors = {**opt_tensors, **self.timesteps.state_dict()}
            for kind, states in rng.items():
                for r, state in enumerate(states):
                    tensors[f"rng.{kind}.rank{r}"] = state
            data_state = {"order": DATA_ORDER, "examples": len(self.data),
                          "bad_files": self.bad_files}
            if stream is not None:
                data_state["stream"] = stream
            state = {"optimizer": opt_meta, "images_seen": self.images_seen, "data": data_state,
                     "skipped": self.skipped_total, "overflow": self.overflow_total,
                     "world_size": self.world, "global_batch": self.global_batch,
                     "log_window": self.window.state(), "threads": torch.get_num_threads()}
            if self.scaler.is_enabled():
                state["grad_scaler"] = self.scaler.state_dict()
            path = save_checkpoint(self.out, step, self.model.state_dict(),
                                   self.ema.state_dict(), tensors, state, self.cfg,
                                   keep=self.cfg.train.keep_checkpoints)
        dist.barrier()  # nobody reads or prunes checkpoints while rank 0 writes
        return path

    def _stream_position(self) -> dict | None:
        """A pipe: stream's position, every rank's slots (every rank calls it); None for
        indexed data, whose position is images_seen."""
        if self.loader is None or self.loader.stream is None:
            return self._stream_saved
        from ..data.stream import merge_ranks
        mine = self.loader.stream.to_dict()
        t = torch.tensor([[mine["origin"], mine["batches"]], *mine["cursors"]], dtype=torch.int64)
        per_rank = [{**mine, "cursors": r[1:].tolist()} for r in dist.all_gather_equal(t)]
        return merge_ranks(per_rank)

    # ---- the loop ------------------------------------------------------------------------

    def _should_stop(self, stop: _Stop) -> str | None:
        """Why the loop ends before the next step, or None. Every rank gets the same answer."""
        tc = self.cfg.train
        if tc.max_steps and self.step_count >= tc.max_steps:
            return "max_steps"
        # All ranks must leave at the same step: the clock or a signal can reach them a step
        # apart, and a rank that runs on would wait forever in DDP's all-reduce.
        time_up = bool(tc.max_minutes) and time.time() - self.t_start >= tc.max_minutes * 60
        signalled = stop.reason is not None
        if self.distributed:
            time_up, signalled = dist.any_rank(time_up, signalled)
        if time_up:
            return "max_minutes"
        if signalled:
            return stop.reason or "signal"
        if not tc.max_steps and not tc.max_minutes:
            raise ConfigError("set max_steps or max_minutes, or training never ends")
        return None

    def _progress_bar(self, progress: bool):
        if not (progress and dist.is_main()):
            return None
        from tqdm import tqdm
        return tqdm(total=self.cfg.train.max_steps or None, initial=self.step_count,
                    unit="step", dynamic_ncols=True, desc="train")

    def _advance_bar(self, bar, row: dict | None) -> None:
        tc = self.cfg.train
        if tc.max_minutes:  # the ETA of a run stopped by the clock: steps that fit in it
            rate = bar.format_dict.get("rate") or 0
            left = tc.max_minutes * 60 - (time.time() - self.t_start)
            by_time = self.step_count + int(rate * max(left, 0))
            total = min(tc.max_steps, by_time) if tc.max_steps else by_time
            bar.total = max(total, self.step_count)
        if row is not None:  # figures change at log rows (reading them each step would stall)
            loss = row["loss"]
            bar.set_postfix(loss=f"{loss:.4f}" if loss != "" else "-", lr=f"{row['lr']:.2e}",
                            refresh=False)
        bar.update(1)

    def _log_samples(self, x: torch.Tensor | None) -> None:
        if self.tb is not None and x is not None:
            self.tb.samples(x, self.step_count)

    def run(self, progress: bool) -> TrainResult:
        tc, cfg = self.cfg.train, self.cfg
        self._wrap_for_training()
        self._last_log_time, self._last_log_step = time.time(), self.step_count
        bar = self._progress_bar(progress)
        with _Stop() as stop:
            while True:
                stopped = self._should_stop(stop)
                if stopped:
                    break
                r = self.step()
                step, row, fid = self.step_count, None, None
                fid_step = bool(tc.fid_every) and step % tc.fid_every == 0
                if fid_step:
                    fid = self.fid.measure(self.model, self.ema, self.diffusion)  # all ranks
                logged = step % tc.log_every == 0 or fid_step  # an FID step gets its own row
                if logged or step % tc.checkpoint_every == 0:
                    self._count_bad_files()  # all ranks
                if logged:
                    self._check_health()  # on every rank, so that all stop together
                    if dist.is_main():
                        row = self.log(r.lr, fid)
                if bar is not None:
                    self._advance_bar(bar, row)
                if step % tc.checkpoint_every == 0:
                    self.last_ckpt = self.save()
                if tc.sample_every and step % tc.sample_every == 0:
                    self._log_samples(write_pictures(cfg, self.model, self.ema,
                                                     self.diffusion, self.data, self.out,
                                                     step=step))
                    dist.barrier()  # the others wait here, not in the next step's all-reduce
            # Still under _Stop: a SIGTERM arriving during this last save must not cut it short.
            if bar is not None:
                bar.close()
            if self.loader is not None:
                self.loader.close()
            self._count_bad_files()
            if self.last_ckpt is None or int(self.last_ckpt.name[5:]) != self.step_count:
                self.last_ckpt = self.save()
        elapsed = time.time() - self.t_start
        dist.print0(f"stopped ({stopped}) at step {self.step_count} after {elapsed / 60:.1f} "
                    f"min; checkpoint: {self.last_ckpt}")
        if stopped != "signal":
            self._log_samples(write_pictures(cfg, self.model, self.ema, self.diffusion,
                                             self.data, self.out, step=None))
        if self.tb is not None:
            self.tb.close()
        dist.barrier()
        return TrainResult(self.out, self.step_count, self.last_ckpt, stopped,
                           float(self.last_loss), elapsed)


class _TrainingFID:
    """FID of ``fid_num`` EMA samples against ``fid_ref``, every ``fid_every`` steps.

    Set up before the first step, so that missing Inception weights or a bad reference stop
    the run at once. The reference statistics are computed once (rank 0). Every measurement
    uses the same seeds (the sample options' seed), so the curve shows the model changing,
    not the noise; each rank draws its share of the samples.
    """

    def __init__(self, cfg: RunConfig, data: Dataset, device: torch.device):
        from ..fid import Statistics, feature_stats, load_inception, open_source, source_features
        if data.kind != "image":
            raise ConfigError("fid_every needs image data; 2-D point sets have no FID")
        tc = cfg.train
        self.cfg, self.shape, self.device = cfg, data.shape, device
        ref = open_source(tc.fid_ref)
        self.net = load_inception(tc.fid_inception or None, device=device)
        self.ref_stats = None
        if isinstance(ref, Statistics):
            self.ref_stats = (ref.mu, ref.sigma)
        elif dist.is_main():
            dist.print0(f"FID reference: Inception features of {ref.count} images of "
                        f"{tc.fid_ref}")
            feats = source_features(self.net, ref, cfg.sample.batch_size, progress=False)
            self.ref_stats = feature_stats(feats.pool)

    def measure(self, model: nn.Module, ema: EMA, diffusion: GaussianDiffusion) -> float | None:
        """The FID on rank 0, None on the other ranks (every rank must call it)."""
        from ..fid import features_fid, sample_features
        ema_model = build_model(self.cfg.model).to(self.device)
        ema.copy_to(ema_model)
        sc, tc = self.cfg.sample, self.cfg.train
        feats = sample_features(ema_model.eval(), diffusion, self.shape, self.net, tc.fid_num,
                                batch_size=sc.batch_size, sampler=sc.sampler,
                                steps=sc.steps or None, seed=sc.seed, spacing=sc.spacing,
                                eta=sc.eta, clip_denoised=sc.clip_denoised,
                                device=self.device, progress=False)
        return None if feats is None else features_fid(feats.pool, *self.ref_stats)


def write_pictures(cfg: RunConfig, model: nn.Module, ema: EMA, diffusion: GaussianDiffusion,
                   data: Dataset, out: Path, step: int | None) -> torch.Tensor | None:
    """Sample grid (or 2-D scatter) from the EMA weights, and the loss curve; rank 0 only.
    Returns the samples (CPU), None on the other ranks."""
    if not dist.is_main():
        return None
    from .. import viz
    from ..sampling import sample

    device = next(model.parameters()).device
    ema_model = build_model(cfg.model).to(device)
    ema.copy_to(ema_model)
    ema_model.eval()
    sc = cfg.sample
    n = sc.num if data.kind == "image" else max(sc.num, 2000)
    K = cfg.model.num_classes
    y, nrow = None, None
    if K and data.kind == "image":  # one row per class, at the configured guidance
        nrow = max(1, n // K)
        n = nrow * K
        y = torch.arange(K).repeat_interleave(nrow)
    x = sample(ema_model, diffusion, (n, *data.shape), method=sc.sampler, steps=sc.steps or None,
               spacing=sc.spacing, eta=sc.eta, clip_denoised=clip_denoised_for(data.kind),
               seeds=range(sc.seed, sc.seed + n), device=device, y=y,
               guidance=sc.guidance if y is not None else 1.0)
    suffix = f"-{step:07d}" if step is not None else ""
    if data.kind == "image":
        viz.save_image_grid(x.cpu(), out / f"samples{suffix}.png", nrow=nrow)
    else:
        viz.plot_points(x.cpu(), out / f"samples{suffix}.png", data=data.x[:5000],
                        title=f"{cfg.data.name}: samples over data")
    if (out / "metrics.csv").exists():
        with contextlib.suppress(Exception):  # a plot must never kill a run
            viz.plot_loss_curve(out / "metrics.csv", out / "loss.png",
                                panels=("fid",) if cfg.train.fid_every else ())
    return x.cpu()
