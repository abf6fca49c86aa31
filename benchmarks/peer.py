"""ddpmkit's default digits model against a peer library, denoising-diffusion-pytorch, on the
project's own metrics (issue 14, item 3).

The peer commands (``peer-train``, ``peer-sample``, ``peer-bound``) import
``denoising_diffusion_pytorch`` and so run in a SCRATCH virtual environment outside the
repository; the repository does not depend on the peer, and no test imports this file.
``report`` needs only ddpmkit. Set-up and the full run (what benchmarks/results/peer holds):

    python3 -m venv /work/scratch/peer-venv && V=/work/scratch/peer-venv/bin
    $V/pip install torch==2.13.0 scikit-learn            # scikit-learn: ddpmkit's digits
    $V/pip install --no-deps denoising-diffusion-pytorch==2.3.4
    $V/pip install einops ema-pytorch accelerate tqdm pillow numpy scipy safetensors
    export PYTHONPATH=$PWD/src OUT=/work/scratch/peer    # ddpmkit from this checkout
    $V/python benchmarks/peer.py peer-train --minutes 5 15 --out $OUT
    C=$OUT/peer-15min            # two processes each (one thread): halves, merged by report
    $V/python benchmarks/peer.py peer-sample --checkpoint $C --out $C.part0.npz --seed 0 --num 500
    $V/python benchmarks/peer.py peer-sample --checkpoint $C --out $C.part1.npz --seed 1 --num 500
    $V/python benchmarks/peer.py peer-bound --checkpoint $C --out $C.bound.part0.json --part 0/2
    $V/python benchmarks/peer.py peer-bound --checkpoint $C --out $C.bound.part1.json --part 1/2
    (the same for $OUT/peer-5min; its samples were not drawn on 2026-12-03, see README)
    RUN=runs/digits                                      # a default `ddpmkit train` run
    python -m ddpmkit sample --checkpoint $RUN --num 1000 --sampler dpm++2m --steps 20 \
        --out $OUT/ours-dpm20.npz
    python -m ddpmkit sample --checkpoint $RUN --num 1000 --sampler ancestral --steps 100 \
        --out $OUT/ours-ancestral100.npz
    python -m ddpmkit sample --checkpoint $RUN --num 1000 --sampler ancestral --steps 0 \
        --out $OUT/ours-ancestral.npz
    python -m ddpmkit eval --checkpoint $RUN --split test --json > $OUT/ours.bound.json
    python benchmarks/peer.py report --work $OUT --out-dir benchmarks/results/peer

The peer's set-up (every choice is in PEER_CHOICES and results.json):
``Unet(dim=32, dim_mults=(1, 2), channels=1)``, its
``GaussianDiffusion`` defaults (``pred_v``, sigmoid schedule, T = 1000, its [0, 1] -> [-1, 1]
normalisation), and a plain training loop that does what its ``Trainer`` does with the
Trainer's defaults (Adam lr 1e-4, betas (0.9, 0.99), batch 16, gradient norm clipped at 1,
ema-pytorch's EMA with decay 0.995 updated every 10 steps) except the random horizontal flip,
which is off: a mirrored digit is not a digit. The Trainer itself needs an image folder,
DataLoader workers (more processes) and samples 25 images with 1000 steps every 1000 steps
inside the training budget; the loop leaves those out. Data: the same 1,500 training digits
ddpmkit uses, v / 16 in [0, 1], which the peer maps to v / 8 - 1: exactly ddpmkit's scaling.

"Minutes" are CPU minutes of a one-thread process (``time.process_time`` over the training
steps; the issue's "CPU-min"): on a shared machine they are what the process got, not wall
time. Steps are recorded too.

Samples: 1,000 per model as uint8 ``[N, 8, 8, 1]`` under ``arr_0`` (what ``ddpmkit sample
--out F.npz`` writes). The peer's own sampler: ancestral, 1000 steps, x0 clipped (its
``p_sample_loop``), seed 0. Measured by ``report`` with the same code for every model
(ddpmkit.metrics): FD to the 297 test digits in the digit classifier's features, the
recognisable share (confidence >= 0.9), and the real-digit FD at the same N. The peer's test
bound: its EMA network (a v-predictor) inside a ddpmkit ``GaussianDiffusion`` built from the
peer's float64 betas with ``prediction="v"`` (ddpmkit converts v to eps and x0 with the same
alpha_bar), through ``evaluate_bpd``, the code ``ddpmkit eval`` runs (all T terms, 17 levels,
seed 0).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
import types
from datetime import date
from pathlib import Path

PEER_CHOICES = {
    "unet": {"dim": 32, "dim_mults": [1, 2], "channels": 1},
    "diffusion": {"image_size": 8, "timesteps": 1000, "objective": "pred_v (default)",
                  "beta_schedule": "sigmoid (default)", "auto_normalize": True},
    "train": {"batch_size": 16, "lr": 1e-4, "adam_betas": [0.9, 0.99], "max_grad_norm": 1.0,
              "ema_decay": 0.995, "ema_update_every": 10, "augment_horizontal_flip": False,
              "threads": 1, "seed": 0},
    "sample": {"sampler": "p_sample_loop (ancestral, 1000 steps, x0 clipped)", "seed": 0},
}


# ---- the peer (scratch venv only) --------------------------------------------------------------

def _torchvision_stand_in() -> None:
    """denoising_diffusion_pytorch imports ``torchvision.transforms`` and ``torchvision.utils``
    at module level, for its image-folder Dataset and the Trainer's PNG grids, neither of
    which runs here. torchvision cannot be installed beside this torch, so empty modules stand
    in; touching anything in them raises."""
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        pass

    def missing(name):
        raise AttributeError(f"torchvision stand-in: {name} is not available")

    root = types.ModuleType("torchvision")
    for sub in ("transforms", "utils"):
        mod = types.ModuleType(f"torchvision.{sub}")
        mod.__getattr__ = missing
        setattr(root, sub, mod)
        sys.modules[f"torchvision.{sub}"] = mod
    sys.modules["torchvision"] = root


def _peer():
    _torchvision_stand_in()
    import denoising_diffusion_pytorch as ddp
    from denoising_diffusion_pytorch.version import __version__
    return ddp, __version__


def _peer_diffusion(ddp):
    u = PEER_CHOICES["unet"]
    unet = ddp.Unet(dim=u["dim"], dim_mults=tuple(u["dim_mults"]), channels=u["channels"])
    return ddp.GaussianDiffusion(unet, image_size=8, timesteps=1000)


def _train_digits01():
    """The 1,500 training digits as float32 [1500, 1, 8, 8] in [0, 1] (v / 16)."""
    import torch

    from ddpmkit.data.digits import digits_arrays
    from ddpmkit.data.sources import _DIGITS_TRAIN
    images = digits_arrays()[0][:_DIGITS_TRAIN].astype("float32") / 16.0
    return torch.from_numpy(images)[:, None]


def _batches(n: int, batch: int, g):
    """Shuffled index batches forever (the Trainer's DataLoader(shuffle=True), cycled)."""
    import torch
    while True:
        order = torch.randperm(n, generator=g)
        for i in range(0, n, batch):
            yield order[i:i + batch]


def _save(diffusion, ema, out: Path, meta: dict) -> None:
    from safetensors.torch import save_file
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in ema.ema_model.model.state_dict().items()}
    save_file(state, str(out / "ema_unet.safetensors"))
    (out / "meta.json").write_text(json.dumps(meta, indent=1))


