"""Peak memory and time of a training step with and without ``--grad-checkpointing``.

    python benchmarks/grad_checkpointing.py                      # cifar10 U-Net, batch 16 and 64
    python benchmarks/grad_checkpointing.py --preset celebahq256 --batch 1 --steps 1

Each setting runs in a fresh process (one after the other, never two at once): it builds the
network, resets the peak-memory counter, runs ``--steps`` training steps (forward, backward,
the trainer's AdamW, EMA) and reports the rise of the peak (CPU: the resident set's
high-water mark; CUDA: ``torch.cuda.max_memory_allocated``) and the median step time. The
rise includes gradients, AdamW's two moments and the EMA copy, which checkpointing does not
touch, so the table also gives the activation part: the rise minus those 4 copies of the
weights. Prints a table and a JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import subprocess
import sys
import time

import torch
from speed import peak_rss_kb  # benchmarks/speed.py, next to this script

from ddpmkit.config import MODEL_PRESETS
from ddpmkit.diffusion import GaussianDiffusion
from ddpmkit.nn.unet import UNet, count_parameters
from ddpmkit.runtime import tune_allocator
from ddpmkit.schedules import linear_betas
from ddpmkit.train.ema import EMA
from ddpmkit.train.trainer import make_optimizer


def worker(spec: dict) -> dict:
    tune_allocator()  # as `ddpmkit train` runs
    torch.set_num_threads(spec["threads"])
    device = torch.device(spec["device"])
    cfg = dataclasses.replace(MODEL_PRESETS[spec["preset"]],
                              grad_checkpointing=spec["grad_checkpointing"])
    torch.manual_seed(0)
    model = UNet(cfg).to(device).train()
    params = count_parameters(model)
    opt = make_optimizer(model, 2e-4)
    ema = EMA(model)
    diffusion = GaussianDiffusion(linear_betas(1000))
    g = torch.Generator().manual_seed(1)
    shape = (spec["batch"], cfg.in_channels, cfg.image_size, cfg.image_size)
    x0 = (torch.rand(shape, generator=g) * 2 - 1).to(device)
    t = torch.randint(0, 1000, (spec["batch"],), generator=g).to(device)

    def step():
        loss = diffusion.training_losses(model, x0, t)["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema.update(model, 0.9999)
        if device.type == "cuda":
            torch.cuda.synchronize()

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = peak_rss_kb(reset=True) * 1024
    times = []
    for _ in range(spec["steps"]):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else peak_rss_kb() * 1024
    rise = (peak - base) / 2**20
    state_mb = 4 * params * 4 / 2**20  # gradients, two AdamW moments, EMA (fp32)
    return dict(grad_checkpointing=spec["grad_checkpointing"], rise_mb=rise,
                activations_mb=rise - state_mb, state_mb=state_mb,
                step_s=statistics.median(times[1:] or times), times_s=times)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    p.add_argument("--preset", default="cifar10", choices=sorted(MODEL_PRESETS))
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    p.add_argument("--steps", type=int, default=3, help="training steps per setting (3)")
    p.add_argument("--threads", type=int, default=0, help="torch threads (default all cores)")
    p.add_argument("--device", default="auto")
    p.add_argument("--_worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        print("@@" + json.dumps(worker(json.loads(args._worker))), flush=True)
        return
    device = ("cuda" if torch.cuda.is_available() else "cpu") if args.device == "auto" \
        else args.device
    threads = args.threads or len(os.sched_getaffinity(0))
    rows = []
    for batch in args.batch:
        for gc in (False, True):
            spec = dict(preset=args.preset, batch=batch, steps=args.steps, threads=threads,
                        device=device, grad_checkpointing=gc)
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_worker",
                                  json.dumps(spec)], capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"worker failed:\n{out.stderr[-3000:]}")
            r = json.loads([x for x in out.stdout.splitlines() if x.startswith("@@")][-1][2:])
            r["batch"] = batch
            rows.append(r)
            print(f"# batch {batch}, grad checkpointing {gc}: peak rise {r['rise_mb']:.0f} MB, "
                  f"step {r['step_s']:.2f} s", flush=True)
    print(f"\n{args.preset} U-Net, {device}, {threads} threads, fp32; weights' state "
          f"(grads + AdamW + EMA) {rows[0]['state_mb']:.0f} MB of each rise")
    print("batch  checkpointing  peak rise MB  activations MB  step s")
    for r in rows:
        print(f"{r['batch']:5d}  {str(r['grad_checkpointing']):>13}  {r['rise_mb']:12.0f}  "
              f"{r['activations_mb']:14.0f}  {r['step_s']:6.2f}")
    for batch in args.batch:
        a, b = [r for r in rows if r["batch"] == batch]
        print(f"# batch {batch}: checkpointing saves {a['rise_mb'] - b['rise_mb']:.0f} MB of the "
              f"peak ({a['activations_mb']:.0f} -> {b['activations_mb']:.0f} MB of activations)"
              f" and costs {b['step_s'] / a['step_s']:.2f}x the step time")
    print(json.dumps(dict(preset=args.preset, device=device, threads=threads, rows=rows,
                          torch=torch.__version__)))


if __name__ == "__main__":
    main()
