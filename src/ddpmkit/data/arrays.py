""".npy / .npz image arrays, read without loading them whole.

A uint8 ``.npy`` is read in place, one image at a time. Anything else (a ``.npz``, or a
``.npy`` of floats or wider integers) is converted once, in chunks, to an uncompressed uint8
``.npy`` in the data cache (``$DDPMKIT_DATA_CACHE``, else ``$DDPMKIT_CACHE/data``, else
``~/.cache/ddpmkit/data``), named by the SHA-256 of the source file's bytes, and that copy is
read in place.

"In place" is ``os.pread`` of the image's bytes at its offset, not a memory map: an image of
an ``[N, H, W, C]`` or ``[N, C, H, W]`` array is one contiguous run of bytes, and random
reads through a map make the kernel map its read-around window with each fault (measured
here: +7 MB of resident memory per 16 random 3 KB rows of a 307 MB file), so a long run's
resident memory would climb towards the file's size. With ``pread`` the pages stay in the
page cache, shared and reclaimable, and out of the process's resident set.

Labels travel beside the images: a ``labels`` array in a ``.npz``, or ``NAME.labels.npy``
beside ``NAME.npy`` (``labels.npy`` beside ``images.npy`` in a prepared folder).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import numpy as np

from ..errors import DataError
from .images import reason

_CHUNK_BYTES = 64 << 20        # conversion works on ~64 MiB of source rows at a time
_CACHE_VERSION = 1             # part of the cache key: bump when the conversion changes
_IMAGE_KEYS = ("arr_0", "images")


@dataclass(frozen=True)
class ArrayFile:
    """A uint8 array on disk, ready to memory-map, and how to read one image from it.

    ``path`` holds uint8 ``[N, H, W, C]`` (``layout="nhwc"``) or ``[N, C, H, W]``
    (``"nchw"``); ``labels`` is int64 ``[N]`` or None.
    """

    path: Path
    source: Path
    layout: str
    shape: tuple[int, int, int, int]    # N, H, W, C
    labels: np.ndarray | None
    offset: int                         # where image 0 starts in the file

    def image(self, fd: int, i: int) -> np.ndarray:
        """Image ``i`` as uint8 ``[H, W, C]``, read from the open file ``fd``."""
        _, h, w, c = self.shape
        size = h * w * c
        buf = os.pread(fd, size, self.offset + i * size)
        if len(buf) != size:
            raise OSError(f"{self.path} ends before image {i} (truncated?)")
        img = np.frombuffer(buf, dtype=np.uint8)
        if self.layout == "nchw":
            return img.reshape(c, h, w).transpose(1, 2, 0)
        return img.reshape(h, w, c)


def cache_dir() -> Path:
    """Where converted arrays (and other prepared data) are kept."""
    env = os.environ.get("DDPMKIT_DATA_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("DDPMKIT_CACHE")
    return (Path(base).expanduser() if base else Path.home() / ".cache" / "ddpmkit") / "data"


def open_array_file(path: Path) -> ArrayFile:
    """Check ``path`` (a .npy or .npz of images) and return its memory-mappable uint8 form."""
    if path.suffix.lower() == ".npz":
        with _npz(path) as z:
            key = _image_key(z, path)
            labels = _npz_labels(z, path)
            with z.open(f"{key}.npy") as f:
                header = _read_header(f, path)
        return _convert(path, header, lambda: _npz_member(path, key), labels)
    with _open_file(path) as f:
        header = _read_header(f, path)
        offset = f.tell()
    labels = _sibling_labels(path)
    dtype, shape, fortran = header
    if dtype == np.uint8 and not fortran:
        layout, nhwc = _layout(shape, path)
        _check_labels(labels, nhwc[0], path)
        _check_size(path, offset, shape)
        return ArrayFile(path, path, layout, nhwc, labels, offset)
    return _convert(path, header, lambda: _open_file(path, skip_header=True), labels)


# ---- reading headers and chunks --------------------------------------------------------------

def _open_file(path: Path, skip_header: bool = False) -> IO[bytes]:
    try:
        f = open(path, "rb")
    except OSError as e:
        raise DataError(f"cannot read array file {path}: {e.strerror or e}") from None
    if skip_header:
        _read_header(f, path)
    return f


def _npz(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except (OSError, zipfile.BadZipFile, ValueError) as e:
        raise DataError(f"cannot read array file {path}: {reason(e)}") from None


def _npz_member(path: Path, key: str) -> IO[bytes]:
    z = _npz(path)
    f = z.open(f"{key}.npy")
    _read_header(f, path)
    return f


def _read_header(f: IO[bytes], path: Path) -> tuple[np.dtype, tuple[int, ...], bool]:
    """(dtype, shape, fortran_order) of the .npy stream ``f``, left at the first data byte."""
    try:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(f)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(f)
    except Exception as e:  # corrupt headers raise anything from ValueError to EOFError
        raise DataError(f"cannot read array file {path}: {reason(e)}") from None
    if dtype.hasobject:
        raise DataError(f"cannot read array file {path}: it holds Python objects, which would "
                        "need unpickling (refused); save a numeric array")
    return dtype, tuple(shape), bool(fortran)


def _image_key(z: zipfile.ZipFile, path: Path) -> str:
    keys = [n[:-4] for n in z.namelist() if n.endswith(".npy")]
    for k in _IMAGE_KEYS:
        if k in keys:
            return k
    rest = [k for k in keys if k != "labels"]
    if len(rest) == 1:
        return rest[0]
    listed = ", ".join(repr(k) for k in sorted(keys)) or "none"
    raise DataError(f"{path} holds arrays {listed}; expected a single image array (or one "
                    "named 'arr_0' or 'images'), optionally with 'labels'")


def _npz_labels(z: zipfile.ZipFile, path: Path) -> np.ndarray | None:
    if "labels.npy" not in z.namelist():
        return None
    try:
        with z.open("labels.npy") as f:
            labels = np.lib.format.read_array(f, allow_pickle=False)
    except Exception as e:
        raise DataError(f"cannot read array 'labels' of {path}: {reason(e)}") from None
    return _as_labels(labels, f"the 'labels' array of {path}")


def _sibling_labels(path: Path) -> np.ndarray | None:
    """``NAME.labels.npy`` beside ``NAME.npy`` (``labels.npy`` beside ``images.npy``)."""
    names = [path.with_name(path.stem + ".labels.npy")]
    if path.name == "images.npy":
        names.append(path.with_name("labels.npy"))
    for p in names:
        if p.is_file():
            try:
                labels = np.load(p, allow_pickle=False)
            except Exception as e:
                raise DataError(f"cannot read labels file {p}: {reason(e)}") from None
            return _as_labels(labels, str(p))
    return None


def _as_labels(labels: np.ndarray, what: str) -> np.ndarray:
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DataError(f"{what} must be integers [N], got {labels.dtype} {labels.shape}")
    if labels.size and int(labels.min()) < 0:
        raise DataError(f"{what} holds negative class {int(labels.min())}; classes are 0, 1, ...")
    return labels.astype(np.int64)


def _check_size(path: Path, offset: int, shape: tuple[int, ...]) -> None:
    need = offset + int(np.prod(shape, dtype=np.int64))
    have = path.stat().st_size
    if have < need:
        raise DataError(f"cannot read array file {path}: it holds {have} bytes, its header "
                        f"promises {need} (truncated?)")


def _check_labels(labels: np.ndarray | None, n: int, path: Path) -> None:
    if labels is not None and len(labels) != n:
        raise DataError(f"{path}: {len(labels)} labels for {n} images")


def _layout(shape: tuple[int, ...], path: Path) -> tuple[str, tuple[int, int, int, int]]:
    """``[N, H, W]``, ``[N, H, W, C]`` or ``[N, C, H, W]`` -> (layout, (N, H, W, C)).

    When both dim 1 and the last dim could be channels (``[N, 3, H, 3]``), NHWC wins.
    """
    expected = "expected [N, H, W], [N, H, W, C] or [N, C, H, W] with C = 1 or 3"
    if len(shape) == 3:
        layout, nhwc = "nhwc", (*shape, 1)
    elif len(shape) == 4 and shape[-1] in (1, 3):
        layout, nhwc = "nhwc", shape
    elif len(shape) == 4 and shape[1] in (1, 3):
        layout, nhwc = "nchw", (shape[0], shape[2], shape[3], shape[1])
    elif len(shape) == 4:
        raise DataError(f"{path} has shape {shape}; {expected}")
    else:
        raise DataError(f"{path} has shape {shape} ({len(shape)} dimensions); {expected}")
    if 0 in shape:
        raise DataError(f"{path} has shape {shape}, which holds no pixels")
    return layout, tuple(int(v) for v in nhwc)


def _chunks(f: IO[bytes], dtype: np.dtype, shape: tuple[int, ...], path: Path):
    """Rows of the array in ``f`` (positioned at its data), ~64 MiB at a time."""
    row = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    per = max(1, _CHUNK_BYTES // max(row, 1))
    left = shape[0]
    while left:
        k = min(per, left)
        buf = f.read(k * row)
        if len(buf) != k * row:
            raise DataError(f"cannot read array file {path}: it ends early (truncated?)")
        yield np.frombuffer(buf, dtype=dtype).reshape(k, *shape[1:])
        left -= k


# ---- conversion to a uint8 cache ------------------------------------------------------------

def _convert(path: Path, header, reopen, labels: np.ndarray | None) -> ArrayFile:
    """Convert to uint8 once (judging the value range over the whole array) into the cache."""
    dtype, shape, fortran = header
    layout, nhwc = _layout(shape, path)
    _check_labels(labels, nhwc[0], path)
    if fortran:  # rare; read through numpy whole rather than reimplement column order
        return _convert_in_memory(path, layout, nhwc, labels)
    kind = dtype.kind
    if kind not in "uif":
        raise DataError(f"{path} has dtype {dtype}; expected uint8 (or integers 0..255, or "
                        "floats in [0, 1] or [-1, 1])")
    target = cache_dir() / "arrays" / f"{_content_key(path)}.npy"
    if not target.is_file():
        to_u8 = _u8_mapping(path, dtype, shape, reopen)
        _write_cache(target, shape, lambda: _mapped_chunks(reopen, dtype, shape, path, to_u8))
    return _cached(target, path, layout, nhwc, labels)


def _cached(target: Path, source: Path, layout: str, nhwc, labels) -> ArrayFile:
    with _open_file(target) as f:
        _, shape, _ = _read_header(f, target)
        offset = f.tell()
    _check_size(target, offset, shape)
    return ArrayFile(target, source, layout, nhwc, labels, offset)


def _u8_mapping(path: Path, dtype: np.dtype, shape: tuple[int, ...], reopen):
    """First pass: range and finiteness over the whole array -> a chunk -> uint8 function."""
    lo, hi, bad = np.inf, -np.inf, 0
    with contextlib.closing(reopen()) as f:
        for c in _chunks(f, dtype, shape, path):
            if dtype.kind == "f":
                finite = np.isfinite(c)
                bad += int(c.size - np.count_nonzero(finite))
                c = c[finite]
            if c.size:
                lo, hi = min(lo, float(c.min())), max(hi, float(c.max()))
    if dtype.kind in "ui":
        if lo < 0 or hi > 255:
            raise DataError(f"{path} holds integers in [{int(lo)}, {int(hi)}]; expected 8-bit "
                            "values in [0, 255]")
        return lambda c: c.astype(np.uint8)
    if bad:
        raise DataError(f"{path} holds {bad} non-finite values (NaN or inf)")
    # levels=256 promises the 8-bit grid, so floats are rounded onto it; [0, 1] is checked
    # first, so data in [-1, 1] that happens to be all >= 0 reads as [0, 1].
    if lo >= 0.0 and hi <= 1.0:
        return lambda c: np.rint(c.astype(np.float64) * 255.0).astype(np.uint8)
    if lo >= -1.0 and hi <= 1.0:
        return lambda c: np.rint((c.astype(np.float64) + 1.0) * 127.5).astype(np.uint8)
    raise DataError(f"{path} holds float values out of range [{lo:g}, {hi:g}]; expected "
                    "[0, 1] or [-1, 1]")


def _mapped_chunks(reopen, dtype, shape, path, to_u8):
    with contextlib.closing(reopen()) as f:
        for c in _chunks(f, dtype, shape, path):
            yield to_u8(c)


def _write_cache(target: Path, shape: tuple[int, ...], chunks) -> None:
    """Write uint8 ``shape`` from ``chunks`` to ``target`` through a temporary file."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        with open(tmp, "wb") as f:
            np.lib.format.write_array_header_2_0(
                f, {"descr": "|u1", "fortran_order": False, "shape": tuple(shape)})
            for c in chunks():
                f.write(np.ascontiguousarray(c).tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write the uint8 cache {target}: {e.strerror or e} (set "
                        "DDPMKIT_DATA_CACHE to a folder with room)") from None


def _convert_in_memory(path: Path, layout: str, nhwc, labels) -> ArrayFile:
    try:
        arr = np.load(path, allow_pickle=False)
        if isinstance(arr, np.lib.npyio.NpzFile):
            with arr:
                arr = arr[_image_key(arr.zip, path)]
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot read array file {path}: {reason(e)}") from None
    arr = np.ascontiguousarray(arr)
    target = cache_dir() / "arrays" / f"{_content_key(path)}.npy"
    if not target.is_file():
        to_u8 = _u8_mapping(path, arr.dtype, arr.shape, lambda: _BytesOf(arr))
        _write_cache(target, arr.shape, lambda: [to_u8(arr)])
    return _cached(target, path, layout, nhwc, labels)


class _BytesOf:
    """A file-like view of an in-memory array's bytes (for the range pass)."""

    def __init__(self, arr: np.ndarray):
        self._buf, self._pos = memoryview(np.ascontiguousarray(arr)).cast("B"), 0

    def read(self, n: int) -> bytes:
        out = self._buf[self._pos:self._pos + n].tobytes()
        self._pos += len(out)
        return out

    def close(self) -> None:
        pass


def _content_key(path: Path) -> str:
    """SHA-256 of the file's bytes (memoised by path, size and mtime) + the cache version."""
    st = path.stat()
    stat_id = hashlib.sha256(
        f"{path.resolve()}\0{st.st_size}\0{st.st_mtime_ns}".encode()).hexdigest()[:32]
    memo = cache_dir() / "arrays" / "by-stat" / f"{stat_id}.json"
    with contextlib.suppress(OSError, ValueError, KeyError):
        return json.loads(memo.read_text())["key"]
    h = hashlib.sha256(f"ddpmkit-u8-v{_CACHE_VERSION}\0".encode())
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    key = h.hexdigest()[:40]
    with contextlib.suppress(OSError):
        memo.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo.with_name(f".{memo.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"key": key, "source": str(path.resolve())}))
        os.replace(tmp, memo)
    return key
