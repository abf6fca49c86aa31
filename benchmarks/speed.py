"""ddpmkit's CIFAR-10 U-Net against diffusers' ``UNet2DModel`` (google/ddpm-cifar10-32 layout).

One process, one table, one final JSON line::

    pip install -e '.[bench]'          # diffusers, for the other contender only
    python benchmarks/speed.py                     # batch 16, 5 rounds, all cores
    python benchmarks/speed.py --quick             # a smoke run (~2 minutes on 2 cores)
    python benchmarks/speed.py --rounds 9 --threads 1

Both networks get the same weights (ours copied into diffusers' through the rename table of
``tests/test_nn.py``), and the script checks that their outputs agree before timing anything.
Every measurement alternates the contenders round by round (A, B, A, B, ...) after warm-up
and reports medians, so that load from other processes hits both alike; the ratio column is
the median of the per-round ratios.

Measured, per contender:
  train   forward + backward + AdamW step + EMA update on the DDPM simple loss, images/s
          (ours: ``GaussianDiffusion.training_losses`` and ``ddpmkit.train.ema.EMA``;
          diffusers: ``DDPMScheduler.add_noise``, MSE, ``diffusers.training_utils.EMAModel``;
          both ``torch.optim.AdamW``, each library at its default settings)
  forward one sampling-step network call under ``torch.inference_mode()``, images/s
  GFLOP/s the network's model FLOPs (counted with ``FlopCounterMode`` on the reference
          network: nearest upsample + 3x3 conv) times images/s; "% ceil" against the best of
          an fp32 GEMM and a 3x3 conv measured in the same run
  peak MB peak memory of a training step: CPU, the ru_maxrss rise in a child process per
          contender (weights, gradients, AdamW state and activations); CUDA,
          ``torch.cuda.max_memory_allocated``
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
from ddpmkit.nn.unet import UNet, count_parameters, to_diffusers_name
from ddpmkit.schedules import linear_betas
from ddpmkit.train.ema import EMA

T_STEPS = 1000
LR = 2e-4
EMA_DECAY = 0.9999

# google/ddpm-cifar10-32's published unet/config.json (attention at 16x16: the second down
# block and, counting from the lowest resolution, the third up block), dropout as ours.
DIFFUSERS_CONFIG = dict(
    sample_size=32, in_channels=3, out_channels=3, center_input_sample=False,
    time_embedding_type="positional", flip_sin_to_cos=False, freq_shift=1,
    down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
    block_out_channels=(128, 256, 256, 256), layers_per_block=2, mid_block_scale_factor=1,
    downsample_padding=0, act_fn="silu", attention_head_dim=None, norm_num_groups=32,
    norm_eps=1e-6, resnet_time_scale_shift="default", dropout=0.1,
)

CONTENDERS = ("ddpmkit", "diffusers")


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


def build_diffusers(ours: UNet | None, UNet2DModel) -> nn.Module:
    model = UNet2DModel(**DIFFUSERS_CONFIG)
    if ours is not None:
        state = {to_diffusers_name(k): v for k, v in ours.state_dict().items()}
        model.load_state_dict(state, strict=True)
    return model


Net = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def network_call(name: str, model: nn.Module) -> Net:
    if name == "diffusers":
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
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    fn = torch.compile(model) if setup.compile else model
    if name == "ddpmkit":
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

def alternate(fns: dict[str, Callable[[], None]], rounds: int, warmup: int,
              device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each function, called in turn (A, B, A, B, ...) after warm-up."""
    for _ in range(warmup):
        for fn in fns.values():
            timed(fn, device)
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            times[k].append(timed(fn, device))
    return times


def summarize(times: dict[str, list[float]], images_per_call: int) -> dict:
    out = {}
    for k, ts in times.items():
        med = statistics.median(ts)
        out[k] = dict(img_s=images_per_call / med, median_s=med, min_s=min(ts), max_s=max(ts),
                      times_s=[round(x, 4) for x in ts])
    a, b = times["ddpmkit"], times["diffusers"]
    out["ratio_median_of_rounds"] = statistics.median(y / x for x, y in zip(a, b, strict=True))
    out["ratio_of_medians"] = statistics.median(b) / statistics.median(a)
    out["ratio_of_best"] = min(b) / min(a)
    return out


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