def cmd_peer_train(args) -> None:
    import torch
    from ema_pytorch import EMA
    ddp, version = _peer()
    torch.set_num_threads(1)
    tc = PEER_CHOICES["train"]
    torch.manual_seed(tc["seed"])
    diffusion = _peer_diffusion(ddp)
    ema = EMA(diffusion, beta=tc["ema_decay"], update_every=tc["ema_update_every"])
    opt = torch.optim.Adam(diffusion.parameters(), lr=tc["lr"], betas=tuple(tc["adam_betas"]))
    data = _train_digits01()
    batches = _batches(len(data), tc["batch_size"], torch.Generator().manual_seed(tc["seed"]))
    params = sum(p.numel() for p in diffusion.model.parameters())
    marks = sorted(args.minutes)
    cpu = wall = 0.0
    step = 0
    losses: list[float] = []
    while marks:
        c0, w0 = time.process_time(), time.perf_counter()
        diffusion.train()
        loss = diffusion(data[next(batches)])  # the peer normalises [0, 1] -> [-1, 1]
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(diffusion.parameters(), tc["max_grad_norm"])
        opt.step()
        ema.update()
        step += 1
        cpu += time.process_time() - c0
        wall += time.perf_counter() - w0
        losses.append(loss.item())
        if step % 500 == 0:
            print(f"step {step}  cpu {cpu / 60:.2f} min  wall {wall / 60:.2f} min  "
                  f"loss(last 500) {sum(losses[-500:]) / 500:.4f}", flush=True)
        if cpu >= marks[0] * 60:
            m = marks.pop(0)
            meta = {"peer": "denoising-diffusion-pytorch", "version": version,
                    "cpu_minutes": cpu / 60, "wall_minutes": wall / 60, "steps": step,
                    "budget_cpu_minutes": m, "parameters": params, "choices": PEER_CHOICES,
                    "loss_last_500": sum(losses[-500:]) / len(losses[-500:]),
                    "load_average": os.getloadavg(), "torch": torch.__version__}
            _save(diffusion, ema, Path(args.out) / f"peer-{m:g}min", meta)
            print(json.dumps({k: v for k, v in meta.items() if k != "choices"}), flush=True)


