"""ddpmkit's CIFAR-10 U-Net against diffusers' ``UNet2DModel`` (google/ddpm-cifar10-32 layout).

One command, one table, one final JSON line::

    pip install -e '.[bench]'          # diffusers, for the other contender only
    python benchmarks/speed.py                     # batch 16, 5 rounds, all cores
    python benchmarks/speed.py --quick             # a smoke run (~3 minutes on 2 cores)
    python benchmarks/speed.py --rounds 9 --threads 1

Each contender runs in its own worker process, set up as its library runs by default: the
ddpmkit worker tunes the allocator as ``ddpmkit train`` does (``ddpmkit.runtime``), the
diffusers worker does not. A third worker, diffusers with ddpmkit's allocator setting, shows
how much of the gap that setting alone explains (``--no-tuned-diffusers`` drops it). The parent
alternates the workers round by round (A, B, C, A, B, C, ...) after warm-up, so that load from
other processes hits all alike, and reports medians; a ratio is the median of the per-round
ratios.

All networks get the same weights (ours copied into diffusers' by
``ddpmkit.interop.unet.diffusers_twin``: the mapped config, and the rename table
``DIFFUSERS_RENAME``), and the parent checks that their outputs agree before timing anything.

Measured, per contender:
  train   forward + backward + AdamW step + EMA update on the DDPM simple loss, images/s
          (ours: ``GaussianDiffusion.training_losses``, ``ddpmkit.train.ema.EMA`` and
          ``ddpmkit.train.trainer.make_optimizer``, the trainer's AdamW, fused where PyTorch
          has it; diffusers: ``DDPMScheduler.add_noise``, MSE, ``torch.optim.AdamW`` and
          ``diffusers.training_utils.EMAModel``; each library at its default settings)
  forward one sampling-step network call under ``torch.inference_mode()``, images/s
  GFLOP/s the network's model FLOPs (counted with ``FlopCounterMode`` on the reference
          network: nearest upsample + 3x3 conv) times images/s; "% ceil" against the best of
          an fp32 GEMM and a 3x3 conv measured in the same run (start, between phases, end)
  peak MB peak memory of two training steps from a fresh worker: CPU, the rise of the
          resident set's high-water mark (weights' gradients, AdamW state, EMA and
          activations); CUDA, ``torch.cuda.max_memory_allocated``
  bpd     full-bound bits/dim evaluation (``GaussianDiffusion.bits_per_dim``, T = 1000,
          every term) throughput in images/s, the diffusers net wrapped as ``model(x, t)``

diffusers is imported here only; ddpmkit never imports it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ddpmkit.config import MODEL_PRESETS
from ddpmkit.diffusion import GaussianDiffusion
from ddpmkit.interop.unet import diffusers_twin
from ddpmkit.nn.unet import UNet, count_parameters
from ddpmkit.runtime import set_tf32, tune_allocator
from ddpmkit.schedules import linear_betas
from ddpmkit.train.ema import EMA
from ddpmkit.train.trainer import make_optimizer

T_STEPS = 1000
LR = 2e-4
EMA_DECAY = 0.9999

# "diffusers-tuned": diffusers with ddpmkit's allocator setting (ddpmkit.runtime);
# "ddpmkit-default-malloc": ddpmkit with glibc's defaults (DDPMKIT_TUNE_MALLOC=0).
CONTENDERS = ("ddpmkit", "diffusers", "diffusers-tuned", "ddpmkit-default-malloc")
DEFAULT_CONTENDERS = ("ddpmkit", "diffusers", "diffusers-tuned")
LABELS = {"ddpmkit": "ddpmkit", "diffusers": "diffusers",
          "diffusers-tuned": "diffusers, tuned malloc",
          "ddpmkit-default-malloc": "ddpmkit, default malloc"}


def import_diffusers():
    try:
        import diffusers  # noqa: F401
        from diffusers import DDPMScheduler, UNet2DModel
        from diffusers.training_utils import EMAModel
    except ImportError as e:
        sys.exit(f"diffusers is needed for this benchmark: pip install -e '.[bench]' ({e})")
    return diffusers.__version__, UNet2DModel, DDPMScheduler, EMAModel


# ---- machine ---------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def all_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def load_average() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device) -> float:
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


# ---- contenders ------------------------------------------------------------------------------

class Setup:
    """The options every contender is built with."""

    def __init__(self, args: argparse.Namespace, device: torch.device):
        self.device = device
        self.batch = args.batch
        self.channels_last = args.channels_last
        self.bf16 = args.bf16
        self.compile = args.compile

    def autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return torch.autocast(self.device.type, enabled=False)

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        return model

    def input(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(self.device)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x


def build_ours(seed: int = 0) -> UNet:
    torch.manual_seed(seed)
    # zero_init=False: outputs depend on the inputs (the agreement check needs that; the
    # speed does not depend on the values).
    return UNet(MODEL_PRESETS["cifar10"], zero_init=False)


Net = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def network_call(name: str, model: nn.Module) -> Net:
    if name.startswith("diffusers"):
        return lambda x, t: model(x, t).sample
    return model


def make_batch(setup: Setup, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    b = setup.batch
    # Data-like x0 in [-1, 1] on the 256-level grid, plus the noise and steps of one step.
    x0 = (torch.randint(0, 256, (b, 3, 32, 32), generator=g).float() / 127.5 - 1.0)
    noise = torch.randn(b, 3, 32, 32, generator=g)
    t = torch.randint(0, T_STEPS, (b,), generator=g)
    return setup.input(x0), setup.input(noise), t.to(setup.device)


def train_step_fn(name: str, model: nn.Module, setup: Setup, libs) -> Callable[[], None]:
    """One training step of ``name``'s library on a fixed batch; the model in train mode."""
    model.train()
    x0, noise, t = make_batch(setup)
    fn = torch.compile(model) if setup.compile else model
    if name == "ddpmkit":
        # The trainer's AdamW (fused where PyTorch has it), torch's default weight decay as theirs.
        opt = make_optimizer(model, LR, weight_decay=0.01)
        diffusion = GaussianDiffusion(linear_betas(T_STEPS))
        ema = EMA(model)

        def step():
            with setup.autocast():
                loss = diffusion.training_losses(fn, x0, t, noise)["loss"].mean()
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.update(model, EMA_DECAY)
    else:
        _, _, DDPMScheduler, EMAModel = libs
        scheduler = DDPMScheduler(num_train_timesteps=T_STEPS, beta_schedule="linear")
        opt = torch.optim.AdamW(model.parameters(), lr=LR)
        ema = EMAModel(model.parameters(), decay=EMA_DECAY)
        if setup.device.type == "cuda":
            ema.to(setup.device)

        def step():
            noisy = scheduler.add_noise(x0, noise, t)
            with setup.autocast():
                pred = fn(noisy, t).sample
            loss = F.mse_loss(pred.float(), noise)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            ema.step(model.parameters())
    return step


