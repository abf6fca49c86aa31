"""The training loop: data -> losses -> AdamW -> EMA, with checkpoints, metrics and pictures.

Randomness is arranged so that a run is reproducible and resumable exactly, and does not
depend on the number of processes:
- the data order is a fresh permutation per epoch, seeded by (seed, epoch);
- timesteps, noise and flips for the *global* batch come from one generator shared by all
  ranks (each rank uses its slice), whose state is saved in every checkpoint;
- the global RNG (dropout) is saved too.
So an interrupted run resumed from step k continues bit-identically on the CPU.
"""

from __future__ import annotations

import contextlib
import csv
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
from ..config import RunConfig
from ..data import Dataset, load_data, random_flip
from ..diffusion import GaussianDiffusion
from ..errors import CheckpointError, ConfigError, DdpmkitError
from ..load import (  # noqa: F401  LoadedRun and load_for_inference moved to ddpmkit.load
    LoadedRun,
    build_diffusion,
    clip_denoised_for,
    load_for_inference,
    state_dict_mismatch,
)
from ..nn import build_model
from ..runtime import tune_allocator
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
from .timesteps import TimestepSampler

METRIC_FIELDS = ["step", "images", "loss", "mse", "vb", "lr", "grad_norm", "loss_q0", "loss_q1",
                 "loss_q2", "loss_q3", "steps_per_s", "elapsed_s", "skipped"]


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

def resolve_config(cfg: RunConfig, data: Dataset) -> RunConfig:
    """Fill the network's input/output shape from the data and the variance type."""
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
    if cfg.train.batch_size > len(data):
        raise ConfigError(f"batch_size={cfg.train.batch_size} is larger than the data set "
                          f"({len(data)} examples)")
    return cfg.replace(model=model)


