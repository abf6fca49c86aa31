"""Image files: listing a folder, probing headers and decoding one file to uint8.

Decoding is per file and self-contained, so it runs the same in a DataLoader worker, a
``prepare`` process or the main process. Every failure on user data is an exception whose
text says why (the callers turn it into a skip or a one-line error).
"""

from __future__ import annotations

import functools
import io
import os
from pathlib import Path
from typing import IO

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import DataError

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

def luma(rgb: np.ndarray) -> np.ndarray:
    """uint8 ``[..., 3]`` -> uint8 ``[...]`` with ITU-R 601 weights (rounded half up)."""
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    return ((299 * r + 587 * g + 114 * b + 500) // 1000).astype(np.uint8)


def resize_crop(img: Image.Image, size: int) -> Image.Image:
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


def list_images(folder: Path) -> list[Path]:
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


def _open(path: Path | IO[bytes]) -> Image.Image:
    return Image.open(path, formats=_pil_formats())


def is_colour(img: Image.Image) -> bool:
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


def probe(path: Path | IO[bytes]) -> tuple[tuple[int, int], bool]:
    """(width, height) and colour-ness from the file header (plus the palette, if any)."""
    with _open(path) as img:
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ValueError(f"image has size {w}x{h}")
        return (w, h), is_colour(img)


def decoded_8bit(img: Image.Image) -> np.ndarray:
    """A loaded image -> uint8 ``[H, W]`` (grey sources) or ``[H, W, 3]`` (colour sources).

    Alpha is composited on white; 16-bit (and 32-bit int) grey is scaled from 0..65535.
    """
    mode = img.mode
    if mode in _INT_MODES:
        v = np.clip(np.asarray(img).astype(np.int64), 0, 65535)
        return ((v * 255 + 32767) // 65535).astype(np.uint8)
    if mode == "F":
        return np.asarray(img.convert("L"))  # PIL clips floats to 0..255
    grey = not is_colour(img)
    if mode in _ALPHA_MODES or "transparency" in img.info:
        rgba = np.asarray(img.convert("RGBA")).astype(np.uint32)
        a = rgba[..., 3:]
        rgb = ((rgba[..., :3] * a + 255 * (255 - a) + 127) // 255).astype(np.uint8)
        return rgb[..., 0] if grey else rgb
    mode = "L" if grey else "RGB"
    return np.asarray(img if img.mode == mode else img.convert(mode))


@functools.cache
def _simplejpeg():
    """The ``simplejpeg`` module (extra ``ddpmkit[jpeg]``), or None when not installed."""
    try:
        import simplejpeg
    except ImportError:
        return None
    return simplejpeg


_EXIF_ORIENTATION = 0x0112


def _jpeg_fast(img: Image.Image, data: bytes | memoryview) -> np.ndarray | None:
    """A plain RGB or grey JPEG, upright, decoded by simplejpeg: uint8 ``[H, W(, 3)]``, or None
    where the general path must run (not installed, CMYK, a rotated camera picture, or any
    decoder complaint: PIL then decodes it, or names what is wrong).

    Same libjpeg-turbo, same settings as PIL (accurate integer DCT, fancy upsampling), so the
    same pixels, at ~half the CPU time of PIL on 256x256 pictures (PIL's image object and
    the copy out of it cost as much as the decoding).
    """
    sj = _simplejpeg()
    if sj is None or img.mode not in ("RGB", "L"):
        return None
    if img.getexif().get(_EXIF_ORIENTATION, 1) not in (0, 1):
        return None
    try:
        arr = sj.decode_jpeg(data, colorspace="RGB" if img.mode == "RGB" else "GRAY")
    except Exception:  # any complaint: the general path decides (or names the problem)
        return None
    if arr.shape[:2] != (img.height, img.width):
        return None
    return arr if img.mode == "RGB" else arr[..., 0]


def _encoded(src: Path | IO[bytes]) -> tuple[IO[bytes], bytes | memoryview | None]:
    """``src`` as an open file and, when the JPEG fast path may use them, its bytes."""
    if _simplejpeg() is None:
        return src, None
    if isinstance(src, io.BytesIO):
        return src, src.getbuffer()
    if isinstance(src, (str, os.PathLike)):
        data = Path(src).read_bytes()
        return io.BytesIO(data), data
    return src, None


def decode(src: Path | IO[bytes], size: int, channels: int) -> np.ndarray:
    """One image (a path or an open binary file) -> uint8 ``[size, size, channels]``.

    ``size=0`` keeps the image's own size (``[H, W, channels]``). Grey sources are repeated
    to 3 channels, colour ones reduced to luma for 1.
    """
    src, data = _encoded(src)
    with _open(src) as img:
        big = size and img.width > 2 * size and img.height > 2 * size
        fast = None
        if img.format == "JPEG" and data is not None and not big:
            fast = _jpeg_fast(img, data)
        if fast is not None:
            arr = fast
        else:
            if big and img.format == "JPEG":
                # Decode big JPEGs at 1/2, 1/4 or 1/8 scale straight from the DCT: much
                # faster, and the short side stays >= size.
                img.draft(None, (size, size))
            img.load()
            try:  # camera orientation, as viewers show it (in place: no copy when upright)
                ImageOps.exif_transpose(img, in_place=True)
            except Exception:  # a broken EXIF block should not lose a decodable image
                pass
            arr = decoded_8bit(img)
    if channels == 1 and arr.ndim == 3:
        arr = luma(arr)
    if size and arr.shape[:2] != (size, size):  # (a round trip through PIL is 2 copies)
        arr = np.asarray(resize_crop(Image.fromarray(arr), size))
        if arr.shape[:2] != (size, size):  # pragma: no cover - defensive
            raise ValueError(f"decoded to {arr.shape[1]}x{arr.shape[0]}, expected "
                             f"{size}x{size}")
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.shape[2] != channels:
        arr = np.repeat(arr, channels, axis=2)
    return arr


def reason(e: BaseException) -> str:
    """An exception as a short phrase for a one-line message."""
    text = str(e).strip() or type(e).__name__
    return text if len(text) <= 200 else text[:197] + "..."


# ---- the 256-level grid, both ways -----------------------------------------------------------

def mirror_rows(x: torch.Tensor, mirror: torch.Tensor) -> torch.Tensor:
    """``x`` ``[N, C, H, W]`` with the rows where ``mirror`` (bool ``[N]``) is True mirrored
    left-right (a new tensor)."""
    return torch.where(mirror.to(x.device)[:, None, None, None], x.flip(-1), x)


# Rows of at least this many values are converted one at a time on the CPU (below).
_ROW_AT_A_TIME = 1 << 14


def u8_to_float(u8: torch.Tensor, mirror: torch.Tensor | None = None) -> torch.Tensor:
    """uint8 ``[N, C, H, W]`` -> float32 with ``k -> k / 127.5 - 1`` (the 256-level grid),
    the rows where ``mirror`` (bool ``[N]``) is True mirrored left-right on the way.

    Large images on the CPU go one at a time, flip, conversion and scaling while the image
    is in cache: for 256x256 RGB batches of 128 that is ~3x faster than flipping the batch
    and then converting it in whole-batch passes (each pass over 100 MB runs from memory),
    the same at 64x64 and slower for smaller images, which stay batched.
    """
    if u8.device.type == "cpu" and u8.ndim == 4 and u8[0].numel() >= _ROW_AT_A_TIME:
        out = torch.empty(u8.shape, dtype=torch.float32)
        flips = mirror.tolist() if mirror is not None else [False] * len(u8)
        for row, src, flip in zip(out, u8, flips, strict=True):
            row.copy_(src.flip(-1) if flip else src)
            row.div_(127.5).sub_(1.0)
        return out
    if mirror is not None:
        u8 = mirror_rows(u8, mirror)
    x = u8.to(torch.float32, memory_format=torch.contiguous_format)
    return x.div_(127.5).sub_(1.0)


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """``[-1, 1]`` float ``[N, C, H, W]`` -> uint8 ``[N, H, W, C]`` (rounded, clamped).

    NaN maps to mid grey (128) rather than to whatever the float->int cast does.
    """
    if x.ndim != 4:
        raise DataError(f"to_uint8 expects images [N, C, H, W], got shape {tuple(x.shape)}")
    y = torch.nan_to_num(x.detach().float(), nan=0.0, posinf=1.0, neginf=-1.0)
    y = ((y + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().cpu().numpy()