def forward_fn(name: str, model: nn.Module, setup: Setup) -> Callable[[], None]:
    model.eval()
    _, noise, t = make_batch(setup, seed=2)
    call = network_call(name, torch.compile(model) if setup.compile else model)

    def step():
        with torch.inference_mode(), setup.autocast():
            call(noise, t)
    return step


# ---- measurements ----------------------------------------------------------------------------

def machine_ceiling(device: torch.device, reps: int, bf16: bool) -> dict:
    """Best fp32 (bf16 with --bf16) GFLOP/s of square GEMMs and a 16x128x32x32 -> 128 3x3 conv."""
    dtype = torch.bfloat16 if bf16 else torch.float32
    res = {}
    g = torch.Generator().manual_seed(0)
    for n in (1024, 2048):
        a = torch.randn(n, n, generator=g).to(device, dtype)
        b = torch.randn(n, n, generator=g).to(device, dtype)
        timed(lambda a=a, b=b: a @ b, device)
        best = min(timed(lambda a=a, b=b: a @ b, device) for _ in range(reps))
        res[f"gemm{n}"] = 2 * n**3 / best / 1e9
    x = torch.randn(16, 128, 32, 32, generator=g).to(device, dtype)
    w = torch.randn(128, 128, 3, 3, generator=g).to(device, dtype)
    flops = 2 * 16 * 128 * 32 * 32 * 128 * 9
    for tag, fmt in (("conv3x3", torch.contiguous_format), ("conv3x3_cl", torch.channels_last)):
        xx, ww = x.contiguous(memory_format=fmt), w.contiguous(memory_format=fmt)
        timed(lambda xx=xx, ww=ww: F.conv2d(xx, ww, padding=1), device)
        best = min(timed(lambda xx=xx, ww=ww: F.conv2d(xx, ww, padding=1), device)
                   for _ in range(reps))
        res[tag] = flops / best / 1e9
    res["ceiling"] = max(res.values())
    return {k: round(v, 1) for k, v in res.items()}


