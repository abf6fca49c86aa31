"""The editing commands of ``ddpmkit``: inpaint | edit | interpolate (see cli.py for the rest).

Images in and out: a PNG/JPEG (one image) or an ``.npz`` of uint8 ``(N, H, W, C)`` under
``arr_0``; the output has the input's form. Masks: white (255) = generate, black (0) = keep.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np

from .config import SampleConfig
from .errors import ConfigError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Measured on a correlated Gaussian with an exact denoiser (tests/test_conditioning.py): at 50
# steps, replacement alone misses the conditional mean by ~20 standard errors (KL 0.098);
# RePaint with jump 2, resample 10 is within noise (KL 0.003); jumps of 5 and 10 left the
# mean 2.5 and 6 standard errors off.
# --method reconstruction (Ho et al. 2022): one pass (resample 1) at w_r 16, chosen on
# validation digits (README, "Inpainting"); it reads as the true digit more often than RePaint
# but draws from a narrower law than the true conditional (KL 0.43 on the Gaussian).
# (editing.RECONSTRUCTION_WEIGHT, repeated here so that building the parser needs no torch.)
INPAINT_DEFAULTS = dict(steps=50, jump=2, resample=10, recon_resample=1, recon_weight=16.0)


def _read_uint8(path: str, what: str) -> tuple[np.ndarray, bool]:
    """A PNG/JPEG -> uint8 [1, H, W, C] (C 1 or 3), or an .npz's arr_0 -> uint8 [N, H, W, C].
    Returns (array, from_npz)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p}: no such file")
    if p.suffix.lower() == ".npz":
        try:
            with np.load(p, allow_pickle=False) as f:
                if "arr_0" not in f.files:
                    raise ConfigError(f"{what} {p}: no 'arr_0' array (has {', '.join(f.files)})")
                arr = f["arr_0"]
        except (OSError, ValueError) as e:
            raise ConfigError(f"{what} {p} is not a readable .npz: {e}") from None
        if arr.dtype != np.uint8:
            raise ConfigError(f"{what} {p}: arr_0 must be uint8, got {arr.dtype}")
        if arr.ndim == 3:
            arr = arr[..., None]
        if arr.ndim != 4 or arr.shape[0] < 1:
            raise ConfigError(f"{what} {p}: arr_0 must be (N, H, W, C), got {arr.shape}")
        return arr, True
    if p.suffix.lower() not in IMAGE_SUFFIXES:
        raise ConfigError(f"{what} {p}: use a .png, .jpg or .npz file")
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(p) as img:
            img.load()
            mode = "L" if img.mode in ("1", "L", "I;16", "I", "F", "LA") else "RGB"
            arr = np.asarray(img.convert(mode))
    except (OSError, UnidentifiedImageError) as e:
        raise ConfigError(f"{what} {p} is not a readable image: {e}") from None
    return (arr[None, ..., None] if arr.ndim == 2 else arr[None]), False


def load_images(path: str, data_shape: tuple[int, ...]) -> tuple[np.ndarray, bool]:
    """Images for a model of data shape (C, H, W) -> uint8 [N, H, W, C], from_npz."""
    arr, from_npz = _read_uint8(path, "--image")
    C, H, W = data_shape
    if arr.shape[1:3] != (H, W):
        raise ConfigError(f"--image {path}: images are {arr.shape[2]}x{arr.shape[1]}, this model "
                          f"makes {W}x{H} images")
    if arr.shape[3] != C:
        if C == 3 and arr.shape[3] == 1:
            arr = np.repeat(arr, 3, axis=3)
        elif C == 1 and arr.shape[3] == 3 and not from_npz:
            from .data.images import luma
            arr = luma(arr)[..., None]
        else:
            raise ConfigError(f"--image {path}: {arr.shape[3]} channel(s), the model has {C}")
    return arr, from_npz