def _load_peer(checkpoint: Path):
    import torch
    from safetensors.torch import load_file
    ddp, _ = _peer()
    diffusion = _peer_diffusion(ddp)
    diffusion.model.load_state_dict(load_file(str(checkpoint / "ema_unet.safetensors")))
    diffusion.eval()
    torch.set_grad_enabled(False)
    return diffusion


def cmd_peer_sample(args) -> None:
    import numpy as np
    import torch
    torch.set_num_threads(args.threads)
    diffusion = _load_peer(Path(args.checkpoint))
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    parts = []
    for i in range(0, args.num, args.batch_size):
        parts.append(diffusion.sample(batch_size=min(args.batch_size, args.num - i)))
        x01 = torch.cat(parts)                               # [N, 1, 8, 8] in [0, 1]
        u8 = (x01 * 255.0).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy()
        # rewritten after every batch (the first k batches of a longer run are the same
        # samples), so a run cut short still leaves every finished batch
        tmp = Path(args.out).with_suffix(".tmp.npz")
        np.savez(tmp, arr_0=u8)
        os.replace(tmp, args.out)
        print(f"{len(u8)} samples in {time.perf_counter() - t0:.0f} s -> {args.out}", flush=True)


def cmd_peer_bound(args) -> None:
    import torch

    from ddpmkit.config import DataConfig
    from ddpmkit.data import load_data
    from ddpmkit.diffusion import GaussianDiffusion
    from ddpmkit.evaluate import evaluate_bpd
    torch.set_num_threads(args.threads)
    ddp, _ = _peer()
    peer = _load_peer(Path(args.checkpoint))
    # the peer's betas in float64, from its own schedule function (its buffers are float32)
    betas = ddp.denoising_diffusion_pytorch.sigmoid_beta_schedule(peer.num_timesteps)
    diffusion = GaussianDiffusion(betas.double(), prediction="v", variance="fixed_small")

    def model(x_t, t):  # ddpmkit's contract model(x_t, t); the peer's Unet outputs v
        return peer.model(x_t, t)

    test = load_data(DataConfig(name="digits"), "test")
    if args.bound_t:
        bpd, se = stratified_bound(model, diffusion, test.x, test.levels, args.bound_t)
        res = {"bits_per_dim": bpd, "stderr": se, "estimator": f"stratified, {args.bound_t} t"}
    elif args.part is None:
        res = evaluate_bpd(model, diffusion, test.x, test.levels, seed=0, clip_denoised=True)
        res = {k: v for k, v in res.items() if k != "per_example"}
    else:
        # examples i, i + n, ... with their own ids: the noise evaluate_bpd would draw for
        # them, so n parts merged (report) give exactly the figure of one evaluate_bpd call
        i, n = (int(v) for v in args.part.split("/"))
        ids = torch.arange(test.x.shape[0])[i::n]
        out = diffusion.bits_per_dim(model, test.x[ids], levels=test.levels, seed=0,
                                     example_ids=ids, batch_size=512, clip_denoised=True)
        res = {"example_ids": ids.tolist(), "per_example": out["total"].tolist()}
    res.update(checkpoint=str(args.checkpoint), split="test", levels=test.levels)
    Path(args.out).write_text(json.dumps(res))
    if "bits_per_dim" in res:
        print(f"test bound {res['bits_per_dim']:.4f} +- {res['stderr']:.4f} bits/dim")