def count_flops(call: Net, model: nn.Module) -> tuple[float, float]:
    """(forward, forward + backward) FLOPs per image, fp32 on the CPU, 2 images."""
    from torch.utils.flop_counter import FlopCounterMode

    n = 2
    x = torch.randn(n, 3, 32, 32)
    t = torch.randint(0, T_STEPS, (n,))
    model.eval()
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        call(x, t)
    fwd = fc.get_total_flops() / n
    model.train()
    with FlopCounterMode(display=False) as fc:
        call(x, t).square().mean().backward()
    model.zero_grad(set_to_none=True)
    return fwd, fc.get_total_flops() / n


# ---- worker processes ------------------------------------------------------------------------

def peak_rss_kb(reset: bool = False) -> int:
    """This process's peak resident set size in KiB, optionally reset to the current size.

    Linux: VmHWM, reset through /proc/self/clear_refs. Not ``ru_maxrss``: Linux carries it
    over ``execve`` from the parent, so a child of a large process would start at the
    parent's peak and show no rise. Elsewhere ``ru_maxrss`` (no reset; the rise is then a
    lower bound when the build itself peaked higher).
    """
    try:
        if reset:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    scale = 1 if sys.platform.startswith("linux") else 1 / 1024  # macOS: bytes
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale)


def reply(obj: dict) -> None:
    # Tagged, so that anything a library prints on stdout cannot be mistaken for a reply.
    print("@@" + json.dumps(obj), flush=True)


