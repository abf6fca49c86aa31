"""The ``ddpmkit`` command: train | sample | eval | show | encode | export | fid | fid-stats |
prepare | config, and (cli_edit.py) inpaint | edit | interpolate.

Flags come from the config dataclasses (config.py), so a flag, a config-file key and a field
of the saved ``config.json`` are always the same thing. Errors that the user can fix print one
line (``error: ...``) and exit with status 2; ``--debug`` shows the traceback. ddpmkit's own
warnings (a skipped image file, ...) print as ``warning: ...`` lines.

Exit status: 0 on success, including ``train`` stopped by SIGINT/SIGTERM once its checkpoint is
saved (the run resumes with the same command); 2 for an error the user can fix, and for
malformed flags (argparse); 130 when a second Ctrl-C aborts before the checkpoint is saved.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import json
import re
import sys
import warnings
from pathlib import Path

from . import config as C
from .errors import ConfigError, DdpmkitError

EPILOG_TRAIN = """examples:
  ddpmkit train                                 # the built-in digits preset, ~8 min on 2 CPU cores
  ddpmkit train --data moons                    # a 2-D toy set, ~2 min
  ddpmkit train --data ./my_images --image-size 32 --max-steps 100000 --out runs/mine
  ddpmkit train --config my.toml --lr 1e-4      # flags override the file
  torchrun --nproc_per_node 4 -m ddpmkit train --config cifar10 --data ./cifar_png
Ctrl-C or SIGTERM saves a checkpoint at the current step and exits with status 0 (a second
Ctrl-C aborts at once, status 130); the same command then resumes from it.
presets for --config: """ + ", ".join(C.RUN_PRESETS)


CHECKPOINT_HELP = ("a ddpmkit run or checkpoint folder, or a diffusers folder (DDPMPipeline, "
                   "or a UNet2DModel config.json + weights)")


EPILOG_EXPORT = """examples:
  ddpmkit export --checkpoint runs/digits --out digits-diffusers
  ddpmkit sample --checkpoint digits-diffusers --out samples.png   # and back into ddpmkit
in Python, with diffusers installed:
  pipe = DDPMPipeline.from_pretrained("digits-diffusers")
  images = pipe(num_inference_steps=pipe.scheduler.config.num_train_timesteps).images
"""


CLASS_HELP = ("class-conditional models: every sample of class K, or 'all' (--num per class, "
              "one grid row per class); default: unconditional")

GUIDANCE_INTERVAL_HELP = (
    "with --class: guide only at noise levels LO < sigma <= HI (Kynkaanniemi et al. 2024), "
    "sigma = sqrt((1 - alpha_bar) / alpha_bar) of the step (HI may be inf), the plain "
    "conditional model elsewhere; default: guide at every step")


def _int_at_least(low: int, high: int | None = None):
    """An argparse type: an integer >= ``low`` (and <= ``high``): a bad count is a usage
    error, not a crash, and a huge one is refused before it is allocated."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low or (high is not None and value > high):
            bounds = f">= {low}" + ("" if high is None else f" and <= {high}")
            raise argparse.ArgumentTypeError(f"must be an integer {bounds}, got {value}")
        return value
    parse.__name__ = f"integer >= {low}"
    return parse


def _bool(text: str) -> bool:
    """An argparse type: true/false, yes/no, on/off, 1/0."""
    value = text.strip().lower()
    if value in ("true", "yes", "on", "1"):
        return True
    if value in ("false", "no", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r} is not true or false")


def _add_tf32(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tf32", type=_bool, nargs="?", const=True, default=True, metavar="BOOL",
                   help="TF32 matmuls and convolutions on Ampere+ GPUs, as train's --tf32 "
                        "(default: true; no effect on the CPU)")


def _seed(text: str) -> int:
    """An argparse type: a seed in [0, 2**32 - 1] (torch's generators take no more)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if not 0 <= value <= C.LIMITS["seed"]:
        raise argparse.ArgumentTypeError(f"must be in [0, {C.LIMITS['seed']}], got {value}")
    return value


def _data_folder(cfg: C.DataConfig) -> Path | None:
    """The data's path (folder or file) for the output checks; None for a built-in set."""
    from .data import data_path
    return data_path(cfg.name)


def _write_npz(out: Path, **arrays) -> None:
    """An .npz through a fresh temporary file and a rename (never through a link)."""
    import numpy as np

    from .outputs import atomic_write
    atomic_write(out, lambda f: np.savez(f, **arrays))


def _data_config(run, name: str | None) -> C.DataConfig:
    """The run's data set, or ``--data`` instead (resized to the run's image size)."""
    if name:
        return C.section_from_dict(C.DataConfig, {"name": name}, base=run.config.data)
    if not run.config.data.name:
        raise ConfigError(f"{run.path} is a {run.source} model and names no data set: pass "
                          "--data (an image folder, a .npy/.npz array, tar shards or a "
                          "Hugging Face datasets folder)")
    return run.config.data


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def _base_config(args) -> C.RunConfig:
    """The config a run starts from: --config (preset or file), else a preset for --data."""
    data_name = getattr(args, "data", None)
    if args.config:
        if args.config in C.RUN_PRESETS:
            return C.RUN_PRESETS[args.config]
        if not Path(args.config).exists():
            hint = C.did_you_mean(args.config, C.RUN_PRESETS)
            raise ConfigError(f"--config {args.config!r} is neither a preset "
                              f"({', '.join(C.RUN_PRESETS)}) nor a file{hint}")
        return C.RunConfig.load(args.config)
    return C.RUN_PRESETS[C.default_preset_for(data_name or "digits")]


