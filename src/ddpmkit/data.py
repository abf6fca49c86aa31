"""Training data: the built-in sets, image folders and ``.npy``/``.npz`` arrays.

Every source ends up as one float32 tensor in ``[-1, 1]``:

* images ``[N, C, H, W]`` (C = 1 or 3) on a discrete grid of ``levels`` values per pixel,
  with bin centres at ``-1 + 2k / (levels - 1)`` -- what the discretised Gaussian likelihood
  expects (17 levels for ``digits``, 256 for 8-bit images and arrays);
* 2-D points ``[N, 2]`` (continuous, ``levels=None``).

The 2-D sets are centred and scaled isotropically to unit RMS per coordinate
(``E|x|^2 = 2``), with constants derived in closed form below, so train, test and
:func:`sample_points` share one fixed transform:

============  ===================================================  =====================
set           shape (after scaling)                                extent (noise included)
============  ===================================================  =====================
moons         two interleaved half circles, noise std 0.07         x +-2.4, y +-1.4
swissroll     spiral over 1.5 turns, noise std 0.07                x -2.0..1.9, y -2.0..2.3
8gaussians    8 modes on a circle of radius 1.41, std 0.1 each     +-1.9
checkerboard  8 filled cells of a 4x4 board, uniform inside        +-1.73 (sqrt 3)
circles       two rings, radii 1.79 and 0.89, noise std 0.07       +-2.1
============  ===================================================  =====================

Every failure caused by the input is a :class:`~ddpmkit.errors.DataError` whose message
names the file or value and the problem.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import math
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import POINT_SETS, DataConfig
from .errors import DataError

__all__ = [
    "BUILTIN_SETS",
    "IMAGE_EXTENSIONS",
    "DataWarning",
    "Dataset",
    "data_path",
    "fingerprint",
    "load_data",
    "random_flip",
    "sample_points",
    "to_uint8",
]

BUILTIN_SETS: tuple[str, ...] = ("digits", *POINT_SETS)

# Suffixes (lower case) looked at in image folders; everything else is ignored silently,
# so README.txt or labels.json beside the images do no harm.
IMAGE_EXTENSIONS: frozenset[str] = frozenset({
    ".png", ".apng", ".jpg", ".jpeg", ".jpe", ".jfif", ".webp", ".bmp", ".dib", ".gif",
    ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm", ".tga", ".ico", ".qoi", ".avif",
})

# PIL identifies files by content, not by suffix. Restricting the decoders keeps a
# renamed PostScript file (which PIL would hand to Ghostscript) or another exotic format
# out of the pipeline: such a file is reported as unreadable instead.
_PIL_FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "DIB", "GIF", "TIFF", "PPM", "TGA", "ICO",
                "QOI", "AVIF")

_GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_INT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})

_TEST_EVERY = 20          # image folders and arrays: every 20th example is a test example
_TEST_POINTS = 5000       # size of the 2-D test sets
_DIGITS_TRAIN = 1500      # load_digits has 1797 images: 1500 train, the last 297 test


class DataWarning(UserWarning):
    """A data problem that does not stop loading (a skipped file, a borrowed test split)."""


@dataclass
class Dataset:
    """A whole split in memory.

    ``x``: float32 in [-1, 1]; images ``[N, C, H, W]``, points ``[N, 2]``.
    ``levels``: values per pixel on the grid ``-1 + 2k/(levels-1)`` (17 for digits, 256 for
    8-bit data), ``None`` for continuous points. ``skipped``: unreadable files left out.
    """

    name: str
    x: torch.Tensor
    levels: int | None
    kind: str
    skipped: list[str] = field(default_factory=list)

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example: ``(C, H, W)`` or ``(2,)``."""
        return tuple(self.x.shape[1:])

    def __len__(self) -> int:
        return int(self.x.shape[0])


# ---- public entry points -----------------------------------------------------------------