def peak_memory(step: Callable[[], None], steps: int, device: torch.device) -> dict:
    """The peak-memory rise over ``steps`` calls of ``step`` (MB), from the state now."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated()
        return dict(rise_mb=(peak - base) / 2**20, peak_mb=peak / 2**20, base_mb=base / 2**20)
    before = peak_rss_kb(reset=True)
    for _ in range(steps):
        step()
    after = peak_rss_kb()
    return dict(rise_mb=(after - before) / 1024, peak_mb=after / 1024, base_mb=before / 1024)


def worker_main(spec: dict) -> None:
    """One contender: build it, report its peak memory, then time what the parent asks for.

    Commands on stdin, one per line: ``train``, ``forward``, ``bpd``, ``quit``; each gets one
    tagged JSON reply with the seconds the call took (and the bound, for ``bpd``).
    """
    name = spec["name"]
    tuned = tune_allocator() if name in ("ddpmkit", "diffusers-tuned") else False
    lib = "ddpmkit" if name.startswith("ddpmkit") else "diffusers"
    device = torch.device(spec["device"])
    torch.set_num_threads(spec["threads"])
    set_tf32(spec["tf32"])  # both switches one way: cuDNN's TF32 default is on, matmul's off
    setup = Setup(argparse.Namespace(**spec["setup"]), device)
    libs = None if lib == "ddpmkit" else import_diffusers()

    def build() -> nn.Module:
        ours = build_ours()
        return setup.prepare(ours if lib == "ddpmkit" else diffusers_twin(ours))

    # A model to train and an untrained twin for forward and bits/dim, so that the bound is
    # computed from the same weights in every worker (training moves each net its own way:
    # each draws its own dropout masks).
    train_model, eval_model = build(), build()
    forward = forward_fn(lib, eval_model, setup)
    memory = {"forward": peak_memory(forward, 1, device)} if spec["memory"] else {}
    train = train_step_fn(lib, train_model, setup, libs)
    if spec["memory"]:
        # From a fresh model: gradients, AdamW's moments and the EMA copy appear in step 1.
        memory["train"] = peak_memory(train, 2, device)
    bpd_x0 = None
    reply(dict(ready=True, tuned_allocator=tuned, memory=memory))
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "train":
            reply(dict(s=timed(train, device)))
        elif cmd == "forward":
            reply(dict(s=timed(forward, device)))
        elif cmd == "bpd":
            if bpd_x0 is None:
                g = torch.Generator().manual_seed(3)
                bpd_x0 = setup.input(torch.randint(0, 256, (spec["bpd_images"], 3, 32, 32),
                                                   generator=g).float() / 127.5 - 1.0)
            diffusion = GaussianDiffusion(linear_betas(T_STEPS))
            call = network_call(lib, eval_model)
            eval_model.eval()
            out = {}

            def run(call=call, out=out, x0=bpd_x0, diffusion=diffusion):
                with setup.autocast():
                    out["bpd"] = diffusion.bits_per_dim(call, x0, batch_size=250)["total"]
            s = timed(run, device)
            reply(dict(s=s, bpd=[float(v) for v in out["bpd"]]))
        elif cmd == "quit":
            return
        else:
            raise SystemExit(f"worker: unknown command {cmd!r}")


class Worker:
    """The parent's handle on one worker process."""

    def __init__(self, spec: dict):
        self.name = spec["name"]
        self.proc = subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), "--_worker", json.dumps(spec)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("@@"):
                return json.loads(line[2:])
        raise RuntimeError(f"worker {self.name} exited (status {self.proc.wait()}); its "
                           "error is printed above")

    def ask(self, cmd: str) -> dict:
        self.proc.stdin.write(cmd + "\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write("quit\n")
                self.proc.stdin.flush()
            except BrokenPipeError:
                pass
            self.proc.wait(timeout=60)


def alternate(workers: list[Worker], cmd: str, rounds: int, warmup: int) -> dict:
    """Seconds per call for each worker, asked in turn (A, B, C, A, ...) after warm-up."""
    for _ in range(warmup):
        for w in workers:
            w.ask(cmd)
    times: dict[str, list[float]] = {w.name: [] for w in workers}
    extra: dict[str, dict] = {}
    for _ in range(rounds):
        for w in workers:
            r = w.ask(cmd)
            times[w.name].append(r["s"])
            extra[w.name] = r
    return dict(times=times, last=extra)


def summarize(times: dict[str, list[float]], images_per_call: int) -> dict:
    out = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        out[k] = dict(img_s=images_per_call / med, median_s=med, min_s=min(ts), max_s=max(ts),
                      times_s=[round(x, 4) for x in ts])
    a = times["ddpmkit"]
    for k, b in times.items():
        if k == "ddpmkit":
            continue
        out[f"vs_{k}"] = dict(
            ratio_median_of_rounds=statistics.median(y / x for x, y in zip(a, b, strict=True)),
            ratio_of_medians=statistics.median(b) / statistics.median(a),
            ratio_of_best=min(b) / min(a))
    return out


# ---- main ------------------------------------------------------------------------------------

def _bool(text: str) -> bool:
    if text.strip().lower() in ("true", "yes", "on", "1"):
        return True
    if text.strip().lower() in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per measurement (5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (2)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for each worker (default: all cores of this process)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: batch 4, 2 rounds, 1 warm-up, bits/dim once each")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for all (CUDA mainly)")
    p.add_argument("--tf32", type=_bool, nargs="?", const=True, default=True, metavar="BOOL",
                   help="TF32 matmuls and convolutions on CUDA, as ddpmkit train/sample/eval "
                        "(default: true; false measures full float32)")
    p.add_argument("--channels-last", action="store_true",
                   help="all models and inputs in channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile every network")
    p.add_argument("--bpd-images", type=int, default=1,
                   help="images per bits/dim evaluation (each costs T = 1000 network calls)")
    p.add_argument("--bpd-rounds", type=int, default=1, help="bits/dim rounds per contender")
    p.add_argument("--no-bpd", action="store_true", help="skip the bits/dim measurement")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=None,
                   help="workers to compare, ddpmkit first and always (default: "
                        + " ".join(DEFAULT_CONTENDERS) + "; ddpmkit-default-malloc is "
                        "ddpmkit with glibc's allocator defaults)")
    p.add_argument("--no-tuned-diffusers", action="store_true",
                   help="leave out the diffusers worker with ddpmkit's allocator setting")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.rounds, args.warmup, args.bpd_rounds = 4, 2, 1, 1
    return args