def bits_per_dim_throughput(models: dict[str, nn.Module], setup: Setup, images: int,
                            rounds: int) -> dict:
    diffusion = GaussianDiffusion(linear_betas(T_STEPS))
    g = torch.Generator().manual_seed(3)
    x0 = (torch.randint(0, 256, (images, 3, 32, 32), generator=g).float() / 127.5 - 1.0)
    x0 = setup.input(x0)
    fns, values = {}, {}
    for name, model in models.items():
        model.eval()
        call = network_call(name, model)

        def run(name=name, call=call):
            with setup.autocast():
                out = diffusion.bits_per_dim(call, x0, batch_size=250)
            values[name] = out["total"]
        fns[name] = run
    times = alternate(fns, rounds, 0, setup.device)
    out = summarize(times, images)
    out["bpd"] = {k: float(v.mean()) for k, v in values.items()}
    out["bpd_abs_diff"] = float((values["ddpmkit"] - values["diffusers"]).abs().max())
    return out


# ---- peak memory (child process per contender on the CPU) -------------------------------------

def child_main(spec: dict) -> None:
    """Build one contender, then report the ru_maxrss rise over a few steps as JSON."""
    torch.set_num_threads(spec["threads"])
    args = argparse.Namespace(batch=spec["batch"], channels_last=spec["channels_last"],
                              bf16=spec["bf16"], compile=False)
    setup = Setup(args, torch.device("cpu"))
    libs = import_diffusers() if spec["name"] == "diffusers" else None
    model = build_ours() if spec["name"] == "ddpmkit" else build_diffusers(None, libs[1])
    model = setup.prepare(model)
    if spec["mode"] == "train":
        step = train_step_fn(spec["name"], model, setup, libs)
    else:
        step = forward_fn(spec["name"], model, setup)
    before = peak_rss_kb(reset=True)
    for _ in range(spec["steps"]):
        step()
    after = peak_rss_kb()
    print(json.dumps(dict(rise_mb=(after - before) / 1024, peak_mb=after / 1024,
                          base_mb=before / 1024)))


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


def peak_memory_cpu(args: argparse.Namespace, threads: int) -> dict:
    out = {}
    for mode in ("train", "forward"):
        for name in CONTENDERS:
            spec = dict(name=name, mode=mode, threads=threads, batch=args.batch,
                        channels_last=args.channels_last, bf16=args.bf16,
                        steps=2 if mode == "train" else 1)
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--_child",
                                   json.dumps(spec)], capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"memory child ({name}, {mode}) failed:\n{proc.stderr[-2000:]}")
            out.setdefault(mode, {})[name] = json.loads(proc.stdout.strip().splitlines()[-1])
    return out


def peak_memory_cuda(models: dict[str, nn.Module], setup: Setup, libs) -> dict:
    out = {}
    for mode in ("train", "forward"):
        for name, model in models.items():
            step = (train_step_fn(name, model, setup, libs) if mode == "train"
                    else forward_fn(name, model, setup))
            step()  # optimizer state and EMA copies exist from here on
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            out.setdefault(mode, {})[name] = dict(rise_mb=(peak - base) / 2**20,
                                                  peak_mb=peak / 2**20, base_mb=base / 2**20)
            model.zero_grad(set_to_none=True)
    return out


# ---- main ------------------------------------------------------------------------------------

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--batch", type=int, default=16, help="images per step (default 16)")
    p.add_argument("--rounds", type=int, default=5, help="timed rounds per measurement (5)")
    p.add_argument("--warmup", type=int, default=2, help="untimed rounds first (2)")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads for both (default: all cores of this process)")
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda")
    p.add_argument("--quick", action="store_true",
                   help="a smoke run: batch 4, 2 rounds, 1 warm-up, bits/dim once each")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast for both (CUDA mainly)")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls/convs on CUDA")
    p.add_argument("--channels-last", action="store_true",
                   help="both models and inputs in channels_last")
    p.add_argument("--compile", action="store_true", help="torch.compile both networks")
    p.add_argument("--bpd-images", type=int, default=1,
                   help="images per bits/dim evaluation (each costs T = 1000 network calls)")
    p.add_argument("--bpd-rounds", type=int, default=1, help="bits/dim rounds per contender")
    p.add_argument("--no-bpd", action="store_true", help="skip the bits/dim measurement")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory children")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.batch, args.rounds, args.warmup, args.bpd_rounds = 4, 2, 1, 1
    return args