def load_data(cfg: DataConfig, split: str = "train") -> Dataset:
    """Load split ``"train"`` or ``"test"`` of ``cfg.name`` (a built-in set or a path)."""
    if split not in ("train", "test"):
        raise DataError(f"split={split!r} must be 'train' or 'test'")
    name = cfg.name
    if name in POINT_SETS:
        # Different seeds, so the test points are fresh draws, not a subset of train.
        n, seed = (cfg.num_points, 0) if split == "train" else (_TEST_POINTS, 1)
        gen = torch.Generator().manual_seed(seed)
        return Dataset(name, sample_points(name, n, gen), None, "points", [])
    if name == "digits":
        return _load_digits(cfg, split)
    if not name.strip():  # Path("") is the current folder: never load that by accident
        raise DataError(f"data name {name!r} is empty; pass a built-in set "
                        f"({', '.join(BUILTIN_SETS)}), an image folder or a .npy/.npz file")
    path = Path(name).expanduser()
    if path.is_dir():
        return _load_folder(path, cfg, split)
    if path.is_file():
        if path.suffix.lower() in (".npy", ".npz"):
            return _load_array_file(path, cfg, split)
        raise DataError(f"data file {path} is not a .npy or .npz array; pass an image folder, "
                        f"an array file or one of: {', '.join(BUILTIN_SETS)}")
    hint = difflib.get_close_matches(name, BUILTIN_SETS, n=1)
    more = f" (did you mean {hint[0]!r}?)" if hint else ""
    raise DataError(f"unknown data set {name!r}: not a built-in set "
                    f"({', '.join(BUILTIN_SETS)}) and no such file or folder{more}")