def fmt_row(cells, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                     for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def choose_contenders(args: argparse.Namespace) -> list[str]:
    """ddpmkit first, then the others asked for (minus those this platform cannot run)."""
    chosen = ["ddpmkit"] + [c for c in (args.contenders or DEFAULT_CONTENDERS)
                            if c != "ddpmkit"]
    if args.no_tuned_diffusers:
        chosen = [c for c in chosen if c != "diffusers-tuned"]
    if not sys.platform.startswith("linux"):  # the allocator setting is glibc's
        chosen = [c for c in chosen if c not in ("diffusers-tuned", "ddpmkit-default-malloc")]
    contenders = list(dict.fromkeys(chosen))
    if len(contenders) < 2:
        sys.exit("speed.py: nothing to compare ddpmkit with")
    return contenders


def describe_run(args, device: torch.device, threads: int, libs, contenders) -> tuple[dict, dict]:
    """The machine and the configuration, printed as a header and returned for the JSON."""
    machine = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        cpu=cpu_model(), cores=all_cores(), threads=threads, device=str(device),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        torch=torch.__version__, diffusers=libs[0], python=platform.python_version(),
        load_average_start=load_average())
    config = dict(batch=args.batch, rounds=args.rounds, warmup=args.warmup, dtype="fp32",
                  bf16_autocast=args.bf16, tf32=args.tf32, channels_last=args.channels_last,
                  compile=args.compile, timesteps=T_STEPS, contenders=contenders)
    print(f"# {machine['date']}  {machine['cpu']}, {machine['cores']} cores, "
          f"{threads} threads, device {device}"
          + (f" ({machine['gpu']})" if machine["gpu"] else "")
          + f"; torch {torch.__version__}, diffusers {libs[0]}; load avg "
          f"{machine['load_average_start']}")
    print(f"# batch {args.batch}, {args.rounds} rounds after {args.warmup} warm-up, fp32"
          + (", bf16 autocast" if args.bf16 else "")
          + (", TF32 matmuls+convs" if args.tf32 and device.type == "cuda" else "")
          + (", channels_last" if args.channels_last else "")
          + (", torch.compile" if args.compile else ""), flush=True)
    return machine, config


def check_networks() -> tuple[dict, dict]:
    """Same weights in both networks: that they compute the same function, and their FLOPs."""
    ours_cpu = build_ours()
    theirs_cpu = diffusers_twin(ours_cpu)
    assert count_parameters(ours_cpu) == count_parameters(theirs_cpu) == 35_746_307
    g = torch.Generator().manual_seed(4)
    xc, tc = torch.randn(4, 3, 32, 32, generator=g), torch.tensor([0, 10, 500, 999])
    ours_cpu.eval()
    theirs_cpu.eval()
    with torch.no_grad():
        a, b = ours_cpu(xc, tc), theirs_cpu(xc, tc).sample
    agree = dict(max_abs_diff=float((a - b).abs().max()), max_abs_output=float(a.abs().max()))
    print(f"# outputs agree: max |ours - diffusers| = {agree['max_abs_diff']:.2e} "
          f"(outputs up to {agree['max_abs_output']:.2f}), 35,746,307 parameters each",
          flush=True)
    # Model FLOPs on the reference network (diffusers: upsample + 3x3 conv); ours executes
    # fewer (its CPU upsample folds the conv, see docs/speed.md).
    ref_fwd, ref_train = count_flops(network_call("diffusers", theirs_cpu), theirs_cpu)
    our_fwd, our_train = count_flops(ours_cpu, ours_cpu)
    flops = dict(forward_gflop_per_image=ref_fwd / 1e9, train_gflop_per_image=ref_train / 1e9,
                 ddpmkit_executed_forward_gflop=our_fwd / 1e9,
                 ddpmkit_executed_train_gflop=our_train / 1e9)
    return agree, flops