def load_mask(path: str, images: np.ndarray) -> np.ndarray:
    """A mask PNG (one for all) or .npz (one per image) -> bool [1 or N, H, W] (True =
    generate). Only pure black (0) and white (255) are accepted."""
    arr, _ = _read_uint8(path, "--mask")
    if arr.shape[3] != 1:
        if not (arr == arr[..., :1]).all():
            raise ConfigError(f"--mask {path}: use a black-and-white (grey) mask, not colour")
        arr = arr[..., :1]
    arr = arr[..., 0]
    N, H, W = images.shape[:3]
    if arr.shape[1:] != (H, W) or arr.shape[0] not in (1, N):
        raise ConfigError(f"--mask {path} has shape {arr.shape[1:]} x {arr.shape[0]}; the "
                          f"images are {H}x{W} x {N}: use one {W}x{H} mask or one per image")
    if not np.isin(arr, (0, 255)).all():
        raise ConfigError(f"--mask {path} has grey values; use only black (0, keep) and white "
                          "(255, generate)")
    return arr == 255


def save_like_input(u8: np.ndarray, out: Path, from_npz: bool) -> None:
    """uint8 [N, H, W, C] -> ``out`` in the form the input came in (atomically)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    if from_npz:
        tmp = out.with_name(f".{out.name}.tmp.npz")
        np.savez(tmp, arr_0=u8)
        tmp.replace(out)
        return
    from PIL import Image
    img = Image.fromarray(u8[0, ..., 0] if u8.shape[3] == 1 else u8[0])
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    img.save(tmp)
    tmp.replace(out)


def _out_path(path: str, from_npz: bool | None) -> Path:
    out = Path(path)
    ok = (".npz",) if from_npz else IMAGE_SUFFIXES if from_npz is False else (".png",)
    if out.suffix.lower() not in ok:
        raise ConfigError(f"--out {out}: use a {' or '.join(ok)} name (the same form as --image)")
    if out.is_dir():
        raise ConfigError(f"--out {out} is a folder; give a file name")
    return out


def _labels(args, run, n: int):
    """--class K -> labels [n] (None without --class); checks the model is conditional."""
    if args.class_label is None:
        if args.guidance is not None:
            raise ConfigError("--guidance needs --class K (it mixes the class-K and the "
                              "unconditional prediction)")
        return None
    if args.guidance is None:
        args.guidance = SampleConfig().guidance
    k = run.config.model.num_classes
    if not k:
        raise ConfigError("--class needs a class-conditional model (train it with --class-cond)")
    if not 0 <= args.class_label < k:
        raise ConfigError(f"--class {args.class_label} is out of range: this model has classes "
                          f"0..{k - 1}")
    import torch
    return torch.full((n,), args.class_label, dtype=torch.long)


def _scale(args) -> float:
    # after _labels: None only without --class, where guidance does not apply
    return 1.0 if args.guidance is None else args.guidance


def _to_model(u8: np.ndarray, device):
    import torch
    x = torch.tensor(u8).permute(0, 3, 1, 2).float()  # a copy: the input may be read-only
    return (x / 127.5 - 1.0).to(device)


def _load(args):
    from .loading import load
    run = load(args.checkpoint, device=args.device, use_ema=not args.raw_weights)
    if run.kind != "image":
        raise ConfigError(f"{args.command} works on image models; this one makes 2-D points")
    return run


def _batches(n: int, size: int):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


def cmd_inpaint(args) -> int:
    import torch
    from tqdm import tqdm

    from .data import to_uint8
    from .editing import inpaint

    recon = args.method == "reconstruction"
    if args.recon_weight is not None and not recon:
        raise ConfigError("--recon-weight applies to --method reconstruction only")
    if args.recon_weight is None:
        args.recon_weight = INPAINT_DEFAULTS["recon_weight"]
    if args.resample is None:
        args.resample = INPAINT_DEFAULTS["recon_resample" if recon else "resample"]
    run = _load(args)
    images, from_npz = load_images(args.image, run.data_shape)
    out = _out_path(args.out, from_npz)
    mask = load_mask(args.mask, images)
    y = _labels(args, run, images.shape[0])
    x0 = _to_model(images, run.device)
    mask_t = torch.from_numpy(mask)[:, None].to(run.device)  # [1 or N, 1, H, W]
    results = []
    batches = _batches(len(x0), args.batch_size)
    bar = None if args.no_progress else tqdm(desc="inpaint", unit="step", dynamic_ncols=True)

    def tick(i: int, n: int, x) -> None:
        if bar.total is None:
            bar.reset(total=n * len(batches))
        bar.update(1)
    for a, b in batches:
        m = mask_t if mask_t.shape[0] == 1 else mask_t[a:b]
        x = inpaint(run.model, run.diffusion, x0[a:b], m, method=args.method, steps=args.steps,
                    jump=args.jump, resample=args.resample, recon_weight=args.recon_weight,
                    seeds=range(args.seed + a, args.seed + b),
                    y=None if y is None else y[a:b], guidance=_scale(args),
                    callback=tick if bar is not None else None)
        results.append(x.float().cpu())
    if bar is not None:
        bar.close()
    u8 = to_uint8(torch.cat(results))
    # Kept pixels are the input's own bytes (not a float round trip).
    keep = ~np.broadcast_to(mask[..., None], u8.shape)
    u8[keep] = images[keep]
    save_like_input(u8, out, from_npz)
    detail = "" if args.method == "replace" else f", jump {args.jump}, resample {args.resample}"
    if args.method == "reconstruction":
        detail += f", w_r {args.recon_weight:g}"
    print(f"inpainted {len(u8)} image(s) ({args.method}, {args.steps} steps{detail}) -> {out}")
    return 0


def cmd_edit(args) -> int:
    import torch

    from .data import to_uint8
    from .editing import sdedit

    run = _load(args)
    images, from_npz = load_images(args.image, run.data_shape)
    out = _out_path(args.out, from_npz)
    y = _labels(args, run, images.shape[0])
    x0 = _to_model(images, run.device)
    results = []
    for a, b in _batches(len(x0), args.batch_size):
        x = sdedit(run.model, run.diffusion, x0[a:b], args.strength, method=args.sampler,
                   steps=args.steps, seeds=range(args.seed + a, args.seed + b),
                   y=None if y is None else y[a:b], guidance=_scale(args))
        results.append(x.float().cpu())
    save_like_input(to_uint8(torch.cat(results)), out, from_npz)
    print(f"edited {len(images)} image(s) (SDEdit, strength {args.strength}, {args.sampler}) "
          f"-> {out}")
    return 0


def cmd_interpolate(args) -> int:
    from . import viz
    from .editing import interpolate

    if len(args.image) != 2:
        raise ConfigError(f"interpolate needs exactly two --image, got {len(args.image)}")
    out = _out_path(args.out, None)
    run = _load(args)
    ends = []
    for path in args.image:
        u8, _ = load_images(path, run.data_shape)
        ends.append(_to_model(u8[:1], run.device))
    y = _labels(args, run, 1)
    frames = interpolate(run.model, run.diffusion, ends[0], ends[1], num=args.num,
                         steps=args.steps, y=y, guidance=_scale(args))
    viz.save_strip([f[None].float().cpu() for f in frames], out,
                   labels=["A"] + [""] * (args.num - 2) + ["B"])
    print(f"wrote {args.num} frames (DDIM inversion over {args.steps} steps, slerp) to {out}")
    return 0


def _common(p: argparse.ArgumentParser, int_at_least, with_batch: bool = True) -> None:
    p.add_argument("--checkpoint", required=True, help="run folder or checkpoint folder")
    p.add_argument("--class", dest="class_label", type=int, metavar="K",
                   help="class label for a class-conditional model (default: none, the "
                        "unconditional null class)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale with --class; 1 is the plain conditional "
                        f"model (default: {SampleConfig().guidance:g}, from "
                        "benchmarks/guidance.py)")
    p.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: 0)")
    if with_batch:
        p.add_argument("--batch-size", type=int_at_least(1), default=256,
                       help="images per batch (default: 256)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--raw-weights", action="store_true", help="use the raw, not the EMA weights")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")


def _weight(text: str) -> float:
    """argparse type: a finite float >= 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"{text!r} must be a finite number >= 0")
    return value


