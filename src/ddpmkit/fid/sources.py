"""Where FID images and statistics come from, read batch by batch.

A reference (``--ref``) or a sample set (``--samples``) is one of:

* a statistics file ``.npz`` with ``mu`` and ``sigma`` (pytorch-fid's format, and what
  ``ddpmkit fid-stats`` writes) -- FID only, as no features are left to compare;
* an ``.npz`` holding images under ``arr_0`` (``ddpmkit sample --out F.npz``, the ADM
  evaluation suite's reference batches; when such a file also holds ``mu``/``sigma``, the
  images are used, so that KID and precision/recall can be computed too), or a ``.npy``;
  uint8 ``[N, H, W, C]`` (or ``[N, C, H, W]``, C = 1 or 3), read in slices, never whole;
* an image folder (every image file below it, at its own size);
* anything else that ``ddpmkit.data`` loads (a built-in set such as ``digits``): its
  training split.

Grey images are repeated to RGB, as every FID implementation does.
"""

from __future__ import annotations

import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import DataError

__all__ = ["ImageSource", "Statistics", "open_source"]


@dataclass
class Statistics:
    """Precomputed Gaussian statistics: ``mu`` ``[D]``, ``sigma`` ``[D, D]`` (float64)."""

    mu: np.ndarray
    sigma: np.ndarray
    path: Path


@dataclass
class ImageSource:
    """``count`` images, read as uint8 ``[n, H, W, 3]`` batches by ``batches(size)``."""

    name: str
    count: int
    _batches: Callable[[int], Iterator[np.ndarray]]   # batch size -> uint8 [n, H, W, C]

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        for b in self._batches(batch_size):
            yield _to_rgb(b, self.name)


def _to_rgb(batch: np.ndarray, name: str) -> np.ndarray:
    if batch.ndim == 3:
        batch = batch[..., None]
    if batch.ndim != 4:
        raise DataError(f"{name}: images must be [N, H, W, C], got shape {batch.shape}")
    if batch.shape[-1] not in (1, 3) and batch.shape[1] in (1, 3):
        batch = batch.transpose(0, 2, 3, 1)   # NCHW -> NHWC
    if batch.shape[-1] == 1:
        batch = np.repeat(batch, 3, axis=3)
    if batch.shape[-1] != 3:
        raise DataError(f"{name}: images have {batch.shape[-1]} channels; expected 1 or 3")
    if batch.dtype != np.uint8:
        raise DataError(f"{name}: images are {batch.dtype}; FID reads uint8 (0..255) images, "
                        "as `ddpmkit sample --out F.npz` writes them")
    return np.ascontiguousarray(batch)


# ---- arrays, read in slices -----------------------------------------------------------------

def _check_array(shape: tuple[int, ...], dtype: np.dtype, name: str) -> None:
    """Reject a wrong image array when it is opened, not after an hour of sampling."""
    channels_ok = len(shape) == 3 or (len(shape) == 4 and (shape[-1] in (1, 3)
                                                           or shape[1] in (1, 3)))
    if not channels_ok:
        raise DataError(f"{name}: shape {shape} is not uint8 images [N, H, W] or [N, H, W, C] "
                        "(or [N, C, H, W]) with C = 1 or 3")
    if dtype != np.uint8:
        raise DataError(f"{name}: images are {dtype}; FID reads uint8 (0..255) images, as "
                        "`ddpmkit sample --out F.npz` writes them")