def measure(args, device: torch.device, threads: int, contenders: list[str], ceilings: list,
            note) -> dict:
    """One worker at a time builds and measures its peak memory (alone on the machine), then
    all are timed in turn: train, forward, bits/dim; the machine's ceiling between phases."""
    setup_args = dict(batch=args.batch, channels_last=args.channels_last, bf16=args.bf16,
                      compile=args.compile)
    workers, ready = [], {}
    try:
        for name in contenders:
            w = Worker(dict(name=name, device=str(device), threads=threads, tf32=args.tf32,
                            setup=setup_args, memory=not args.no_memory,
                            bpd_images=args.bpd_images))
            workers.append(w)
            ready[name] = w.read()
            note(f"worker {name} ready (allocator tuned: {ready[name]['tuned_allocator']})")
        results: dict = {}
        if not args.no_memory:
            results["memory"] = {mode: {k: r["memory"][mode] for k, r in ready.items()}
                                 for mode in ("train", "forward")}
        for what in ("train", "forward"):
            run = alternate(workers, what, args.rounds, args.warmup)
            results[what] = summarize(run["times"], args.batch)
            # The ceiling again between phases (workers idle): this VM's speed drifts over
            # minutes, and a best-of taken at one slow moment would come out low.
            ceilings.append(machine_ceiling(device, reps=3 if args.quick else 5,
                                            bf16=args.bf16))
            first = contenders[1]
            note(f"{what} done ({results[what][f'vs_{first}']['ratio_median_of_rounds']:.3f}x"
                 f" {first})")
        if not args.no_bpd:
            run = alternate(workers, "bpd", args.bpd_rounds, 0)
            results["bits_per_dim"] = summarize(run["times"], args.bpd_images)
            bpd = {k: statistics.mean(r["bpd"]) for k, r in run["last"].items()}
            results["bits_per_dim"]["bpd"] = bpd
            results["bits_per_dim"]["bpd_abs_diff"] = max(bpd.values()) - min(bpd.values())
            note(f"bits/dim done (bpd {bpd}, max |diff| "
                 f"{results['bits_per_dim']['bpd_abs_diff']:.2e})")
    finally:
        for w in workers:
            w.close()
    return results


def summary_rows(contenders: list[str], results: dict, flops: dict, ceil: float
                 ) -> tuple[dict, dict, list[list[str]]]:
    """Per contender: img/s, GFLOP/s, share of the ceiling, memory; then ours / each other."""
    rows, summary = [], {}
    for k in contenders:
        tr, fw = results["train"][k]["img_s"], results["forward"][k]["img_s"]
        tg, fg = tr * flops["train_gflop_per_image"], fw * flops["forward_gflop_per_image"]
        mem = results.get("memory", {}).get("train", {}).get(k, {}).get("rise_mb")
        bpd = results.get("bits_per_dim", {}).get(k, {}).get("img_s")
        summary[k] = dict(train_img_s=tr, forward_img_s=fw, train_gflop_s=tg,
                          forward_gflop_s=fg, train_pct_ceiling=100 * tg / ceil,
                          forward_pct_ceiling=100 * fg / ceil, train_peak_mb=mem,
                          bpd_img_s=bpd)
        rows.append([LABELS[k], f"{tr:.2f}", f"{fw:.2f}", f"{tg:.1f}", f"{fg:.1f}",
                     f"{100 * tg / ceil:.0f}%", f"{100 * fg / ceil:.0f}%",
                     "-" if mem is None else f"{mem:.0f}",
                     "-" if bpd is None else f"{bpd:.4f}"])
    ratios = {}
    for other in contenders[1:]:
        r = ratios[other] = dict(
            train=results["train"][f"vs_{other}"]["ratio_median_of_rounds"],
            forward=results["forward"][f"vs_{other}"]["ratio_median_of_rounds"])
        if "bits_per_dim" in results:
            r["bits_per_dim"] = results["bits_per_dim"][f"vs_{other}"]["ratio_median_of_rounds"]
        if "memory" in results:
            m = results["memory"]["train"]
            r["train_peak_memory"] = m["ddpmkit"]["rise_mb"] / m[other]["rise_mb"]
        rows.append([f"ours / {LABELS[other]}", f"{r['train']:.3f}x", f"{r['forward']:.3f}x",
                     "", "", "", "",
                     f"{r['train_peak_memory']:.2f}x" if "train_peak_memory" in r else "-",
                     f"{r['bits_per_dim']:.3f}x" if "bits_per_dim" in r else "-"])
    return summary, ratios, rows