def add_commands(sub, int_at_least, fmt) -> None:
    """Register inpaint, edit and interpolate on ``sub`` (cli.py's subparsers)."""
    from .sampling import METHODS

    p = sub.add_parser(
        "inpaint", help="fill in masked pixels of images", formatter_class=fmt,
        description="Generate the white pixels of --mask in each image and keep the black ones "
        "bit for bit. --image: a PNG/JPEG or an .npz of uint8 (N, H, W, C) under arr_0; --mask: "
        "a PNG (one for all) or an .npz (one per image), white (255) = generate, black (0) = "
        "keep; --out has --image's form. RePaint (Lugmayr et al. 2022) resamples: after every "
        "--jump reverse steps it re-noises and redoes them, --resample passes in all (steps x "
        "resample network calls); --method replace is one pass; --method reconstruction (Ho "
        "et al. 2022) adds reconstruction guidance of weight --recon-weight to every reverse "
        "step (one extra backward pass each) on the same --jump/--resample schedule "
        "(--resample 1: one pass).",
        epilog="example:\n  ddpmkit inpaint --checkpoint runs/digits --image test.npz "
               "--mask bottom.png --out filled.npz")
    _common(p, int_at_least)
    p.add_argument("--image", required=True, help="PNG/JPEG or .npz of uint8 (N, H, W, C)")
    p.add_argument("--mask", required=True, help="PNG or .npz; white = generate, black = keep")
    p.add_argument("--out", required=True, help="output, same form as --image")
    p.add_argument("--method", choices=("repaint", "replace", "reconstruction"),
                   default="repaint",
                   help="repaint (with resampling; samples the conditional law), replace "
                        "(one pass), or reconstruction (Ho et al. 2022: guidance towards the "
                        "kept pixels; the completion that fits them best, see --recon-weight) "
                        "(default: repaint)")
    p.add_argument("--steps", type=int_at_least(1), default=INPAINT_DEFAULTS["steps"],
                   help=f"reverse steps kept of T (default: {INPAINT_DEFAULTS['steps']})")
    p.add_argument("--jump", type=int_at_least(1), default=INPAINT_DEFAULTS["jump"],
                   help=f"RePaint jump length j (default: {INPAINT_DEFAULTS['jump']})")
    p.add_argument("--resample", type=int_at_least(1),
                   help="RePaint passes r per block (default: "
                        f"{INPAINT_DEFAULTS['resample']} for repaint, "
                        f"{INPAINT_DEFAULTS['recon_resample']} for reconstruction)")
    p.add_argument("--recon-weight", type=_weight,
                   help="--method reconstruction: weight w_r >= 0 of the guidance, x0^b -= "
                        "w_r sqrt(alpha_bar_t) / 2 grad ||x^a - x0^a||^2 (0: none). 2 matches "
                        "the true conditional law best on a Gaussian; larger weights follow "
                        "the kept pixels more closely (narrower completions) (default: "
                        f"{INPAINT_DEFAULTS['recon_weight']:g}, chosen on validation digits)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_inpaint)

    p = sub.add_parser(
        "edit", help="SDEdit: re-imagine images from a noised version", formatter_class=fmt,
        description="SDEdit (Meng et al. 2022): noise each image with q(x_t | x_0) to t = "
        "strength x T, then run the reverse process. Low strength keeps the image, high "
        "strength keeps only its rough layout; with --class K on a class-conditional model the "
        "result is pulled towards class K.",
        epilog="example:\n  ddpmkit edit --checkpoint runs/digits-cond --image sketch.png "
               "--strength 0.5 --class 3 --out three.png")
    _common(p, int_at_least)
    p.add_argument("--image", required=True, help="PNG/JPEG or .npz of uint8 (N, H, W, C)")
    p.add_argument("--out", required=True, help="output, same form as --image")
    p.add_argument("--strength", type=float, default=0.5,
                   help="noise level t0 / T in (0, 1] (default: 0.5)")
    p.add_argument("--sampler", choices=METHODS, default="ancestral",
                   help="reverse process from t0 (default: ancestral, as SDEdit)")
    p.add_argument("--steps", type=int_at_least(1), default=100,
                   help="network calls from t0 (default: 100)")
    p.set_defaults(func=cmd_edit)

    p = sub.add_parser(
        "interpolate", help="interpolate between two images through x_T", formatter_class=fmt,
        description="DDIM-invert two images to noise, slerp between the two codes, decode each "
        "with deterministic DDIM; writes a strip PNG (A ... B).",
        epilog="example:\n  ddpmkit interpolate --checkpoint runs/digits --image a.png "
               "--image b.png --num 8 --out interp.png")
    _common(p, int_at_least, with_batch=False)
    p.add_argument("--image", action="append", required=True,
                   help="an image (PNG/JPEG, or an .npz whose first image is used); twice")
    p.add_argument("--num", type=int_at_least(2), default=8, help="frames (default: 8)")
    p.add_argument("--steps", type=int_at_least(1), default=50,
                   help="DDIM steps for inversion and decoding (default: 50)")
    p.add_argument("--out", default="interpolate.png", help="strip PNG (default: "
                   "interpolate.png)")
    p.set_defaults(func=cmd_interpolate)