def fmt_row(cells, widths):
    return "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                     for i, (c, w) in enumerate(zip(cells, widths, strict=True)))


def main(argv=None) -> None:
    args = parse_args(argv)
    t_start = time.perf_counter()

    def note(msg: str) -> None:
        print(f"# [{time.perf_counter() - t_start:6.0f} s] {msg}", flush=True)
    if args._child:
        child_main(json.loads(args._child))
        return
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available()
                          else ("cpu" if args.device == "auto" else args.device))
    threads = args.threads or all_cores()
    torch.set_num_threads(threads)
    if args.tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    libs = import_diffusers()
    setup = Setup(args, device)

    machine = dict(
        date=datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        cpu=cpu_model(), cores=all_cores(), threads=threads, device=str(device),
        gpu=torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        torch=torch.__version__, diffusers=libs[0], python=platform.python_version(),
        load_average_start=load_average())
    config = dict(batch=args.batch, rounds=args.rounds, warmup=args.warmup, dtype="fp32",
                  bf16_autocast=args.bf16, tf32=args.tf32, channels_last=args.channels_last,
                  compile=args.compile, timesteps=T_STEPS)
    print(f"# {machine['date']}  {machine['cpu']}, {machine['cores']} cores, "
          f"{threads} threads, device {device}"
          + (f" ({machine['gpu']})" if machine["gpu"] else "")
          + f"; torch {torch.__version__}, diffusers {libs[0]}; load avg "
          f"{machine['load_average_start']}")
    print(f"# batch {args.batch}, {args.rounds} rounds after {args.warmup} warm-up, fp32"
          + (", bf16 autocast" if args.bf16 else "") + (", TF32" if args.tf32 else "")
          + (", channels_last" if args.channels_last else "")
          + (", torch.compile" if args.compile else ""), flush=True)

    # Same weights in both; check that they compute the same function.
    ours_cpu = build_ours()
    theirs_cpu = build_diffusers(ours_cpu, libs[1])
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
    note("FLOPs counted")
    flops = dict(forward_gflop_per_image=ref_fwd / 1e9, train_gflop_per_image=ref_train / 1e9,
                 ddpmkit_executed_forward_gflop=our_fwd / 1e9,
                 ddpmkit_executed_train_gflop=our_train / 1e9)

    ceiling = machine_ceiling(device, reps=3 if args.quick else 5, bf16=args.bf16)
    note(f"ceiling GFLOP/s (start): {ceiling}")

    models = {"ddpmkit": setup.prepare(ours_cpu), "diffusers": setup.prepare(theirs_cpu)}
    results: dict = {}
    train = {k: train_step_fn(k, m, setup, libs) for k, m in models.items()}
    results["train"] = summarize(alternate(train, args.rounds, args.warmup, device), args.batch)
    del train
    for m in models.values():
        m.zero_grad(set_to_none=True)
    note(f"train done ({results['train']['ratio_median_of_rounds']:.3f}x)")
    fwd = {k: forward_fn(k, m, setup) for k, m in models.items()}
    results["forward"] = summarize(alternate(fwd, args.rounds, args.warmup, device), args.batch)
    note(f"forward done ({results['forward']['ratio_median_of_rounds']:.3f}x)")

    if not args.no_bpd:
        # The training rounds moved each network's weights its own way (own dropout masks):
        # give diffusers ours again, so the two bounds must agree as well.
        with torch.no_grad():
            models["diffusers"].load_state_dict(
                {to_diffusers_name(k): v for k, v in models["ddpmkit"].state_dict().items()})
        results["bits_per_dim"] = bits_per_dim_throughput(models, setup, args.bpd_images,
                                                          args.bpd_rounds)
        note(f"bits/dim done (bpd {results['bits_per_dim']['bpd']}, max |diff| "
             f"{results['bits_per_dim']['bpd_abs_diff']:.2e})")
    if not args.no_memory:
        results["memory"] = (peak_memory_cuda(models, setup, libs) if device.type == "cuda"
                             else peak_memory_cpu(args, threads))
        note("peak memory done")
    machine["load_average_end"] = load_average()
    # The ceiling again: a best-of at one moment of a shared machine can come out low.
    again = machine_ceiling(device, reps=3 if args.quick else 5, bf16=args.bf16)
    ceiling = {k: max(v, again[k]) for k, v in ceiling.items()}

    # ---- table ----
    ceil = ceiling["ceiling"]
    header = ["contender", "train img/s", "fwd img/s", "train GFLOP/s", "fwd GFLOP/s",
              "train %ceil", "fwd %ceil", "train peak MB", "bpd img/s"]
    widths = [max(len(h), 10) for h in header]
    rows, summary = [], {}
    for k in CONTENDERS:
        tr, fw = results["train"][k]["img_s"], results["forward"][k]["img_s"]
        tg, fg = tr * flops["train_gflop_per_image"], fw * flops["forward_gflop_per_image"]
        mem = results.get("memory", {}).get("train", {}).get(k, {}).get("rise_mb")
        bpd = results.get("bits_per_dim", {}).get(k, {}).get("img_s")
        summary[k] = dict(train_img_s=tr, forward_img_s=fw, train_gflop_s=tg,
                          forward_gflop_s=fg, train_pct_ceiling=100 * tg / ceil,
                          forward_pct_ceiling=100 * fg / ceil, train_peak_mb=mem,
                          bpd_img_s=bpd)
        rows.append([k, f"{tr:.2f}", f"{fw:.2f}", f"{tg:.1f}", f"{fg:.1f}",
                     f"{100 * tg / ceil:.0f}%", f"{100 * fg / ceil:.0f}%",
                     "-" if mem is None else f"{mem:.0f}",
                     "-" if bpd is None else f"{bpd:.4f}"])
    ratios = dict(train=results["train"]["ratio_median_of_rounds"],
                  forward=results["forward"]["ratio_median_of_rounds"])
    if "bits_per_dim" in results:
        ratios["bits_per_dim"] = results["bits_per_dim"]["ratio_median_of_rounds"]
    if "memory" in results:
        m = results["memory"]["train"]
        ratios["train_peak_memory"] = m["ddpmkit"]["rise_mb"] / m["diffusers"]["rise_mb"]
    rows.append(["ours/diffusers", f"{ratios['train']:.3f}x", f"{ratios['forward']:.3f}x",
                 "", "", "", "",
                 f"{ratios['train_peak_memory']:.2f}x" if "train_peak_memory" in ratios else "-",
                 f"{ratios['bits_per_dim']:.3f}x" if "bits_per_dim" in ratios else "-"])
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
        if k in results:
            r = results[k]
            print(f"# {k}: ours/diffusers median of per-round ratios "
                  f"{r['ratio_median_of_rounds']:.3f}, ratio of medians {r['ratio_of_medians']:.3f}"
                  f", ratio of best rounds {r['ratio_of_best']:.3f}")
    print(f"# ceiling (best of start and end) {ceil:.0f} GFLOP/s: {ceiling}")
    print(f"# ratios are medians of per-round ratios (speed: >1 means ddpmkit faster; memory: "
          f"ddpmkit's rise / diffusers'); medians of rounds -> img/s; load avg "
          f"{machine['load_average_start']} -> {machine['load_average_end']}")
    if "memory" in results:
        fm = results["memory"]["forward"]
        print(f"# forward peak rise MB: ddpmkit {fm['ddpmkit']['rise_mb']:.0f}, "
              f"diffusers {fm['diffusers']['rise_mb']:.0f}")
    print(json.dumps(dict(machine=machine, config=config, agreement=agree, flops=flops,
                          ceiling_gflop_s=ceiling, summary=summary, ratios=ratios,
                          results=results)))


if __name__ == "__main__":
    main()