def print_report(contenders, results, flops, ceiling, ceilings, machine, rows) -> None:
    """The table, then the lines that say how its figures were made."""
    header = ["contender", "train img/s", "fwd img/s", "train GFLOP/s", "fwd GFLOP/s",
              "train %ceil", "fwd %ceil", "train peak MB", "bpd img/s"]
    widths = [max(len(h), 10) for h in header]
    widths[0] = max(len(LABELS[c]) for c in contenders) + 6
    print()
    print(fmt_row(header, widths))
    for r in rows:
        print(fmt_row(r, widths))
    print()
    print(f"# model FLOPs per image: forward {flops['forward_gflop_per_image']:.2f} GFLOP, "
          f"train (fwd+bwd) {flops['train_gflop_per_image']:.2f} GFLOP; ddpmkit executes "
          f"{flops['ddpmkit_executed_forward_gflop']:.2f} / "
          f"{flops['ddpmkit_executed_train_gflop']:.2f}")
    for k in ("train", "forward", "bits_per_dim"):
        for other in contenders[1:]:
            if k in results:
                r = results[k][f"vs_{other}"]
                print(f"# {k}: ours / {LABELS[other]}: median of per-round ratios "
                      f"{r['ratio_median_of_rounds']:.3f}, ratio of medians "
                      f"{r['ratio_of_medians']:.3f}, ratio of best rounds {r['ratio_of_best']:.3f}")
    print(f"# ceiling (best of {len(ceilings)} measurements: start, between phases, end) "
          f"{ceiling['ceiling']:.0f} GFLOP/s: {ceiling}")
    print(f"# ratios are medians of per-round ratios (speed: >1 means ddpmkit faster; memory: "
          f"ddpmkit's rise / the other's); medians of rounds -> img/s; load avg "
          f"{machine['load_average_start']} -> {machine['load_average_end']}")
    if "memory" in results:
        fm = results["memory"]["forward"]
        print("# forward peak rise MB: " + ", ".join(
            f"{LABELS[k]} {fm[k]['rise_mb']:.0f}" for k in contenders))


def main(argv=None) -> None:
    args = parse_args(argv)
    if args._worker:
        worker_main(json.loads(args._worker))
        return
    t_start = time.perf_counter()

    def note(msg: str) -> None:
        print(f"# [{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    threads = args.threads or all_cores()
    torch.set_num_threads(threads)
    set_tf32(args.tf32)
    libs = import_diffusers()
    contenders = choose_contenders(args)
    machine, config = describe_run(args, device, threads, libs, contenders)
    agree, flops = check_networks()
    note("FLOPs counted")

    reps = 3 if args.quick else 5
    ceilings = [machine_ceiling(device, reps=reps, bf16=args.bf16)]
    note(f"ceiling GFLOP/s (start): {ceilings[0]}")
    results = measure(args, device, threads, contenders, ceilings, note)
    machine["load_average_end"] = load_average()
    ceilings.append(machine_ceiling(device, reps=reps, bf16=args.bf16))
    ceiling = {k: max(c[k] for c in ceilings) for k in ceilings[0]}

    summary, ratios, rows = summary_rows(contenders, results, flops, ceiling["ceiling"])
    print_report(contenders, results, flops, ceiling, ceilings, machine, rows)
    print(json.dumps(dict(machine=machine, config=config, agreement=agree, flops=flops,
                          ceiling_gflop_s=ceiling, summary=summary, ratios=ratios,
                          results=results)))


if __name__ == "__main__":
    main()