# ---- measuring and reporting (ddpmkit only) ---------------------------------------------------

def stratified_bound(model, diffusion, x0, levels: int, k: int) -> tuple[float, float]:
    """time_to_quality.py's stratified estimate of the test bound (bits/dim, standard error):
    per digit, L_T + (T / k) * one L_t from each of k equal blocks of steps, seed 0."""
    from types import SimpleNamespace
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from time_to_quality import bound_estimate
    return bound_estimate(SimpleNamespace(model=model, diffusion=diffusion), x0, levels, k)


MODELS = [  # (key, label, samples file, bound file, training record)
    ("ours-dpm20", "ddpmkit default (2,200 steps), DPM-Solver++ 2M 20 calls", "ours-dpm20.npz",
     "ours.bound.json", None),
    ("ours-ancestral100", "ddpmkit default (2,200 steps), ancestral 100 steps (its sampler)",
     "ours-ancestral100.npz", "ours.bound.json", None),
    ("ours-ancestral", "ddpmkit default (2,200 steps), ancestral 1000 steps",
     "ours-ancestral.npz", "ours.bound.json", None),
    ("peer-5min", "denoising-diffusion-pytorch, 5 CPU-min, ancestral 1000 steps",
     "peer-5min.npz", "peer-5min.bound.json", "peer-5min/meta.json"),
    ("peer-15min", "denoising-diffusion-pytorch, 15 CPU-min, ancestral 1000 steps",
     "peer-15min.npz", "peer-15min.bound.json", "peer-15min/meta.json"),
]


def _ours_training(run: Path) -> dict:
    """Steps and wall minutes of a ddpmkit run, from the last row of its metrics.csv."""
    import csv
    with open(run / "metrics.csv") as f:
        last = list(csv.DictReader(f))[-1]
    return {"steps": int(last["step"]), "wall_minutes": float(last["elapsed_s"]) / 60,
            "cpu_minutes": None, "threads": 2}


def _sample_files(work: Path, name: str) -> list[Path]:
    """``name``, or its parts ``STEM.part*.npz`` (peer-sample run as two processes, seeds
    0 and 1) in name order."""
    if (work / name).exists():
        return [work / name]
    return sorted(work.glob(name.replace(".npz", ".part*.npz")))


def _bound(work: Path, name: str) -> dict | None:
    """The bound file ``name``, or its parts ``STEM.part*.json`` merged."""
    import statistics
    if (work / name).exists():
        return _read_json(work / name)
    parts = [_read_json(f) for f in sorted(work.glob(name.replace(".json", ".part*.json")))]
    if not parts:
        return None
    totals = [v for p in parts for v in p["per_example"]]
    ids = sorted(i for p in parts for i in p["example_ids"])
    if ids != list(range(297)):
        raise SystemExit(f"{name}: the parts do not cover the 297 test digits once each")
    return {"bits_per_dim": statistics.fmean(totals),
            "stderr": statistics.stdev(totals) / math.sqrt(len(totals))}


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