def sample_points(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` fresh points ``[n, 2]`` (float32) of 2-D set ``name``, on ``generator``'s device."""
    if name not in _POINT_FNS:
        hint = difflib.get_close_matches(name, POINT_SETS, n=1)
        more = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise DataError(f"unknown 2-D point set {name!r}; choose one of "
                        f"{', '.join(POINT_SETS)}{more}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataError(f"number of points n={n!r} must be an integer >= 0")
    device = generator.device if generator is not None else torch.device("cpu")
    return _POINT_FNS[name](n, generator, device).to(torch.float32)


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of ``x`` ``[N, C, H, W]`` left-right with probability 1/2 (new tensor)."""
    if x.ndim != 4:
        raise DataError(f"random_flip expects images [N, C, H, W], got shape {tuple(x.shape)}")
    coin = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5
    return torch.where(coin.to(x.device)[:, None, None, None], x.flip(-1), x)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[-1, 1]`` float ``[N, C, H, W]`` -> uint8 ``[N, H, W, C]`` (rounded, clamped).

    NaN maps to mid grey (128) rather than to whatever the float->int cast does.
    """
    if x.ndim != 4:
        raise DataError(f"to_uint8 expects images [N, C, H, W], got shape {tuple(x.shape)}")
    y = torch.nan_to_num(x.detach().float(), nan=0.0, posinf=1.0, neginf=-1.0)
    y = ((y + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()


# ---- 2-D point sets ----------------------------------------------------------------------
# Each generator works on raw coordinates, then applies a fixed centre and scale chosen so
# that E[x] = 0 and E|x|^2 = 2 (unit RMS per coordinate); the constants are exact
# expectations, not estimates from a sample, so they never depend on the seed.

_MOONS_NOISE = 0.05
# Upper moon (cos t, sin t), lower (1 - cos t, 1/2 - sin t), t ~ U(0, pi): mean (1/2, 1/4),
# Var x = 3/4, Var y = 9/16 - 1/pi.
_MOONS_CENTRE = (0.5, 0.25)
_MOONS_SCALE = 1.0 / math.sqrt((0.75 + 0.5625 - 1 / math.pi) / 2 + _MOONS_NOISE**2)

_SWISS_NOISE = 0.5
# t ~ U(1.5 pi, 4.5 pi), point t (cos t, sin t): E|p|^2 = E t^2 = 9.75 pi^2,
# E p = (2, 2 / (3 pi)) by integrating t cos t and t sin t.
_SWISS_CENTRE = (2.0, 2.0 / (3.0 * math.pi))
_SWISS_SCALE = 1.0 / math.sqrt(
    (9.75 * math.pi**2 - 4.0 - (2.0 / (3.0 * math.pi)) ** 2) / 2 + _SWISS_NOISE**2)

_GAUSS_STD = 0.1
# cos^2 averages to 1/2 over the 8 angles, so E|x|^2 = radius^2 + 2 std^2 = 2.
_GAUSS_RADIUS = math.sqrt(2.0 - 2.0 * _GAUSS_STD**2)

_CHECKER_SCALE = math.sqrt(3.0) / 2.0   # U(-2, 2) has variance 4/3

_CIRCLES_NOISE = 0.04
_CIRCLES_INNER = 0.5
_CIRCLES_SCALE = 1.0 / math.sqrt((1.0 + _CIRCLES_INNER**2) / 4 + _CIRCLES_NOISE**2)


def _uniform(n: int, g: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device)


def _normal(shape: tuple[int, ...], g: torch.Generator | None,
            device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=device)


def _coin(n: int, g: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=g, device=device)


def _moons(n: int, g: torch.Generator | None, device: torch.device) -> torch.Tensor:
    t = _uniform(n, g, device) * math.pi
    lower = _coin(n, g, device).bool()
    x = torch.where(lower, 1.0 - torch.cos(t), torch.cos(t))
    y = torch.where(lower, 0.5 - torch.sin(t), torch.sin(t))
    p = torch.stack([x, y], 1) + _MOONS_NOISE * _normal((n, 2), g, device)
    return (p - torch.tensor(_MOONS_CENTRE, device=device)) * _MOONS_SCALE


def _swissroll(n: int, g: torch.Generator | None, device: torch.device) -> torch.Tensor:
    t = 1.5 * math.pi * (1.0 + 2.0 * _uniform(n, g, device))
    p = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1)
    p = p + _SWISS_NOISE * _normal((n, 2), g, device)
    return (p - torch.tensor(_SWISS_CENTRE, device=device)) * _SWISS_SCALE


def _eight_gaussians(n: int, g: torch.Generator | None, device: torch.device) -> torch.Tensor:
    k = torch.randint(0, 8, (n,), generator=g, device=device)
    angle = k.float() * (math.pi / 4)
    centres = _GAUSS_RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return centres + _GAUSS_STD * _normal((n, 2), g, device)


def _checkerboard(n: int, g: torch.Generator | None, device: torch.device) -> torch.Tensor:
    # 4x4 board of unit cells on [-2, 2]^2; cell (col, row) is filled when col + row is even.
    x = 4.0 * _uniform(n, g, device) - 2.0
    col = torch.floor(x)
    row = 2.0 * _coin(n, g, device).float() - 2.0 + torch.remainder(col, 2.0)
    y = row + _uniform(n, g, device)
    return torch.stack([x, y], 1) * _CHECKER_SCALE


def _circles(n: int, g: torch.Generator | None, device: torch.device) -> torch.Tensor:
    angle = 2.0 * math.pi * _uniform(n, g, device)
    radius = torch.where(_coin(n, g, device).bool(), _CIRCLES_INNER, 1.0)
    p = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return (p + _CIRCLES_NOISE * _normal((n, 2), g, device)) * _CIRCLES_SCALE


_POINT_FNS = {
    "moons": _moons,
    "swissroll": _swissroll,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "circles": _circles,
}
assert set(_POINT_FNS) == set(POINT_SETS), "config.POINT_SETS and data generators disagree"


# ---- digits ------------------------------------------------------------------------------

def _load_digits(cfg: DataConfig, split: str) -> Dataset:
    """scikit-learn's 8x8 digits (values 0..16) as ``[N, C, 8k, 8k]`` on the 17-level grid."""
    from sklearn.datasets import load_digits  # ships with scikit-learn: no download

    images = load_digits().images  # float64 [1797, 8, 8], integers 0..16
    images = images[:_DIGITS_TRAIN] if split == "train" else images[_DIGITS_TRAIN:]
    # v / 16 * 2 - 1 = v / 8 - 1 is exact in float32: the 17 bin centres -1 + 2k/16.
    x = torch.from_numpy(images / 8.0 - 1.0).to(torch.float32)[:, None]
    size = cfg.image_size
    if size not in (0, 8):
        if size % 8:
            raise DataError(f"image_size={size} does not suit digits (8x8): use 0, 8 or a "
                            "multiple of 8, which repeats pixels and keeps the 17 levels")
        # Pixel replication, not interpolation: interpolated values would fall between the
        # 17 levels the likelihood's bins are built on.
        f = size // 8
        x = x.repeat_interleave(f, dim=2).repeat_interleave(f, dim=3)
    if cfg.channels == 3:
        x = x.expand(-1, 3, -1, -1).contiguous()
    return Dataset("digits", x, 17, "image", [])


# ---- shared uint8 helpers ----------------------------------------------------------------

def _u8_to_tensor(u8: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, C]`` -> float32 ``[N, C, H, W]`` with ``k -> k / 127.5 - 1``."""
    x = torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 3, 1, 2)
    x = x.to(torch.float32, memory_format=torch.contiguous_format)
    return x.div_(127.5).sub_(1.0)


def _luma(rgb: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 3]`` -> uint8 ``[...]`` with ITU-R 601 weights (rounded half up)."""
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    return ((299 * r + 587 * g + 114 * b + 500) // 1000).astype(np.uint8)


def _resize_crop(img: Image.Image, size: int) -> Image.Image:
    """Scale so the short side is ``size``, then centre-crop to ``size`` x ``size``.

    Done as one resize of the centred square box, so no pixels outside the crop are
    resampled. BICUBIC in PIL widens its kernel when shrinking (antialiased); reducing_gap
    first box-reduces large images by an integer factor, which is faster and looks the same.
    """
    w, h = img.size
    if w == h == size:
        return img
    s = min(w, h)
    left, top = (w - s) / 2, (h - s) / 2
    return img.resize((size, size), Image.Resampling.BICUBIC,
                      box=(left, top, left + s, top + s), reducing_gap=3.0)


def _test_mask(n: int) -> np.ndarray:
    """Boolean ``[n]``: True for test examples (every 20th: index % 20 == 19)."""
    return np.arange(n) % _TEST_EVERY == _TEST_EVERY - 1


def _warn(message: str) -> None:
    warnings.warn(message, DataWarning, stacklevel=4)


# ---- image folders -----------------------------------------------------------------------

def _list_images(folder: Path) -> list[Path]:
    """Image files under ``folder``, recursively, sorted by relative path.

    Hidden files and folders (``.DS_Store``, ``.ipynb_checkpoints``) are ignored. Symlinked
    folders are followed once each, so a link cycle cannot loop.
    """
    found: list[Path] = []
    seen: set[tuple[int, int]] = set()
    for root, dirs, files in os.walk(folder, followlinks=True):
        try:
            st = os.stat(root)
        except OSError:
            dirs[:] = []
            continue
        if (st.st_dev, st.st_ino) in seen:
            dirs[:] = []
            continue
        seen.add((st.st_dev, st.st_ino))
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        for f in files:
            if f.startswith(".") or os.path.splitext(f)[1].lower() not in IMAGE_EXTENSIONS:
                continue
            p = os.path.join(root, f)
            # Regular files, plus dangling links (reported as unreadable); never FIFOs or
            # devices, whose reads could block forever.
            if os.path.isfile(p) or os.path.islink(p):
                found.append(Path(p))
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix())


@functools.cache
def _pil_formats() -> tuple[str, ...]:
    """The decoders of ``_PIL_FORMATS`` that this Pillow has.

    ``Image.OPEN`` is empty until Pillow registers its plugins (``Image.init()``, or the first
    open): read before that, the list was empty and the first file of each format was
    reported unreadable.
    """
    Image.init()
    return tuple(f for f in _PIL_FORMATS if f in Image.OPEN)


def _open(path: Path) -> Image.Image:
    return Image.open(path, formats=_pil_formats())


def _is_colour(img: Image.Image) -> bool:
    """Whether an opened image has colour: by mode, and for palette images by the entries used."""
    if img.mode in _GREY_MODES:
        return False
    if img.mode not in ("P", "PA"):
        return True
    # Palette images (GIF, PNG8) are often grey; look at the entries the pixels use.
    pal = img.getpalette()  # loads the pixels
    if not pal:
        return True
    pal_arr = np.asarray(pal, dtype=np.int64).reshape(-1, 3)
    used = np.unique(np.asarray(img.getchannel(0) if img.mode == "PA" else img))
    used = used[used < len(pal_arr)]
    rgb = pal_arr[used]
    return bool(np.any(rgb[:, 0] != rgb[:, 1]) or np.any(rgb[:, 1] != rgb[:, 2]))


def _probe(path: Path) -> tuple[tuple[int, int], bool]:
    """(width, height) and colour-ness from the file header (plus the palette, if any)."""
    with _open(path) as img:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ValueError(f"image has size {w}x{h}")
        return (w, h), _is_colour(img)


def _decoded_8bit(img: Image.Image) -> np.ndarray:
    """A loaded image -> uint8 ``[H, W]`` (grey sources) or ``[H, W, 3]`` (colour sources).

    Alpha is composited on white; 16-bit (and 32-bit int) grey is scaled from 0..65535.
    """
    mode = img.mode
    if mode in _INT_MODES:
        v = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return ((v * 255 + 32767) // 65535).astype(np.uint8)
    if mode == "F":
        return np.asarray(img.convert("L"))  # PIL clips floats to 0..255
    grey = not _is_colour(img)
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA")).astype(np.uint32)
        a = rgba[..., 3:]
        rgb = ((rgba[..., :3] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
        return rgb[..., 0] if grey else rgb
    return np.asarray(img.convert("L" if grey else "RGB"))


def _decode_file(path: Path, size: int, channels: int) -> np.ndarray:
    """One image file -> uint8 ``[size, size, channels]`` (or ``[size, size]`` for grey)."""
    with _open(path) as img:
        if img.format == "JPEG" and (img.width > 2 * size and img.height > 2 * size):
            # Decode big JPEGs at 1/2, 1/4 or 1/8 scale straight from the DCT: much faster,
            # and the short side stays >= size.
            img.draft(None, (size, size))
        img.load()
        try:
            img = ImageOps.exif_transpose(img)  # camera orientation, as viewers show it
        except Exception:  # a broken EXIF block should not lose a decodable image
            pass
        arr = _decoded_8bit(img)
    if channels == 1 and arr.ndim == 3:
        arr = _luma(arr)
    pil = Image.fromarray(arr)
    out = np.asarray(_resize_crop(pil, size))
    if out.shape[:2] != (size, size):  # pragma: no cover - defensive
        raise ValueError(f"decoded to {out.shape[1]}x{out.shape[0]}, expected {size}x{size}")
    return out


def _reason(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


def _workers(n: int) -> int:
    return max(1, min(8, os.cpu_count() or 1, n // 16))


def _load_folder(folder: Path, cfg: DataConfig, split: str) -> Dataset:
    files = _list_images(folder)
    if not files:
        raise DataError(f"folder {folder} holds no image files (looked for "
                        f"{', '.join(sorted(IMAGE_EXTENSIONS))}, recursively)")
    test = _test_mask(len(files))

    # Header pass over every file of both splits, so that train and test agree on the
    # channel count and the size check; it costs one header read per file.
    probes: list[tuple[tuple[int, int], bool] | str] = []
    for p in files:
        try:
            probes.append(_probe(p))
        except Exception as e:  # any decoder failure on user data means "unreadable"
            probes.append(_reason(e))
    good = [(p, pr) for p, pr in zip(files, probes, strict=True) if not isinstance(pr, str)]

    size = cfg.image_size
    if size == 0 and good:
        (p0, ((w0, h0), _)) = good[0]
        for p, ((w, h), _) in good:
            if (w, h) != (w0, h0):
                raise DataError(f"images in {folder} differ in size ({p0} is {w0}x{h0}, {p} is "
                                f"{w}x{h}); pass --image-size N to resize and centre-crop "
                                "them to N x N")
        if w0 != h0:
            raise DataError(f"images in {folder} are {w0}x{h0} (e.g. {p0}), not square; pass "
                            "--image-size N to resize and centre-crop them to N x N")
        size = w0
    channels = cfg.channels or (3 if any(colour for _, (_, colour) in good) else 1)

    if split == "test" and not test.any():
        _warn(f"{folder} has only {len(files)} images (fewer than {_TEST_EVERY}), so its "
              "test split is the training images")
        split = "train"
    for attempt in ("test", "train") if split == "test" else ("train",):
        idx = np.flatnonzero(test if attempt == "test" else ~test)
        x, skipped = _decode_split([files[i] for i in idx], [probes[i] for i in idx],
                                   size, channels, cfg.bad_files)
        if x is not None:
            return Dataset(cfg.name, x, 256, "image", skipped)
        if attempt == "test":
            _warn(f"no test image of {folder} is readable, so its test split is the "
                  "training images")
    raise DataError(f"no readable image in {folder}: all {len(idx)} image files of its "
                    f"training split failed to decode (e.g. {files[idx[0]]})")


def _decode_split(paths: list[Path], probes: list, size: int, channels: int,
                  bad_files: str) -> tuple[torch.Tensor | None, list[str]]:
    """Decode ``paths`` into one uint8 array; returns (``[N, C, S, S]`` tensor or None, skipped).

    ``probes`` holds each file's header result, or the reason its header failed.
    """
    out = np.empty((len(paths), size, size, channels), dtype=np.uint8)
    errors: list[str | None] = [pr if isinstance(pr, str) else None for pr in probes]
    stop = threading.Event()  # set on the first failure when bad_files="fail"

    def work(i: int) -> None:
        if stop.is_set():
            return
        if errors[i] is None:
            try:
                arr = _decode_file(paths[i], size, channels)
                out[i] = arr[..., None] if arr.ndim == 2 else arr  # grey broadcasts to C
            except Exception as e:  # any decoder failure on user data means "unreadable"
                errors[i] = _reason(e)
        if errors[i] is not None and bad_files == "fail":
            stop.set()

    n_workers = _workers(len(paths))
    if n_workers == 1:
        for i in range(len(paths)):
            work(i)
    else:
        # PIL releases the GIL while decoding and resizing, so threads scale.
        with ThreadPoolExecutor(n_workers) as pool:
            list(pool.map(work, range(len(paths))))

    skipped: list[str] = []
    for p, err in zip(paths, errors, strict=True):
        if err is None:
            continue
        if bad_files == "fail":
            raise DataError(f"cannot read image {p}: {err} (pass --bad-files skip to leave "
                            "unreadable files out)")
        _warn(f"skipping unreadable image {p}: {err}")
        skipped.append(str(p))
    keep = np.array([e is None for e in errors], dtype=bool)
    if not keep.any():
        return None, skipped
    u8 = out if keep.all() else out[keep]
    return _u8_to_tensor(u8), skipped


# ---- .npy / .npz arrays ------------------------------------------------------------------

def _read_array(path: Path) -> np.ndarray:
    """The array in ``path``; never unpickles (object arrays are refused)."""
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception as e:  # corrupt files raise anything from ValueError to EOFError
        raise DataError(f"cannot read array file {path}: {_reason(e)}") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        return loaded
    with loaded:
        keys = list(loaded.files)
        if "arr_0" in keys:
            key = "arr_0"
        elif len(keys) == 1:
            key = keys[0]
        else:
            listed = ", ".join(repr(k) for k in keys) or "none"
            raise DataError(f"{path} holds arrays {listed}; expected a single array or one "
                            "named 'arr_0'")
        try:
            return loaded[key]
        except Exception as e:
            raise DataError(f"cannot read array {key!r} of {path}: {_reason(e)}") from None


def _to_nhwc(arr: np.ndarray, path: Path) -> np.ndarray:
    """``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` -> ``[N, H, W, C]`` view.

    When both dim 1 and the last dim could be channels (``[N, 3, H, 3]``), NHWC wins.
    """
    shape = tuple(arr.shape)
    expected = "expected [N, H, W], [N, H, W, C] or [N, C, H, W] with C = 1 or 3"
    if arr.ndim == 3:
        arr = arr[..., None]
    elif arr.ndim == 4:
        if arr.shape[-1] not in (1, 3):
            if arr.shape[1] not in (1, 3):
                raise DataError(f"{path} has shape {shape}; {expected}")
            arr = arr.transpose(0, 2, 3, 1)
    else:
        raise DataError(f"{path} has shape {shape} ({arr.ndim} dimensions); {expected}")
    if 0 in arr.shape:
        raise DataError(f"{path} has shape {shape}, which holds no pixels")
    return arr


def _array_to_u8(arr: np.ndarray, path: Path) -> np.ndarray:
    """Integer 0..255 or float [0, 1] / [-1, 1] data -> uint8 (floats snapped to the grid)."""
    kind = arr.dtype.kind
    if kind in "ui":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{path} holds integers in [{lo}, {hi}]; expected 8-bit values "
                            "in [0, 255]")
        return arr.astype(np.uint8)
    if kind == "f":
        bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
        if bad:
            raise DataError(f"{path} holds {bad} non-finite values (NaN or inf)")
        lo, hi = float(arr.min()), float(arr.max())
        a = arr.astype(np.float64)
        # levels=256 promises the 8-bit grid, so floats are rounded onto it; [0, 1] is
        # checked first, so data in [-1, 1] that happens to be all >= 0 reads as [0, 1].
        if lo >= 0.0 and hi <= 1.0:
            return np.rint(a * 255.0).astype(np.uint8)
        if lo >= -1.0 and hi <= 1.0:
            return np.rint((a + 1.0) * 127.5).astype(np.uint8)
        raise DataError(f"{path} holds float values out of range [{lo:g}, {hi:g}]; expected "
                        "[0, 1] or [-1, 1]")
    raise DataError(f"{path} has dtype {arr.dtype}; expected uint8 (or integers 0..255, or "
                    "floats in [0, 1] or [-1, 1])")


def _load_array_file(path: Path, cfg: DataConfig, split: str) -> Dataset:
    arr = _to_nhwc(_read_array(path), path)
    n, h, w, c = arr.shape
    size = cfg.image_size
    if size == 0 and h != w:
        raise DataError(f"{path} holds {w}x{h} (width x height) images, which are not square; "
                        "pass --image-size N to resize and centre-crop them to N x N")
    # Range and dtype are judged over the whole array, so both splits read it the same way.
    u8 = _array_to_u8(arr, path)
    test = _test_mask(n)
    if split == "test" and not test.any():
        _warn(f"{path} has only {n} images (fewer than {_TEST_EVERY}), so its test split is "
              "the training images")
        split = "train"
    u8 = u8[test] if split == "test" else u8[~test]
    if cfg.channels == 1 and c == 3:
        u8 = _luma(u8)[..., None]
    elif cfg.channels == 3 and c == 1:
        u8 = np.repeat(u8, 3, axis=3)
    if size and (h, w) != (size, size):
        out = np.empty((len(u8), size, size, u8.shape[3]), dtype=np.uint8)
        for i, img in enumerate(u8):
            pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
            out[i] = np.asarray(_resize_crop(pil, size)).reshape(size, size, -1)
        u8 = out
    return Dataset(cfg.name, _u8_to_tensor(u8), 256, "image", [])


# ---- where the data is, and a fingerprint of what is there -------------------------------

_FINGERPRINT_ITEMS = 32     # files of a folder, or chunks of an array file, that are hashed
_FINGERPRINT_CHUNK = 1 << 16


def data_path(name: str) -> Path | None:
    """The absolute path a data name points to, or None for a built-in set.

    Saved in ``config.json`` this way, so that ``eval`` run from another folder reads the same
    data, not whatever a relative path means there.
    """
    if name in BUILTIN_SETS or not name.strip():
        return None
    return Path(os.path.abspath(Path(name).expanduser()))


def fingerprint(name: str) -> str:
    """A short content fingerprint of a data folder or array file ("" for built-in sets).

    ``"files=N sha256=H"`` for a folder: N image files, H over the relative name, size and
    bytes of up to 32 of them, evenly spaced in sorted order. ``"bytes=N sha256=H"`` for an
    array file: its size, and H over up to 32 evenly spaced 64 KiB chunks. Reads at most a
    few MiB, so it is cheap enough to check at every resume and ``eval``.
    """
    path = data_path(name)
    if path is None or not path.exists():
        return ""
    h = hashlib.sha256()
    try:
        if path.is_dir():
            files = _list_images(path)
            for i in _evenly_spaced(len(files)):
                h.update(files[i].relative_to(path).as_posix().encode() + b"\0")
                h.update(files[i].read_bytes())
            return f"files={len(files)} sha256={h.hexdigest()[:16]}"
        size = path.stat().st_size
        with open(path, "rb") as f:
            for i in _evenly_spaced(max(1, size // _FINGERPRINT_CHUNK)):
                f.seek(i * _FINGERPRINT_CHUNK)
                h.update(f.read(_FINGERPRINT_CHUNK))
        return f"bytes={size} sha256={h.hexdigest()[:16]}"
    except OSError as e:
        raise DataError(f"cannot read {path} to fingerprint it: {e.strerror or e}") from None


def _evenly_spaced(n: int) -> list[int]:
    """Up to ``_FINGERPRINT_ITEMS`` indices spread over ``range(n)``, first and last included."""
    k = min(n, _FINGERPRINT_ITEMS)
    if k <= 1:
        return list(range(k))
    return sorted({round(j * (n - 1) / (k - 1)) for j in range(k)})