class _Stop:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (then saves)."""

    def __init__(self):
        self.reason: str | None = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.reason is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        self.reason = "signal"
        dist.print0(f"\nreceived {signal.Signals(signum).name}: saving a checkpoint, then "
                    "stopping (press again to abort)")

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)
        return False


def _check_writable(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{os.getpid()}"
        probe.write_bytes(b"x" * 4096)
        probe.unlink()
    except OSError as e:
        raise DdpmkitError(f"cannot write to the output folder {out}: {e.strerror or e}") \
            from None


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


class _DataOrder:
    """Global batch indices for each step: epoch permutations seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Indices of examples start .. start + count - 1 of the endless shuffled stream."""
        out = []
        while count > 0:
            epoch, offset = divmod(start, self.n)
            take = min(count, self.n - offset)
            out.append(self._permutation(epoch)[offset:offset + take])
            start, count = start + take, count - take
        return torch.cat(out)


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


def _lr_at(cfg, step: int) -> float:
    tc = cfg.train
    if tc.warmup_steps > 0 and step < tc.warmup_steps:
        return tc.lr * (step + 1) / tc.warmup_steps
    if tc.lr_decay == "cosine" and tc.max_steps > 0:
        progress = min(1.0, (step - tc.warmup_steps) / max(1, tc.max_steps - tc.warmup_steps))
        return tc.lr * 0.5 * (1 + math.cos(math.pi * progress))
    return tc.lr


def _dropout_seed(seed: int, rank: int, step: int) -> int:
    """A fresh dropout seed for a rank that has no saved RNG state (start, or more ranks)."""
    return (seed * 1_000_003 + rank) * 1_000_033 + step


def _any_rank(*flags: bool) -> list[bool]:
    """Each flag OR-ed over all ranks (one small all-reduce)."""
    t = torch.tensor([float(f) for f in flags], device=dist.comm_device())
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def _trim_metrics(path: Path, step: int) -> None:
    """On resume, drop metric rows past the checkpoint so the CSV matches the run.

    A row cut short by a kill (fewer fields than the header) is dropped too, and the file is
    rewritten through a temporary file, so a kill during the rewrite loses nothing.
    """
    if not path.exists():
        return
    try:
        with open(path, newline="") as f:
            rows = [r for r in csv.DictReader(f) if r.get("step", "").isdigit() and
                    int(r["step"]) <= step and None not in r.values() and None not in r]
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
        os.replace(tmp, path)
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DdpmkitError(f"cannot rewrite {path} on resume: {e}; move it away to start a "
                           "fresh metrics file") from None


def _append_metrics(path: Path, row: dict) -> None:
    """One row onto metrics.csv (header first); a full disk is a one-line error."""
    try:
        new = not path.exists()
        with open(path, "a", newline="") as f:
            w = csv.DictWriter(f, fieldnames=METRIC_FIELDS)
            if new:
                w.writeheader()
            w.writerow(row)
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
        f = open(out / ".lock", "a+")  # held open for the whole run: closing unlocks
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

    def release(self) -> None:
        if self.file is not None:
            self.file.close()  # closing drops the flock
            self.file = None


def train(cfg: RunConfig, out_dir: str | Path, resume: str | None = "auto",
          progress: bool = True) -> TrainResult:
    """Train per ``cfg`` into ``out_dir``; ``resume`` is "auto", None or a checkpoint path.

    Tunes this process's allocator first (:func:`ddpmkit.runtime.tune_allocator`: freed memory
    stays in the process; ``DDPMKIT_TUNE_MALLOC=0`` opts out). ``out_dir`` is locked for the
    run: a second trainer on the same folder stops with a ConfigError.
    """
    out = Path(out_dir)
    lock = None
    if dist.is_main():  # before the process group exists: reads RANK from the environment
        _check_writable(out)
        lock = _RunDirLock(out)
    try:
        return _train(cfg, out, resume, progress)
    finally:
        if lock is not None:
            lock.release()


def _train(cfg: RunConfig, out: Path, resume: str | None, progress: bool) -> TrainResult:
    t_start = time.time()
    tune_allocator()
    trainer = _Trainer(cfg, out, t_start)
    trainer.restore(trainer.find_checkpoint(resume), resume)
    trainer.announce()
    return trainer.run(progress)


@dataclass
class _LogWindow:
    """The metric row in progress: per-step values since the last log row, and the loss summed
    by timestep quartile. Saved in checkpoints, so that a resume between two log steps writes
    the rows of a straight run."""

    values: dict[str, list[float]] = dataclasses.field(
        default_factory=lambda: {k: [] for k in ("loss", "mse", "vb", "grad_norm")})
    quartile_sum: torch.Tensor = dataclasses.field(
        default_factory=lambda: torch.zeros(4, dtype=torch.float64))
    quartile_n: torch.Tensor = dataclasses.field(default_factory=lambda: torch.zeros(4))

    def state(self) -> dict:
        return {"window": self.values, "quartile_sum": self.quartile_sum.tolist(),
                "quartile_n": self.quartile_n.tolist()}

    def load(self, saved: dict) -> None:
        # Metrics are not worth failing a resume over: bad ones are reset.
        with contextlib.suppress(KeyError, TypeError, ValueError, RuntimeError):
            values = {k: [float(v) for v in saved["window"][k]] for k in self.values}
            q_sum = torch.tensor(saved["quartile_sum"], dtype=torch.float64).reshape(4)
            q_n = torch.tensor(saved["quartile_n"], dtype=torch.float32).reshape(4)
            self.values, self.quartile_sum, self.quartile_n = values, q_sum, q_n

    def row(self) -> dict:
        """The means since the last row (then cleared)."""
        row = {k: sum(v) / len(v) if v else "" for k, v in self.values.items()}
        for i in range(4):
            n = self.quartile_n[i]
            row[f"loss_q{i}"] = float(self.quartile_sum[i] / n) if n > 0 else ""
        self.values = {k: [] for k in self.values}
        self.quartile_sum.zero_()
        self.quartile_n.zero_()
        return row


@dataclass
class _StepResult:
    """One global step's outcome as every rank sees it."""

    lr: float
    loss: float                       # mean over the global batch
    grad_norm: float
    per_example: torch.Tensor         # [global_batch] losses, in global-batch order (CPU)
    t: torch.Tensor                   # [global_batch] timesteps
    term_means: dict[str, float]      # global means of the loss terms ("mse", "vb")


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
        self.cfg = cfg = resolve_config(cfg, self.data)
        tc = cfg.train
        if self.data.skipped:
            dist.print0(f"skipped {len(self.data.skipped)} unreadable file(s); first: "
                        f"{self.data.skipped[0]}")
        self.diffusion = build_diffusion(cfg)
        self._build_model()
        self.timesteps = TimestepSampler(self.diffusion.num_timesteps, tc.timestep_sampler)
        self.order = _DataOrder(len(self.data), tc.seed)
        self.global_batch = tc.batch_size * self.world * tc.grad_accum
        self.step_count, self.images_seen, self.bad_in_a_row, self.skipped_total = 0, 0, 0, 0
        self.window = _LogWindow()
        self.last_ckpt: Path | None = None

    def _build_model(self) -> None:
        tc = self.cfg.train
        # The same initial weights on every rank (DDP would broadcast rank 0's anyway, but the
        # EMA copies them first); then each rank its own dropout stream, saved and restored.
        torch.manual_seed(tc.seed)
        self.model = build_model(self.cfg.model).to(self.device)
        if self.rank > 0:
            torch.manual_seed(_dropout_seed(tc.seed, self.rank, 0))
        if self.device.type == "cuda":
            self.model = self.model.to(memory_format=torch.channels_last)
        self.ema = EMA(self.model)
        self.optimizer = make_optimizer(self.model, tc.lr, tc.weight_decay)
        self.gen = torch.Generator().manual_seed(tc.seed)

    def _wrap_for_training(self) -> None:
        """DDP, torch.compile and mixed precision around the plain module."""
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
        self.amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(tc.precision)
        self.use_amp = self.amp_dtype is not None and self.device.type == "cuda"
        if self.amp_dtype is not None and self.device.type != "cuda":
            dist.print0(f"precision={tc.precision} needs CUDA; training in fp32 on {self.device}")
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.use_amp and self.amp_dtype == torch.float16)

    # ---- restore -------------------------------------------------------------------------

    def find_checkpoint(self, resume: str | None) -> str | Path | None:
        if resume == "auto":
            found = list_checkpoints(self.out)
            # rank 0's choice, so that every rank resumes from the same step even if a listing
            # of a shared file system lags
            return dist.broadcast_object(found[-1] if found else None)
        return resume or None

    def restore(self, ckpt_path: str | Path | None, resume: str | None) -> None:
        """Load weights, EMA, optimizer, RNG states and counters from a checkpoint, or say
        that a new run starts; then write the resolved config.json."""
        if ckpt_path is None:
            dist.print0(f"starting a new run in {self.out}")
            broken = incomplete_checkpoints(self.out) if resume == "auto" and dist.is_main() \
                else []
            if broken:  # never silently: the user may have expected to resume from these
                dist.print0(f"ignoring {len(broken)} incomplete checkpoint folder(s) in "
                            f"{self.out / 'checkpoints'} (e.g. {broken[-1].name}: files are "
                            "missing)")
        else:
            self._restore_from(load_checkpoint(ckpt_path))
        if dist.is_main():
            write_json_atomic(self.out / "config.json", self.cfg.to_json())

    def _restore_from(self, ckpt) -> None:
        tc = self.cfg.train
        try:
            self.model.load_state_dict(ckpt.model)
        except RuntimeError as e:
            raise CheckpointError(f"{ckpt.path} does not fit this config's network: "
                                  f"{state_dict_mismatch(e)} (train into a new --out, or pass "
                                  "--resume none to start over here)") from None
        try:
            self.ema.load_state_dict(ckpt.ema)
            self.optimizer.load_state_dict(optimizer_from_flat(
                ckpt.trainer_tensors, ckpt.trainer_state["optimizer"]))
            self.gen.set_state(ckpt.trainer_tensors["rng.generator"])
        except (KeyError, ValueError, RuntimeError, TypeError, AttributeError) as e:
            # A damaged or hand-made trainer state must not surface as a raw traceback.
            raise CheckpointError(f"{ckpt.path}: the trainer state (EMA, optimizer, RNG) "
                                  f"cannot be restored: {type(e).__name__}: "
                                  f"{str(e)[:200]}") from None
        self.step_count = step = ckpt.step
        key = f"rng.torch.rank{self.rank}"
        if key in ckpt.trainer_tensors:
            torch.set_rng_state(ckpt.trainer_tensors[key])
        else:  # written by fewer processes: a new, reproducible dropout stream for this rank
            torch.manual_seed(_dropout_seed(tc.seed, self.rank, step))
        self.timesteps.load_state_dict(ckpt.trainer_tensors)
        self.images_seen = int(ckpt.trainer_state.get("images_seen", 0))
        self.skipped_total = int(ckpt.trainer_state.get("skipped", 0))
        self.window.load(ckpt.trainer_state.get("log_window"))
        dist.print0(f"resuming from {ckpt.path} at step {step}")
        old_world = int(ckpt.trainer_state.get("world_size", 1))
        if old_world != self.world:
            old_batch = int(ckpt.trainer_state.get("global_batch", 0)) or "?"
            dist.print0(f"the checkpoint was written by {old_world} process(es), this run has "
                        f"{self.world}: global batch {old_batch} -> {self.global_batch}; data "
                        "order and noise continue from the checkpoint; ranks without a saved "
                        "dropout RNG state are seeded from (seed, rank, step)")
        if dist.is_main():
            _trim_metrics(self.out / "metrics.csv", step)
        if ckpt.path.parent.resolve() == (self.out / "checkpoints").resolve():
            # This step is already on disk: never re-save it at the end (with keep=1, a kill
            # between the swap's two renames would leave no complete checkpoint at all).
            self.last_ckpt = ckpt.path

    def announce(self) -> None:
        cfg, data = self.cfg, self.data
        n_params = sum(p.numel() for p in self.model.parameters())
        dist.print0(f"data: {cfg.data.name} ({len(data)} examples, shape {tuple(data.shape)}, "
                    f"levels {data.levels}); model: {n_params / 1e6:.2f}M parameters; device: "
                    f"{self.device}; processes: {self.world}")
        if dist.is_main():
            _check_disk_space(self.out, self.model, cfg.train.keep_checkpoints)

    # ---- one step ------------------------------------------------------------------------

    def _batch(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The global batch's randomness, identical on every rank: x0, t, weights, noise."""
        data = self.data
        idx = self.order.indices(self.images_seen, self.global_batch)
        t_all, w_all = self.timesteps.sample(self.global_batch, self.gen)
        noise_all = torch.randn((self.global_batch, *data.shape), generator=self.gen)
        x0_all = data.x[idx]
        if self.cfg.data.flip and data.kind == "image":
            x0_all = random_flip(x0_all, self.gen)
        return x0_all, t_all, w_all, noise_all

    def _forward_backward(self, x0_all, t_all, w_all, noise_all
                          ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Losses and gradients of this rank's micro-batches; returns the per-example losses
        ([grad_accum * batch_size], this rank's) and the loss terms."""
        tc, device = self.cfg.train, self.device
        micro, world = tc.batch_size, self.world
        step_losses, step_terms = [], {"mse": [], "vb": []}
        for a in range(tc.grad_accum):
            lo = (a * world + self.rank) * micro
            sl = slice(lo, lo + micro)
            x0 = x0_all[sl].to(device, non_blocking=True)
            t = t_all[sl].to(device)
            noise = noise_all[sl].to(device, non_blocking=True)
            sync = contextlib.nullcontext()
            if self.ddp is not None and a < tc.grad_accum - 1:
                sync = self.ddp.no_sync()  # all-reduce once, after the last micro-batch
            with sync:
                with torch.autocast(device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                    terms = self.diffusion.training_losses(self.train_model, x0, t, noise,
                                                           levels=self.data.levels)
                loss = (terms["loss"] * w_all[sl].to(device)).mean() / tc.grad_accum
                self.scaler.scale(loss).backward()
            step_losses.append(terms["loss"].detach())
            for k in step_terms:
                if k in terms:
                    step_terms[k].append(terms[k].detach())
        return torch.cat(step_losses).float(), step_terms

    def _gather_losses(self, local: torch.Tensor) -> torch.Tensor:
        """Every rank's per-example losses in global-batch order, on the CPU."""
        if not self.distributed:
            return local.cpu()
        tc = self.cfg.train
        gathered = [torch.empty_like(local) for _ in range(self.world)]
        torch.distributed.all_gather(gathered, local)
        # rank-major within each accumulation step, as sliced in _forward_backward
        full = torch.stack(gathered).reshape(self.world, tc.grad_accum, tc.batch_size)
        return full.transpose(0, 1).reshape(-1).cpu()

    def _term_means(self, step_terms: dict[str, list[torch.Tensor]]) -> dict[str, float]:
        """The global batch's mean of each loss term (every rank has as many examples)."""
        names = [k for k, v in step_terms.items() if v]
        if not names:
            return {}
        means = torch.stack([torch.cat(step_terms[k]).float().mean() for k in names])
        if self.distributed:
            torch.distributed.all_reduce(means)
            means = means / self.world
        return dict(zip(names, means.tolist(), strict=True))

    def step(self) -> _StepResult:
        """One optimizer step on the global batch (skipped, and counted, if not finite)."""
        tc = self.cfg.train
        lr = _lr_at(self.cfg, self.step_count)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x0_all, t_all, w_all, noise_all = self._batch()
        self.optimizer.zero_grad(set_to_none=True)
        local, step_terms = self._forward_backward(x0_all, t_all, w_all, noise_all)
        full = self._gather_losses(local)
        loss_value = float(full.mean())
        self.scaler.unscale_(self.optimizer)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            self.model.parameters(), tc.grad_clip if tc.grad_clip > 0 else float("inf")))
        result = _StepResult(lr, loss_value, grad_norm, full, t_all, {})
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            self._skip_step(result, step_terms)
        else:
            self.bad_in_a_row = 0
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.ema.update(self.model, ema_decay(
                self.global_batch, self.images_seen + self.global_batch, tc.ema_half_life,
                tc.ema_rampup))
            self.timesteps.update(t_all, full)
            result.term_means = self._term_means(step_terms)
        self.images_seen += self.global_batch
        self.step_count += 1
        return result

    def _skip_step(self, result: _StepResult, step_terms: dict) -> None:
        """A non-finite loss or gradient: no update; too many in a row end the run."""
        self.bad_in_a_row += 1
        self.skipped_total += 1
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.update()
        if self.bad_in_a_row < self.cfg.train.max_bad_steps:
            return
        parts = ", ".join(f"{k}={float(torch.cat(v).mean()):.4g}"
                          for k, v in step_terms.items() if v)
        # Steps are counted from 1 here, as in checkpoint names (step-N: N done). A skipped
        # step never changes the weights, so every checkpoint on disk holds finite ones.
        raise TrainingDiverged(
            f"{self.bad_in_a_row} consecutive non-finite steps ending at step "
            f"{self.step_count + 1} (loss={result.loss:.4g}, grad_norm={result.grad_norm:.4g}"
            f"{', ' if parts else ''}{parts}; {self.skipped_total} skipped in all); the last "
            f"checkpoint ({self.last_ckpt or 'none written yet'}) is untouched: resume from "
            "it with a lower --lr, keep --grad-clip on, use --precision fp32 / bf16, or check "
            "the data for NaN")

    # ---- log, save -----------------------------------------------------------------------

    def record(self, r: _StepResult) -> None:
        """Add a finished (not skipped) step to the metric row in progress."""
        w = self.window
        w.values["loss"].append(r.loss)
        w.values["grad_norm"].append(r.grad_norm)
        for k, m in r.term_means.items():
            w.values[k].append(m)
        q = (r.t * 4 // self.diffusion.num_timesteps).clamp(max=3)
        w.quartile_sum.index_add_(0, q, r.per_example.double())
        w.quartile_n.index_add_(0, q, torch.ones_like(r.per_example))

    def log(self, lr: float) -> None:
        """One row of metrics.csv (rank 0)."""
        now = time.time()
        row = {"step": self.step_count, "images": self.images_seen, "lr": lr,
               "steps_per_s": (self.step_count - self._last_log_step)
               / max(now - self._last_log_time, 1e-9),
               "elapsed_s": now - self.t_start, "skipped": self.skipped_total,
               **self.window.row()}
        _append_metrics(self.out / "metrics.csv", row)
        self._last_log_time, self._last_log_step = now, self.step_count

    def save(self) -> Path:
        """Rank 0 writes; every rank must call it (it gathers each rank's dropout RNG)."""
        step = self.step_count
        rng_states = dist.all_gather_equal(torch.get_rng_state())
        path = self.out / "checkpoints" / f"step-{step:07d}"
        if dist.is_main():
            opt_tensors, opt_meta = optimizer_to_flat(self.optimizer.state_dict())
            tensors = {**opt_tensors, **self.timesteps.state_dict(),
                       "rng.generator": self.gen.get_state()}
            for r, state in enumerate(rng_states):
                tensors[f"rng.torch.rank{r}"] = state
            state = {"optimizer": opt_meta, "images_seen": self.images_seen,
                     "skipped": self.skipped_total, "world_size": self.world,
                     "global_batch": self.global_batch, "log_window": self.window.state()}
            path = save_checkpoint(self.out, step, self.model.state_dict(),
                                   self.ema.state_dict(), tensors, state, self.cfg,
                                   keep=self.cfg.train.keep_checkpoints)
        dist.barrier()  # nobody reads or prunes checkpoints while rank 0 writes
        return path

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
            time_up, signalled = _any_rank(time_up, signalled)
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

    def _advance_bar(self, bar, r: _StepResult, final_loss: float) -> None:
        tc = self.cfg.train
        if tc.max_minutes:  # the ETA of a run stopped by the clock: steps that fit in it
            rate = bar.format_dict.get("rate") or 0
            left = tc.max_minutes * 60 - (time.time() - self.t_start)
            by_time = self.step_count + int(rate * max(left, 0))
            total = min(tc.max_steps, by_time) if tc.max_steps else by_time
            bar.total = max(total, self.step_count)
        bar.set_postfix(loss=f"{final_loss:.4f}", lr=f"{r.lr:.2e}", refresh=False)
        bar.update(1)

    def run(self, progress: bool) -> TrainResult:
        tc, cfg = self.cfg.train, self.cfg
        self._wrap_for_training()
        self._last_log_time, self._last_log_step = time.time(), self.step_count
        final_loss = float("nan")
        bar = self._progress_bar(progress)
        with _Stop() as stop:
            while True:
                stopped = self._should_stop(stop)
                if stopped:
                    break
                r = self.step()
                if self.bad_in_a_row == 0:
                    final_loss = r.loss
                    self.record(r)
                if bar is not None:
                    self._advance_bar(bar, r, final_loss)
                step = self.step_count
                if step % tc.log_every == 0 and dist.is_main():
                    self.log(r.lr)
                if step % tc.checkpoint_every == 0:
                    self.last_ckpt = self.save()
                if tc.sample_every and step % tc.sample_every == 0:
                    write_pictures(cfg, self.model, self.ema, self.diffusion, self.data,
                                   self.out, step=step)
                    dist.barrier()  # the others wait here, not in the next step's all-reduce
            # Still under _Stop: a SIGTERM arriving during this last save must not cut it short.
            if bar is not None:
                bar.close()
            if self.last_ckpt is None or int(self.last_ckpt.name[5:]) != self.step_count:
                self.last_ckpt = self.save()
        elapsed = time.time() - self.t_start
        dist.print0(f"stopped ({stopped}) at step {self.step_count} after {elapsed / 60:.1f} "
                    f"min; checkpoint: {self.last_ckpt}")
        if stopped != "signal":
            write_pictures(cfg, self.model, self.ema, self.diffusion, self.data, self.out,
                           step=None)
        dist.barrier()
        return TrainResult(self.out, self.step_count, self.last_ckpt, stopped, final_loss,
                           elapsed)


def write_pictures(cfg: RunConfig, model: nn.Module, ema: EMA, diffusion: GaussianDiffusion,
                   data: Dataset, out: Path, step: int | None) -> None:
    """Sample grid (or 2-D scatter) from the EMA weights, and the loss curve; rank 0 only."""
    if not dist.is_main():
        return
    from .. import viz
    from ..sampling import sample

    device = next(model.parameters()).device
    ema_model = build_model(cfg.model).to(device)
    ema.copy_to(ema_model)
    ema_model.eval()
    sc = cfg.sample
    n = sc.num if data.kind == "image" else max(sc.num, 2000)
    x = sample(ema_model, diffusion, (n, *data.shape), method=sc.sampler, steps=sc.steps or None,
               spacing=sc.spacing, eta=sc.eta, clip_denoised=clip_denoised_for(data.kind),
               seeds=range(sc.seed, sc.seed + n), device=device)
    suffix = f"-{step:07d}" if step is not None else ""
    if data.kind == "image":
        viz.save_image_grid(x.cpu(), out / f"samples{suffix}.png")
    else:
        viz.plot_points(x.cpu(), out / f"samples{suffix}.png", data=data.x[:5000],
                        title=f"{cfg.data.name}: samples over data")
    if (out / "metrics.csv").exists():
        with contextlib.suppress(Exception):  # a plot must never kill a run
            viz.plot_loss_curve(out / "metrics.csv", out / "loss.png")