def _load_samples(work: Path) -> dict:
    """Each model's samples that exist, float32 [N, 1, 8, 8] in [-1, 1]."""
    import numpy as np
    import torch

    from ddpmkit.data.images import u8_to_float
    found = {}
    for key, _, samples, _, _ in MODELS:
        files = _sample_files(work, samples)
        if not files:
            print(f"{key}: no {samples} in {work}, left out", flush=True)
            continue
        u8 = torch.from_numpy(np.concatenate([np.load(f)["arr_0"] for f in files]))
        found[key] = u8_to_float(u8.permute(0, 3, 1, 2))
    return found


def _ours_stratified(ours: str, k: int) -> dict:
    """The stratified bound estimate of our model, for a paired comparison with a peer bound
    estimated the same way."""
    from ddpmkit.config import DataConfig
    from ddpmkit.data import load_data
    from ddpmkit.loading import load
    run = load(ours, device="cpu")
    test = load_data(DataConfig(name="digits"), "test")
    bpd, se = stratified_bound(run.model, run.diffusion, test.x, test.levels, k)
    return {"bits_per_dim": bpd, "stderr": se, "estimator": f"stratified, {k} t"}


def cmd_report(args) -> None:
    import torch

    from ddpmkit.metrics import digit_quality, load_digit_classifier, real_digit_baseline
    from ddpmkit.viz import save_image_grid
    work, out = Path(args.work), Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    classifier = load_digit_classifier()
    samples = _load_samples(work)
    # FD grows as N shrinks: every model at the same N (the smallest, or --num)
    n = args.num or min(len(x) for x in samples.values())
    strat = _ours_stratified(args.ours, args.bound_t) if args.bound_t else None
    rows = []
    for key, label, _, bound, record in MODELS:
        if key not in samples:
            continue
        x = samples[key][:n]
        q = digit_quality(x, classifier=classifier)
        save_image_grid(x[:64], out / f"{key}.png", nrow=8)
        b, rec = _bound(work, bound), _read_json(work / record) if record else None
        if b and b.get("estimator") is None:
            b["estimator"] = "all T"
        rows.append({"model": key, "label": label, "n": q["n"], "of": len(samples[key]),
                     "fd": q["fd"], "kd": q["kd"], "recognisable": q["recognisable"],
                     "confidence": q["confidence"], "classes_present": q["classes_present"],
                     "bound": b, "bound_stratified": strat if key.startswith("ours") else
                     (b if b and b["estimator"] != "all T" else None),
                     "training": rec and {k: rec[k] for k in ("cpu_minutes", "wall_minutes",
                                                              "steps", "parameters")}})
        print(json.dumps(rows[-1]), flush=True)
    ours = _ours_training(Path(args.ours))
    for r in rows:
        if r["training"] is None:
            r["training"] = ours
    real = [real_digit_baseline(n=n, seed=s, classifier=classifier) for s in range(3)]
    meta = {"date": date.today().isoformat(), "machine": f"{platform.machine()}, "
            f"{os.cpu_count()} cores, shared", "torch": torch.__version__,
            "peer": next((m["version"] for m in (_read_json(work / f"peer-{k}min/meta.json")
                                                 for k in (15, 5)) if m), None),
            "n": n, "bound_t": args.bound_t,
            "left_out": [k for k, *_ in MODELS if k not in samples],
            "peer_choices": PEER_CHOICES, "ours_checkpoint": args.ours,
            "real_digits_at_n": {"fd": [r["fd"] for r in real],
                                 "recognisable": [r["recognisable"] for r in real]}}
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    (out / "results.md").write_text(_markdown(rows, meta))
    print(_markdown(rows, meta))