def _npy_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of the .npy stream ``f``, left at the first byte of data."""
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    return np.lib.format.read_array_header_2_0(f)


def _array_in_npz(path: Path, key: str) -> ImageSource:
    """``key`` of an ``.npz`` read as a stream of rows: the zip member is decompressed as it
    is read, so a 50,000-image file never sits in memory whole."""
    def open_member():
        z = zipfile.ZipFile(path)
        f = z.open(f"{key}.npy")
        shape, fortran, dtype = _npy_header(f)
        if fortran:
            raise DataError(f"{path}: {key!r} is stored in Fortran order; save it C-ordered")
        _check_array(shape, dtype, f"{path} ({key!r})")
        return z, f, shape, dtype

    z, f, shape, dtype = open_member()
    z.close()

    def batches(size: int) -> Iterator[np.ndarray]:
        z, f, shape, dtype = open_member()
        row = int(np.prod(shape[1:])) * dtype.itemsize
        with z, f:
            for start in range(0, shape[0], size):
                n = min(size, shape[0] - start)
                buf = f.read(n * row)
                if len(buf) != n * row:
                    raise DataError(f"{path}: {key!r} is truncated at image {start}")
                yield np.frombuffer(buf, dtype=dtype).reshape(n, *shape[1:])
    return ImageSource(f"{path}", shape[0], batches)


def _array_in_npy(path: Path) -> ImageSource:
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except Exception as e:
        raise DataError(f"cannot read {path}: {e}") from None
    _check_array(arr.shape, arr.dtype, str(path))
    return ImageSource(str(path), arr.shape[0],
                       lambda size: (np.asarray(arr[i:i + size])
                                     for i in range(0, arr.shape[0], size)))


def _read_npz(path: Path) -> ImageSource | Statistics:
    try:
        with zipfile.ZipFile(path) as z:
            keys = {n[:-4] for n in z.namelist() if n.endswith(".npy")}
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"cannot read {path}: {e}") from None
    if "arr_0" in keys:
        return _array_in_npz(path, "arr_0")
    if {"mu", "sigma"} <= keys:
        with np.load(path, allow_pickle=False) as d:
            return Statistics(np.asarray(d["mu"], np.float64),
                              np.asarray(d["sigma"], np.float64), path)
    if len(keys) == 1:
        return _array_in_npz(path, next(iter(keys)))
    raise DataError(f"{path} holds {sorted(keys) or 'no arrays'}; expected images under "
                    "'arr_0' or statistics under 'mu' and 'sigma'")


# ---- folders and data sets --------------------------------------------------------------------

def _image_files(folder: Path) -> list[Path]:
    from ..data import IMAGE_EXTENSIONS
    return sorted(p for p in folder.rglob("*")
                  if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
                  and not any(part.startswith(".") for part in p.relative_to(folder).parts))


def _decode(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as img:
            return np.asarray(img.convert("RGB"))
    except Exception as e:  # PIL raises many types for broken files
        raise DataError(f"cannot read image {path}: {e}") from None


def _folder(folder: Path) -> ImageSource:
    files = _image_files(folder)
    if not files:
        raise DataError(f"{folder} holds no image files")

    def batches(size: int) -> Iterator[np.ndarray]:
        # a batch holds images of one size; a size change starts a new batch
        pending: list[np.ndarray] = []
        for p in files:
            img = _decode(p)
            if pending and (len(pending) == size or img.shape != pending[0].shape):
                yield np.stack(pending)
                pending = []
            pending.append(img)
        if pending:
            yield np.stack(pending)
    return ImageSource(str(folder), len(files), batches)


def _data_set(name: str) -> ImageSource:
    from ..config import DataConfig
    from ..data import load_data, to_uint8
    data = load_data(DataConfig(name=name), "train")
    if data.kind != "image":
        raise DataError(f"{name} is a 2-D point set; FID needs images")
    return ImageSource(name, len(data), lambda size: (to_uint8(data.x[i:i + size])
                                                      for i in range(0, len(data), size)))


def open_source(ref: str) -> ImageSource | Statistics:
    """A statistics file, or images to read in batches (see the module docstring)."""
    path = Path(ref).expanduser()
    if path.is_dir():
        return _folder(path)
    if path.suffix.lower() == ".npz" and path.is_file():
        return _read_npz(path)
    if path.suffix.lower() == ".npy" and path.is_file():
        return _array_in_npy(path)
    if path.suffix.lower() in (".npz", ".npy"):
        raise DataError(f"{path}: no such file")
    return _data_set(ref)