def config_from_args(args, base: C.RunConfig | None = None) -> C.RunConfig:
    """The run's config: ``base`` (default: --config, or the preset for --data) and the flags
    typed on the command line."""
    base = base if base is not None else _base_config(args)
    overrides = {}
    for section, cls in C.SECTIONS.items():
        prefix = "sample_" if section == "sample" else ""
        d = C.flags_to_dict(args, cls, prefix=prefix)
        if d:
            overrides[section] = d
    return C.RunConfig.from_dict(overrides, base=base)


# ---- train -----------------------------------------------------------------------------------

def default_run_dir(data_name: str) -> Path:
    """``runs/<name>`` from the data's last path component, made safe as one folder name.

    Only the final component is used and ``..``/hidden names are neutralised, so no data
    name (``../../x``, ``foo/..``) can point the default run folder outside ``runs/``.
    """
    name = re.sub(r"[^\w.-]+", "_", Path(data_name).name).lstrip(".")
    return Path("runs") / (name or "run")


def _resumed_config(args, out: Path) -> C.RunConfig | None:
    """The config of the checkpoint a resume will continue, when no --config is given: the
    flags typed now then change only what they name (and the trainer checks those changes)."""
    from .train.checkpoint import find_checkpoint, list_checkpoints, read_config
    if args.config or args.resume == "none":
        return None
    if args.resume == "auto":
        found = list_checkpoints(out) if out.is_dir() else []
        return read_config(found[-1]) if found else None
    return read_config(find_checkpoint(args.resume))


def cmd_train(args) -> int:
    from .train.trainer import train

    cfg = config_from_args(args)
    out = Path(args.out) if args.out else default_run_dir(cfg.data.name)
    base = _resumed_config(args, out)
    if base is not None:
        cfg = config_from_args(args, base)
    from . import dist
    dist.print0("config:\n" + C.to_toml(cfg))
    resume = None if args.resume == "none" else args.resume
    result = train(cfg, out, resume=resume, progress=not args.no_progress,
                   overwrite=args.overwrite, allow_changes=args.allow_changes)
    dist.print0(f"run folder: {result.run_dir}  (samples.png, loss.png, metrics.csv, "
                f"checkpoints/)")
    return 0


# ---- sample ----------------------------------------------------------------------------------