def _fmt_bound(b: dict | None) -> str:
    return f"{b['bits_per_dim']:.3f} ± {b['stderr']:.3f}" if b else "-"


def _markdown(rows: list[dict], meta: dict) -> str:
    real, n, k = meta["real_digits_at_n"], meta["n"], meta["bound_t"]
    lines = [f"| model | training | FD (test), N = {n} | recognisable | test bound, all T |"
             + (f" test bound, {k} stratified t |" if k else ""),
             "|---|---|---|---|---|" + ("---|" if k else "")]
    for r in rows:
        t = r["training"]
        when = (f"{t['cpu_minutes']:.1f} CPU min, {t['steps']:,} steps" if t["cpu_minutes"]
                else f"{t['wall_minutes']:.1f} wall min (2 threads), {t['steps']:,} steps")
        full = r["bound"] if r["bound"] and r["bound"]["estimator"] == "all T" else None
        lines.append(f"| {r['label']} | {when} | {r['fd']:.2f} | {r['recognisable']:.3f} | "
                     f"{_fmt_bound(full)} |" + (f" {_fmt_bound(r['bound_stratified'])} |"
                                                if k else ""))
    lines.append(f"| real training digits (3 draws of {n}) | | {sum(real['fd']) / 3:.2f} | "
                 f"{sum(real['recognisable']) / 3:.3f} | |" + (" |" if k else ""))
    return "\n".join(lines) + (
        f"\n\n{meta['date']}, {meta['machine']}, torch {meta['torch']}, "
        f"denoising-diffusion-pytorch {meta['peer']}; the first {n} samples of each model "
        f"(seed 0); FD: ddpmkit.metrics digit-classifier features against the 297 test "
        f"digits; bound, all T: `ddpmkit eval --split test` (the peer's network through the "
        f"same evaluate_bpd)" + (f"; stratified: {k} t per digit, one per block of T / {k} "
                                 f"steps, the same t and noise for every model (seed 0)"
                                 if k else "") +
        ". Left out: " + (", ".join(meta["left_out"]) or "nothing") +
        ". Commands: benchmarks/peer.py docstring.\n")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("peer-train")
    s.add_argument("--minutes", type=float, nargs="+", default=[5.0, 15.0])
    s.add_argument("--out", required=True)
    for name in ("peer-sample", "peer-bound"):
        s = sub.add_parser(name)
        s.add_argument("--checkpoint", required=True)
        s.add_argument("--out", required=True)
        s.add_argument("--threads", type=int, default=1)
        if name == "peer-bound":
            s.add_argument("--bound-t", type=int, default=0,
                           help="K > 0: stratified estimate from K t per digit (0: all T)")
            s.add_argument("--part", help="i/n: only test digits i, i + n, ... (n processes; "
                           "report merges the parts' files, OUT with .part0.json, ...)")
        if name == "peer-sample":
            s.add_argument("--num", type=int, default=1000)
            s.add_argument("--seed", type=int, default=0)
            s.add_argument("--batch-size", type=int, default=250,
                           help="samples per sampling run (the RNG stream depends on it)")
    s = sub.add_parser("report")
    s.add_argument("--work", required=True, help="folder of the .npz and .json files above")
    s.add_argument("--out-dir", default="benchmarks/results/peer")
    s.add_argument("--num", type=int, default=0,
                   help="samples per model to score (default: the smallest count found)")
    s.add_argument("--bound-t", type=int, default=0,
                   help="K > 0: also our model's stratified bound (K t per digit), to pair "
                   "with a peer bound estimated so")
    s.add_argument("--ours", default="runs/digits",
                   help="the ddpmkit run measured (recorded in results.json)")
    args = p.parse_args(argv)
    {"peer-train": cmd_peer_train, "peer-sample": cmd_peer_sample,
     "peer-bound": cmd_peer_bound, "report": cmd_report}[args.cmd](args)


if __name__ == "__main__":
    main()