def cmd_sample(args) -> int:
    import numpy as np
    import torch

    from . import dist, viz
    from .data import to_uint8
    from .loading import clip_denoised_for, load
    from .outputs import check_output
    from .runtime import set_tf32
    from .sampling import sample

    out = check_output(args.out, suffixes=(".png", ".npz"))
    set_tf32(args.tf32)
    run = load(args.checkpoint, device=args.device, use_ema=not args.raw_weights)
    check_output(out, suffixes=(".png", ".npz"), data=_data_folder(run.config.data),
                 writable=False)
    sc = C.section_from_dict(C.SampleConfig, C.flags_to_dict(args, C.SampleConfig),
                             base=run.config.sample)
    dist.init_process_group(run.device)
    # Under torchrun, batch k of --batch-size samples goes to rank k mod world. The batches are
    # those of a single process (sample i always has seed + i, and shares its batch with the
    # same neighbours), so the images are bit-for-bit a single process's on the same hardware.
    # Every rank is busy only with at least `world` batches: lower --batch-size for few samples.
    rank, world = dist.rank(), dist.world_size()
    starts = list(range(0, sc.num, sc.batch_size))
    owned = [starts[r::world] for r in range(world)]

    def size(start: int) -> int:
        return min(sc.batch_size, sc.num - start)

    labels = _sample_labels(args.class_label, run.config.model.num_classes, sc)
    if labels is None and (args.guidance is not None or args.guidance_interval):
        flag = "--guidance" if args.guidance is not None else "--guidance-interval"
        raise ConfigError(f"{flag} needs --class K|all (guidance mixes the class and the "
                          "unconditional prediction)")
    if labels is not None and len(labels) != sc.num:  # --class all: --num per class
        sc = C.section_from_dict(C.SampleConfig, {"num": len(labels)}, base=sc)
        starts = list(range(0, sc.num, sc.batch_size))
        owned = [starts[r::world] for r in range(world)]
    bar = _progress_bar(args, "sample") if dist.is_main() else None
    image = run.kind == "image"
    c, *hw = run.data_shape
    # Images become uint8 [n, H, W, C] on their rank before the gather: a quarter of float32's
    # bytes on the wire and on rank 0 (50,000 at 256x256: 9.8 GB, not 39 GB).
    chunks = [torch.zeros((0, *hw, c), dtype=torch.uint8) if image
              else torch.zeros((0, *run.data_shape))]  # a rank may own no batch
    for start in owned[rank]:
        n = size(start)
        x = sample(run.model, run.diffusion, (n, *run.data_shape), method=sc.sampler,
                   steps=sc.steps or None, spacing=sc.spacing, eta=sc.eta,
                   clip_denoised=sc.clip_denoised and clip_denoised_for(run.kind),
                   seeds=range(sc.seed + start, sc.seed + start + n), device=run.device,
                   callback=_step_callback(bar, n, start == 0),
                   y=None if labels is None else labels[start:start + n],
                   guidance=sc.guidance if labels is not None else 1.0,
                   guidance_interval=args.guidance_interval if labels is not None else None)
        chunks.append(torch.from_numpy(to_uint8(x)) if image else x.float().cpu())
    if bar is not None:
        bar.close()
    x = dist.gather_rows(torch.cat(chunks), [sum(map(size, o)) for o in owned])
    if x is None:  # not rank 0: rank 0 writes the file
        return 0
    # gathered rank-major (rank 0's batches, then rank 1's, ...): back to sample order
    gathered = [s for o in owned for s in o]
    pieces = dict(zip(gathered, torch.split(x, [size(s) for s in gathered]), strict=True))
    x = torch.cat([pieces[s] for s in starts])
    if out.suffix.lower() == ".npz":
        _write_npz(out, arr_0=x.numpy() if image else x.numpy().astype(np.float32))
    elif out.suffix.lower() == ".png":
        if image:  # uint8 -> [-1, 1] floats that the grid maps back to the same bytes
            rows = args.class_label == "all"  # one row per class
            viz.save_image_grid(x.permute(0, 3, 1, 2).float() / 127.5 - 1.0, out,
                                nrow=len(x) // run.config.model.num_classes if rows else None)
        else:
            viz.plot_points(x, out, title=f"{sc.num} samples ({sc.sampler})", labels=labels)
    else:
        viz.plot_points(x, out, title=f"{sc.num} samples ({sc.sampler})", labels=labels)
    what = "" if labels is None else (f", class {args.class_label}, guidance {sc.guidance:g}")
    if labels is not None and args.guidance_interval:
        what += " for sigma in ({:g}, {:g}]".format(*args.guidance_interval)
    print(f"wrote {sc.num} samples ({sc.sampler}, {sc.steps or run.diffusion.num_timesteps} "
          f"steps{what}) to {out}")
    return 0


def _sample_labels(class_label: str | None, num_classes: int, sc: C.SampleConfig):
    """--class K (every sample class K) or all (--num per class, class-major) -> int64 labels,
    or None without --class. Errors name the flag."""
    if class_label is None:
        return None
    if not num_classes:
        raise ConfigError("--class needs a class-conditional model (train with --class-cond)")
    import torch
    if class_label == "all":
        return torch.arange(num_classes).repeat_interleave(sc.num)
    try:
        k = int(class_label)
    except ValueError:
        raise ConfigError(f"--class {class_label!r}: use a class number or 'all'") from None
    if not 0 <= k < num_classes:
        raise ConfigError(f"--class {k} is out of range: this model has classes "
                          f"0..{num_classes - 1}")
    return torch.full((sc.num,), k, dtype=torch.long)


def _progress_bar(args, desc):
    if getattr(args, "no_progress", False):
        return None
    from tqdm import tqdm
    return tqdm(desc=desc, unit="step", dynamic_ncols=True)


def _step_callback(bar, n, first):
    if bar is None:
        return None

    def callback(i, total, x, pred_x0):
        if bar.total != total:
            bar.reset(total=total)
        bar.update(1)
    return callback


# ---- eval ------------------------------------------------------------------------------------

def cmd_eval(args) -> int:
    from . import dist
    from .data import load_data
    from .evaluate import evaluate_bpd
    from .loading import clip_denoised_for, load
    from .runtime import set_tf32

    set_tf32(args.tf32)
    run = load(args.checkpoint, device=args.device)
    data_cfg = _data_config(run, args.data)
    if not args.data:
        _check_same_data(data_cfg)
    data = load_data(data_cfg, args.split)
    if data.kind != run.kind or (data.kind == "image" and data.shape != run.data_shape):
        raise ConfigError(f"data {data_cfg.name!r} of shape {data.shape} does not fit this "
                          f"model ({run.data_shape})")
    levels = data.levels
    if args.levels is not None:
        if levels is not None and args.levels != levels and not args.force:
            raise ConfigError(f"this model was trained on data with {levels} levels; evaluating "
                              f"with --levels {args.levels} gives a meaningless figure (add "
                              "--force to do it anyway)")
        levels = args.levels
    x = data.x if args.max_examples is None else data.head(args.max_examples)
    dist.init_process_group(run.device)
    # A class-conditional model is evaluated twice: with the true labels (-log p(x | y)) and
    # through its null class (-log p(x)).
    passes = [("", None)]
    if run.config.model.num_classes:
        from .train.labels import require_labels
        labels = require_labels(data_cfg, args.split, data)[:len(x)]
        passes = [("-log p(x | y), true labels", labels), ("-log p(x), null class", None)]
    results = []
    for title, y in passes:
        res = evaluate_bpd(run.model, run.diffusion, x, levels, batch_size=args.batch_size,
                           seed=args.seed, clip_denoised=clip_denoised_for(data.kind),
                           progress=not args.no_progress, device=run.device, y=y)
        res.update(checkpoint=str(run.path), split=args.split, levels=levels,
                   data=data_cfg.name)
        if title:
            res["bound"] = "conditional" if y is not None else "unconditional"
        results.append((title, res))
    if not dist.is_main():
        return 0
    for title, res in results:
        if args.json:
            print(json.dumps({k: v for k, v in res.items() if k not in ("per_example",)}))
            continue
        unit = "bits/dim" if levels is not None else "bits/dim (continuous density)"
        print(f"{data_cfg.name} {args.split}: {res['n']} examples, T = {res['timesteps']}"
              + (f"; {title}" if title else ""))
        print(f"  negative log-likelihood bound  {res['bits_per_dim']:.4f} "
              f"± {res['stderr']:.4f} {unit}")
        print(f"    L_T  (prior)                 {_term(res['prior'])}")
        print(f"    sum L_(t-1), t = 2..T        {_term(res['diffusion'])}")
        print(f"    L_0  (decoder)               {_term(res['decoder'])}")
    return 0


def _check_same_data(data_cfg: C.DataConfig) -> None:
    """Warn when the data at the run's (absolute) data path is not what it was trained on."""
    from .data import DataWarning, data_path, fingerprint
    path = data_path(data_cfg.name)
    if path is None or not data_cfg.fingerprint or not path.exists():
        return
    now = fingerprint(str(path))
    if now != data_cfg.fingerprint:
        warnings.warn(DataWarning(f"the data at {path} has changed since this model was trained "
                                  f"({data_cfg.fingerprint} then, {now} now): the figures are "
                                  "for other data"), stacklevel=2)


def _term(value: float) -> str:
    """A bound term: 4 decimals, or 3 significant digits when it is below 1e-3 but not zero
    (L_0 for 17-level digits on the cosine schedule is ~1e-19 bits/dim, not 0.0000)."""
    return f"{value:.3g}" if value != 0 and abs(value) < 1e-3 else f"{value:.4f}"


# ---- show ------------------------------------------------------------------------------------

def cmd_show(args) -> int:
    from .data import load_data
    from .loading import build_diffusion, load
    from .outputs import check_output

    out = check_output(args.out)
    written: list[Path] = []
    if args.checkpoint:
        run = load(args.checkpoint, device=args.device)
        diffusion = run.diffusion
        # A diffusers model names no data set: without --data only the reverse process.
        data_cfg = _data_config(run, args.data) if args.data or run.config.data.name else None
    else:
        cfg = C.RUN_PRESETS[C.default_preset_for(args.data or "digits")]
        data_cfg = cfg.data
        if args.data:
            data_cfg = C.section_from_dict(C.DataConfig, {"name": args.data}, base=cfg.data)
        diffusion = build_diffusion(cfg)
        run = None
    if data_cfg is not None:
        check_output(out, data=_data_folder(data_cfg), writable=False)
        _show_forward(diffusion, load_data(data_cfg, "test"), args, out, written)
    else:
        print("no data set for forward.png (the model names none): pass --data to draw it")
    if run is not None:
        _show_reverse(run, args, out, written)
    for p in written:
        print(f"wrote {p}")
    return 0


def _show_forward(diffusion, data, args, out: Path, written: list) -> None:
    """forward.png/.gif: data images noised by iterated single steps q(x_t | x_{t-1})."""
    import torch

    from . import viz

    if data.kind != "image":
        raise ConfigError("show draws image strips; 2-D data sets have scatter plots from train")
    n_cols = args.frames
    T = diffusion.num_timesteps
    # One image per row, noised step by step, shown at n_cols times.
    g = torch.Generator().manual_seed(args.seed)
    x = data.head(args.num).double()
    keep = sorted({round(i * (T - 1) / (n_cols - 1)) for i in range(n_cols)})
    frames, gif_frames = [x.float()], [x.float()]
    for i in range(T):
        x = diffusion.q_step_sample(x, torch.full((x.shape[0],), i),
                                    torch.randn(x.shape, generator=g, dtype=torch.float64))
        if i in keep[1:]:
            frames.append(x.float().clamp(-1, 1))
        if i % max(1, T // 60) == 0 or i == T - 1:
            gif_frames.append(x.float().clamp(-1, 1))
    labels = ["x_0"] + [f"t={i + 1}" for i in keep[1:]]
    written.append(viz.save_strip(frames, out / "forward.png", labels=labels))
    written.append(viz.save_gif(gif_frames, out / "forward.gif"))


def _show_reverse(run, args, out: Path, written: list) -> None:
    """reverse.png/.gif: samples denoised from pure noise by the ancestral sampler."""
    import torch

    from . import viz
    from .loading import clip_denoised_for
    from .sampling import sample

    n_cols, diffusion = args.frames, run.diffusion
    T = diffusion.num_timesteps
    snaps: dict[int, torch.Tensor] = {}
    gif: list[torch.Tensor] = []

    def grab(i, n, xt, pred_x0):
        if i in marks:
            snaps[i] = xt.float().clamp(-1, 1).cpu()
        if i % max(1, n // 60) == 0 or i == n - 1:
            gif.append(xt.float().clamp(-1, 1).cpu())

    marks = {round(k * (T - 1) / (n_cols - 1)) for k in range(n_cols)}
    sample(run.model, diffusion, (args.num, *run.data_shape), method="ancestral",
           clip_denoised=clip_denoised_for(run.kind) and run.config.sample.clip_denoised,
           seeds=range(args.seed, args.seed + args.num), device=run.device, callback=grab)
    order = sorted(snaps)
    written.append(viz.save_strip([snaps[i] for i in order], out / "reverse.png",
                                  labels=[f"t={T - i - 1}" for i in order]))
    written.append(viz.save_gif(gif, out / "reverse.gif"))


# ---- encode ----------------------------------------------------------------------------------

def cmd_encode(args) -> int:
    import torch

    from . import viz
    from .data import load_data
    from .loading import clip_denoised_for, load
    from .outputs import check_output
    from .sampling import ddim_reconstruct

    out = check_output(args.out, suffixes=(".png", ".npz"))  # before the work, not after
    run = load(args.checkpoint, device=args.device)
    if run.kind != "image":
        raise ConfigError("encode works on image models")
    data_cfg = _data_config(run, args.data)
    check_output(out, suffixes=(".png", ".npz"), data=_data_folder(data_cfg), writable=False)
    x0 = load_data(data_cfg, args.split).head(args.num).to(run.device)
    if tuple(x0.shape[1:]) != run.data_shape:
        raise ConfigError(f"images of shape {tuple(x0.shape[1:])} do not fit this model "
                          f"({run.data_shape})")
    x_T, recon = ddim_reconstruct(run.model, run.diffusion, x0, args.steps,
                                  clip_denoised=clip_denoised_for(run.kind))
    err = (recon - x0).abs()
    rmse = float(err.pow(2).mean().sqrt())
    print(f"DDIM inversion over {args.steps} steps of {x0.shape[0]} images: reconstruction "
          f"RMSE {rmse:.4f}, max abs error {float(err.max()):.4f} (data range [-1, 1]); "
          f"x_T std {float(x_T.std()):.3f} (1 for a perfect Gaussian code)")
    if out.suffix.lower() == ".npz":
        _write_npz(out, x_T=x_T.float().cpu().numpy())
    else:
        viz.save_strip([x0.cpu(), x_T.clamp(-3, 3).div(3).cpu(), recon.cpu()], out,
                       labels=["x_0", "x_T", "recon"])
    print(f"wrote {out}")
    return 0 if torch.isfinite(x_T).all() else 1


# ---- export ----------------------------------------------------------------------------------

def cmd_export(args) -> int:
    from .interop import check_export_target, export_pipeline
    from .loading import load
    from .outputs import check_output, check_writable

    check_output(args.out, writable=False)  # not inside a checkpoint or a run's checkpoints/
    out = check_export_target(args.out, args.checkpoint, force=args.force)
    check_writable(out.parent)
    run = load(args.checkpoint, device="cpu", use_ema=not args.no_ema)
    if run.kind != "image":
        raise ConfigError(f"{run.path} is a 2-D point model (an MLP); diffusers' pipelines "
                          "hold image U-Nets only")
    export_pipeline(out, run.config.model, run.model.state_dict(), run.diffusion,
                    clip_sample=run.config.sample.clip_denoised)
    weights = "raw" if args.no_ema else "EMA"
    where = f"step {run.step}" if run.step is not None else run.source
    print(f"wrote {out} (DDPMPipeline, {weights} weights of {run.path}, {where}); load it with "
          f"DDPMPipeline.from_pretrained({str(out)!r})")
    return 0


# ---- fid / fid-stats -------------------------------------------------------------------------

def _inception(args, device):
    from .fid import load_inception
    path = args.inception
    if args.download_inception and path is None:
        from .fid.inception import download_inception
        path = download_inception()
    return load_inception(path, device=device)


def _fid_sample_features(args, net, device_name: str):
    """Features of --num samples of --checkpoint (rank 0; None on the other ranks)."""
    import dataclasses

    from . import dist
    from .fid import sample_features
    from .loading import load

    run = load(args.checkpoint, device=device_name, use_ema=not args.raw_weights)
    if run.kind != "image":
        raise ConfigError("FID needs an image model; this run models 2-D points")
    base = dataclasses.replace(run.config.sample, num=50_000, batch_size=250)
    sc = C.section_from_dict(C.SampleConfig, C.flags_to_dict(args, C.SampleConfig), base=base)
    dist.init_process_group(run.device)
    return sample_features(run.model, run.diffusion, run.data_shape, net, sc.num,
                           batch_size=sc.batch_size, sampler=sc.sampler,
                           steps=sc.steps or None, seed=sc.seed, spacing=sc.spacing,
                           eta=sc.eta, clip_denoised=sc.clip_denoised, device=run.device,
                           progress=not args.no_progress)


def _print_scores(res: dict) -> None:
    ref = "statistics" if res["num_ref"] is None else f"{res['num_ref']} reference images"
    print(f"{res['num_samples']} samples against {ref} (TF-Inception 2015-12-05, "
          "TF1 bilinear resize)")
    print(f"  FID        {res['fid']:.4f}")
    na = "n/a (the reference is a statistics file)"
    if res["kid"] is None:
        print(f"  KID        {na}")
    else:
        print(f"  KID        {res['kid']:.6f} ± {res['kid_se']:.6f} (standard error)")
    print(f"  IS         {res['is']:.4f} ± {res['is_std']:.4f} "
          f"(std over {min(10, res['num_samples'])} splits)")
    for key in ("precision", "recall"):
        value = na if res[key] is None else f"{res[key]:.4f}"
        print(f"  {key:<10} {value}   (k = 3)")


def cmd_fid(args) -> int:
    from . import dist
    from .fid import Statistics, open_source, scores, source_features

    if (args.checkpoint is None) == (args.samples is None):
        raise ConfigError("give exactly one of --checkpoint RUN and --samples F.npz")
    ref = open_source(args.ref)          # a bad --ref fails now, not after the sampling
    samples = open_source(args.samples) if args.samples else None
    if isinstance(samples, Statistics):
        raise ConfigError(f"--samples {args.samples} holds statistics (mu, sigma); give "
                          "images: FID needs the samples' own features")
    device = dist.resolve_device(args.device)
    net = _inception(args, device)
    batch = int(args.batch_size) if args.batch_size else 250
    if samples is None:
        fake = _fid_sample_features(args, net, args.device)
        if fake is None:  # not rank 0
            return 0
    else:
        fake = source_features(net, samples, batch, limit=int(args.num) if args.num else None,
                               progress=not args.no_progress)
    if not isinstance(ref, Statistics):
        ref = source_features(net, ref, batch, progress=not args.no_progress)
    res = scores(fake, ref, device=device)
    res.update(samples=args.samples or args.checkpoint, ref=args.ref)
    if args.json:
        print(json.dumps(res))
    else:
        _print_scores(res)
    return 0


def cmd_fid_stats(args) -> int:
    import numpy as np

    from . import dist
    from .fid import Statistics, feature_stats, open_source, source_features
    from .outputs import atomic_write, check_output

    data_dir = Path(args.data) if Path(args.data).is_dir() else None
    out = check_output(args.out, suffixes=(".npz",), data=data_dir)
    source = open_source(args.data)
    if isinstance(source, Statistics):
        raise ConfigError(f"{args.data} already holds statistics (mu, sigma)")
    net = _inception(args, dist.resolve_device(args.device))
    feats = source_features(net, source, args.batch_size, limit=args.num,
                            progress=not args.no_progress)
    mu, sigma = feature_stats(feats.pool)
    atomic_write(out, lambda f: np.savez(f, mu=mu, sigma=sigma, num=np.array(len(feats))))
    print(f"wrote {out}: mu [2048], sigma [2048, 2048] of {len(feats)} images of {args.data}")
    return 0


# ---- config ----------------------------------------------------------------------------------

def cmd_config(args) -> int:
    print(C.to_toml(C.RUN_PRESETS[args.preset]), end="")
    return 0


def cmd_prepare(args) -> int:
    from .data.prepare import prepare
    m = prepare(args.src, args.out, image_size=args.image_size, channels=args.channels,
                fmt=args.format, workers=args.workers, progress=not args.no_progress,
                bad_files=args.bad_files, shard_size=args.shard_size)
    c, h, w = m["shape"]
    labels = f", {len(m['class_names'])} classes" if m["class_names"] else ""
    print(f"prepared {m['count']} images of {c}x{h}x{w}{labels} into {args.out} "
          f"({len(m['skipped'])} unreadable skipped); train with --data {args.out}")
    return 0


# ---- parser ----------------------------------------------------------------------------------

EPILOG_FID = """examples:
  ddpmkit fid-stats ./cifar10_train_png --out cifar10_stats.npz --inception pt_inception.pth
  ddpmkit fid --checkpoint runs/cifar --ref cifar10_stats.npz --inception pt_inception.pth
  ddpmkit fid --samples samples.npz --ref ./cifar10_train_png --json
  torchrun --nproc_per_node 8 -m ddpmkit fid --checkpoint runs/cifar --ref cifar10_stats.npz
The Inception weights are not shipped: download pt_inception-2015-12-05-6726825d.pth
(pytorch-fid's release "fid_weights") and pass --inception FILE, set DDPMKIT_INCEPTION, or
put it in ~/.cache/ddpmkit/. Images are resized to 299 x 299 with TensorFlow 1's bilinear
resize, as the TF code of the published FIDs does (pytorch-fid and clean-fid resize
differently, which changes FID: compare figures made the same way)."""


def _add_fid_parsers(sub, fmt) -> None:
    def weights(p):
        p.add_argument("--inception", metavar="FILE",
                       help="TF-Inception 2015-12-05 weights: pytorch-fid's .pth or a "
                            ".safetensors copy (default: $DDPMKIT_INCEPTION, then "
                            "~/.cache/ddpmkit/)")
        p.add_argument("--download-inception", action="store_true",
                       help="without --inception: download the weights once into "
                            "~/.cache/ddpmkit/ (needs a network; SHA-256 prefix checked)")
        p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
        p.add_argument("--no-progress", action="store_true", help="no progress bar")
        _add_common(p)

    p = sub.add_parser("fid", help="FID, KID, IS, precision/recall of samples",
                       description="Score samples against reference images with the "
                       "TF-Inception v3 of the published FIDs: FID, KID ± its standard "
                       "error, Inception Score ± std over 10 splits, precision and recall "
                       "(k = 3). Samples: --samples (an .npz of uint8 images, an .npy, an "
                       "image folder) or --checkpoint (drawn here, --num of them, split "
                       "across torchrun processes). REF: images (folder, .npy/.npz, a data "
                       "set name) or a statistics file from `ddpmkit fid-stats` / "
                       "pytorch-fid / the ADM suite (FID only).",
                       epilog=EPILOG_FID, formatter_class=fmt)
    p.add_argument("--checkpoint", help="sample from it: " + CHECKPOINT_HELP)
    p.add_argument("--raw-weights", action="store_true", help="use the raw, not the EMA weights")
    p.add_argument("--samples", help="images to score (.npz arr_0, .npy or a folder)")
    p.add_argument("--ref", required=True, help="reference images or statistics (.npz mu/sigma)")
    p.add_argument("--json", action="store_true", help="print one JSON line")
    weights(p)
    C.add_flags(p, C.SampleConfig, group_title="sampling options (--checkpoint; with --samples, "
                "--num takes the first N images, default all, and --batch-size is the "
                "Inception batch)",
                defaults=C.SampleConfig(num=50_000, batch_size=250))
    p.set_defaults(func=cmd_fid)

    p = sub.add_parser("fid-stats", help="FID statistics (mu, sigma) of a reference set",
                       description="Inception pool3 mean and covariance of DATA (an image "
                       "folder, .npy/.npz images, a data set name) into an .npz with keys "
                       "mu and sigma, as pytorch-fid writes them; pass it as `fid --ref`.",
                       epilog=EPILOG_FID, formatter_class=fmt)
    p.add_argument("data", help="image folder, .npy/.npz images or a data set name")
    p.add_argument("--out", required=True, help="statistics file (.npz)")
    p.add_argument("--num", type=_int_at_least(2), help="only the first N images")
    p.add_argument("--batch-size", type=_int_at_least(1), default=250,
                   help="images per Inception batch (default: 250)")
    weights(p)
    p.set_defaults(func=cmd_fid_stats)


def _add_edit_commands(sub, fmt) -> None:
    from .cli_edit import add_commands  # numpy and friends load only when a command runs
    add_commands(sub, _int_at_least, fmt)


def _add_prepare_parser(sub, fmt) -> None:
    p = sub.add_parser("prepare", help="decode and resize images once, into uint8 files",
                       description="Decode, resize/centre-crop and quantise a data source once, "
                       "in parallel, into a prepared folder: images.npy (uint8 [N, S, S, C]), "
                       "labels.npy (class subfolders, .npz 'labels', NAME.labels.npy, .cls "
                       "members), or tar shards with --format shards, and manifest.json "
                       "(count, shape, levels, class names, SHA-256 per file). "
                       "`ddpmkit train --data OUT` reads it in place, without decoding.",
                       epilog="example:\n  ddpmkit prepare ./celeba_jpgs --out data/celeba64 "
                       "--image-size 64\n  ddpmkit train --data data/celeba64 --config cifar10",
                       formatter_class=fmt)
    p.add_argument("src", help="an image folder (class subfolders become labels), a .npy/.npz "
                   "array, tar shards (a brace pattern, glob or list file), another "
                   "prepared folder, a Hugging Face datasets folder (save_to_disk; its train "
                   "split) or parquet files (a file, a glob, a folder); the last two need pip "
                   "install 'ddpmkit[hf]'")
    p.add_argument("--out", required=True, help="the folder to write")
    p.add_argument("--image-size", type=_int_at_least(0), default=0,
                   help="resize + centre-crop to N x N (default 0: the images' own size, which "
                        "must then agree)")
    p.add_argument("--channels", type=int, choices=(0, 1, 3), default=0,
                   help="1 (grey) or 3 (RGB); 0: the data's own (default: 0)")
    p.add_argument("--format", default="npy", choices=("npy", "shards"),
                   help="npy: one images.npy (+ labels.npy); shards: tar shards of KEY.npy "
                        "(+ KEY.cls) members, in a seeded shuffle, for streaming or copying "
                        "to object storage (default: npy)")
    p.add_argument("--shard-size", type=_int_at_least(20), default=10_000,
                   help="--format shards: examples per shard, a multiple of 20 "
                        "(default: 10000)")
    p.add_argument("--workers", type=_int_at_least(-1), default=-1,
                   help="decoding processes (default -1: one per CPU)")
    p.add_argument("--bad-files", default="skip", choices=("skip", "fail"),
                   help="unreadable images: skip (warn, list in the manifest) or fail")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(p)
    p.set_defaults(func=cmd_prepare)


def _add_train_parser(sub, fmt) -> None:
    p = sub.add_parser("train", help="train a model (default: the digits preset)",
                       description="Train a diffusion model. With no arguments: the built-in "
                       "digits preset (8x8 digits, ~8 minutes on 2 CPU cores). The defaults "
                       "shown are that preset's; --config, or --data naming a 2-D set, starts "
                       "from another preset (see `ddpmkit config PRESET`). Flags override it.",
                       epilog=EPILOG_TRAIN, formatter_class=fmt)
    p.add_argument("--config", help="a preset name or a .toml/.json config file")
    p.add_argument("--out", help="run folder (default: runs/<data name>)")
    p.add_argument("--resume", default="auto",
                   help="auto (newest checkpoint in --out, else a fresh start), none, or a "
                        "checkpoint folder or run folder (its newest checkpoint); rank 0 "
                        "resolves it for all ranks (default: auto)")
    p.add_argument("--overwrite", action="store_true",
                   help="with --resume none (or a checkpoint from elsewhere): move the run "
                        "already in --out aside into --out/replaced-<time>/ and start there")
    p.add_argument("--allow-changes", action="store_true",
                   help="resume even with changed data, dropout, loss, seed or timestep "
                        "sampler (the network, diffusion and data shape can never change)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    _add_common(p)
    for section, cls in C.SECTIONS.items():
        prefix = "sample_" if section == "sample" else ""
        C.add_flags(p, cls, prefix=prefix, group_title=f"{section} options",
                    defaults=getattr(C.RUN_PRESETS["digits"], section))
    p.set_defaults(func=cmd_train)


def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(
        prog="ddpmkit", formatter_class=fmt,
        description="Denoising diffusion probabilistic models: train, sample, evaluate.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    _add_train_parser(sub, fmt)

    p = sub.add_parser("sample", help="draw samples from a trained model",
                       description="Draw samples from a checkpoint (EMA weights) into a PNG grid "
                       "or an .npz of uint8 [N, H, W, C] under 'arr_0'.", formatter_class=fmt)
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--out", default="samples.png", help="F.png or F.npz (default: samples.png)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--raw-weights", action="store_true", help="use the raw, not the EMA weights")
    p.add_argument("--no-progress", action="store_true")
    _add_tf32(p)
    _add_common(p)
    p.add_argument("--class", dest="class_label", metavar="K|all", help=CLASS_HELP)
    p.add_argument("--guidance-interval", nargs=2, type=float, metavar=("LO", "HI"),
                   help=GUIDANCE_INTERVAL_HELP)
    C.add_flags(p, C.SampleConfig, group_title="sampling options")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="bits/dim of a data split under the full bound",
                       description="Negative log-likelihood bound (L_T + sum L_(t-1) + L_0) in "
                       "bits per dimension, every term evaluated.", formatter_class=fmt)
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data", help="data to evaluate on (default: the run's; needed for a "
                   "diffusers model): an image folder, a .npy/.npz array or a built-in set")
    p.add_argument("--split", default="test", choices=("test", "train"))
    p.add_argument("--json", action="store_true", help="print one JSON line")
    p.add_argument("--levels", type=_int_at_least(2),
                   help="override the data's number of levels")
    p.add_argument("--force", action="store_true", help="allow --levels that differs from the data")
    p.add_argument("--max-examples", type=_int_at_least(1),
                   help="evaluate only the first N examples")
    p.add_argument("--batch-size", type=_int_at_least(1, C.LIMITS["batch_size"]), default=1000,
                   help="network batch (default: 1000)")
    p.add_argument("--seed", type=_seed, default=0, help="noise seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--no-progress", action="store_true")
    _add_tf32(p)
    _add_common(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("show", help="pictures of the forward and reverse processes",
                       description="Write forward.png/.gif (a data image noised step by step) "
                       "and, with --checkpoint, reverse.png/.gif (a sample denoised from pure "
                       "noise).", formatter_class=fmt)
    p.add_argument("--checkpoint", help=CHECKPOINT_HELP + ", for the reverse process")
    p.add_argument("--data", help="data set for the forward process (default: "
                   "the checkpoint's, else digits)")
    p.add_argument("--out", default="show", help="output folder (default: show)")
    p.add_argument("--num", type=_int_at_least(1, 1000), default=8,
                   help="rows (examples) (default: 8)")
    p.add_argument("--frames", type=_int_at_least(2, 1000), default=9,
                   help="columns in the strips (default: 9)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--device", default="auto")
    _add_common(p)
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("encode", help="DDIM inversion: images -> x_T -> images",
                       description="Encode data images to noise with deterministic DDIM (eta = "
                       "0), decode them back, and report the reconstruction error.",
                       formatter_class=fmt)
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--data", help="images to encode (default: the run's data set)")
    p.add_argument("--split", default="test", choices=("test", "train"))
    p.add_argument("--num", type=_int_at_least(1, C.LIMITS["samples"]), default=16,
                   help="images (default: 16)")
    p.add_argument("--steps", type=_int_at_least(1, C.LIMITS["timesteps"]), default=100,
                   help="DDIM steps (default: 100)")
    p.add_argument("--out", default="encode.png",
                   help="strip .png (x_0 | x_T | recon) or .npz of x_T (default: encode.png)")
    p.add_argument("--device", default="auto")
    _add_common(p)
    p.set_defaults(func=cmd_encode)

    p = sub.add_parser("export", help="write a model as a diffusers DDPMPipeline folder",
                       description="Write a checkpoint as a diffusers DDPMPipeline folder "
                       "(model_index.json, unet/ with safetensors weights, scheduler/), which "
                       "DDPMPipeline.from_pretrained(OUT) loads. The scheduler gets the run's "
                       "betas (a named schedule where one matches, else trained_betas), "
                       "prediction and variance type. 2-D point models cannot be exported.",
                       epilog=EPILOG_EXPORT, formatter_class=fmt)
    p.add_argument("--checkpoint", required=True, help=CHECKPOINT_HELP)
    p.add_argument("--format", default="diffusers", choices=("diffusers",),
                   help="output format (default: diffusers)")
    p.add_argument("--out", required=True, help="output folder; it may not overlap the "
                   "checkpoint, and must be new or empty unless --force")
    p.add_argument("--no-ema", action="store_true", help="export the raw, not the EMA weights")
    p.add_argument("--force", action="store_true",
                   help="replace --out if it holds an earlier export (never other files)")
    _add_common(p)
    p.set_defaults(func=cmd_export)

    _add_fid_parsers(sub, fmt)
    _add_edit_commands(sub, fmt)  # inpaint, edit, interpolate
    _add_prepare_parser(sub, fmt)

    p = sub.add_parser("config", help="print a preset as TOML, to start a config file from")
    p.add_argument("preset", choices=list(C.RUN_PRESETS))
    _add_common(p)
    p.set_defaults(func=cmd_config)
    return parser


@contextlib.contextmanager
def _tidy_warnings(debug: bool):
    """ddpmkit's own warnings as one ``warning: ...`` line each (no source location)."""
    with warnings.catch_warnings():
        if not debug:
            default = warnings.showwarning

            def show(message, category, filename, lineno, file=None, line=None):
                if category.__module__.split(".")[0] == "ddpmkit":
                    print(f"warning: {message}", file=file or sys.stderr)
                else:
                    default(message, category, filename, lineno, file, line)
            warnings.showwarning = show
        yield


def _flag_hint(parser: argparse.ArgumentParser, command: str | None, extra: list[str]) -> str:
    """' (did you mean --x?)' for the first unknown flag, from the command's own flags."""
    sub = next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)
    target = sub.choices.get(command) if sub is not None and command else parser
    known = [o for a in target._actions for o in a.option_strings if o.startswith("--")]
    for word in extra:
        if word.startswith("--"):
            hint = difflib.get_close_matches(word.split("=", 1)[0], known, n=1)
            if hint:
                return f" (did you mean {hint[0]}?)"
    return ""


def main(argv: list[str] | None = None) -> int:
    """The ``ddpmkit`` command; returns the exit status (a Ctrl-C at any moment: 130)."""
    try:
        return _main(argv)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # what parse_args would say, plus a did-you-mean
        parser.error(f"unrecognized arguments: {' '.join(extra)}"
                     f"{_flag_hint(parser, getattr(args, 'command', None), extra)}")
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        if args.command in ("train", "sample", "eval", "encode", "inpaint", "edit",
                            "interpolate"):
            from .runtime import tune_allocator
            tune_allocator()  # ~1.1x faster CPU steps; DDPMKIT_TUNE_MALLOC=0 opts out
        with _tidy_warnings(args.debug):
            return args.func(args)
    except DdpmkitError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        if "torch.distributed" in sys.modules:  # else torch was never imported: nothing to do
            from . import dist
            dist.destroy()  # leave torchrun's process group cleanly (no-op in one process)


if __name__ == "__main__":
    sys.exit(main())
