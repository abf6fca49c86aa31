"""Data sources: what ``--data`` names, opened as a :class:`Dataset` split.

* built-in sets (``digits``, the 2-D point sets) are small and held in memory as float32;
* image folders, ``.npy``/``.npz`` arrays and prepared folders are *readers*: they hold an
  index (file names, a memory map) and give one uint8 image at a time, so memory stays flat in
  the data set's size; the loader turns them into [-1, 1] floats per batch.

Images sit on a grid of ``levels`` values per pixel with bin centres at
``-1 + 2k / (levels - 1)`` -- what the discretised Gaussian likelihood expects (17 levels for
``digits``, 256 for 8-bit images). Tar shards (:mod:`.shards`) are another file source.
Splits: every 20th example (index % 20 == 19) of a folder or array is a test example, the
rest train. Every failure caused by the input is a :class:`~ddpmkit.errors.DataError` naming
the file or value and the problem.
"""

from __future__ import annotations

import difflib
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..config import POINT_SETS, DataConfig
from ..errors import DataError
from . import images
from .arrays import ArrayFile, open_array_file
from .digits import digits_arrays
from .images import u8_to_float
from .points import POINT_CLASS_NAMES, sample_labelled_points

BUILTIN_SETS: tuple[str, ...] = ("digits", *POINT_SETS)

_TEST_EVERY = 20          # image folders and arrays: every 20th example is a test example
_TEST_POINTS = 5000       # size of the 2-D test sets
_DIGITS_TRAIN = 1500      # load_digits has 1797 images: 1500 train, the last 297 test
_MAX_REPLACEMENTS = 16    # unreadable images in a row before a batch gives up


class DataWarning(UserWarning):
    """A data problem that does not stop loading (a skipped file, a borrowed test split)."""


def _warn(message: str) -> None:
    warnings.warn(message, DataWarning, stacklevel=4)


# ---- readers: one uint8 image at a time ------------------------------------------------------

class _Split:
    """Example ``j`` of a split -> index in the whole source, in O(1) memory.

    Test examples are indices 19, 39, 59, ... (``n // 20`` of them); train is the rest, so
    train example ``j`` is index ``j + j // 19``.
    """

    def __init__(self, n: int, split: str):
        self.split = split  # "train", "test", or "all" (prepare reads every example)
        self.n = {"test": n // _TEST_EVERY, "all": n}.get(split, n - n // _TEST_EVERY)

    def __call__(self, j: int) -> int:
        if self.split == "all":
            return j
        if self.split == "test":
            return _TEST_EVERY * j + _TEST_EVERY - 1
        return j + j // (_TEST_EVERY - 1)


class ImageReader:
    """A split of an image source read one example at a time (picklable, cheap to pickle:
    DataLoader workers get a copy and open files themselves).

    ``shape``: ``(C, H, W)`` of every image read; ``labels``: int64 ``[N]`` class of each
    example of the whole source (None: unlabelled); ``class_names`` when the source has them.
    """

    shape: tuple[int, int, int]
    labels: np.ndarray | None = None
    class_names: tuple[str, ...] = ()

    def __init__(self, split: _Split):
        self.split = split

    def __len__(self) -> int:
        return self.split.n

    def key(self, j: int) -> str:
        """A name for example ``j`` that a user can look up (file path, array index)."""
        raise NotImplementedError

    def read(self, j: int) -> np.ndarray:
        """uint8 ``[H, W, C]`` of example ``j``; raises (any exception) if unreadable."""
        raise NotImplementedError

    def label(self, j: int) -> int:
        return -1 if self.labels is None else int(self.labels[self.split(j)])

    def where(self, j: int) -> str:
        """Example ``j`` as messages name it (a file's full path, else its key)."""
        return self.key(j)


class ArrayReader(ImageReader):
    """Images of a uint8 array file, read in place (see :mod:`.arrays`); channels and size
    converted per image."""

    def __init__(self, af: ArrayFile, split: _Split, size: int, channels: int):
        super().__init__(split)
        self.af, self.labels = af, af.labels
        _, h, w, c = af.shape
        self.size = size if size and (size, size) != (h, w) else 0  # 0: no resize
        self.channels = channels or c
        self.shape = (self.channels, size or h, size or w)
        self._fd: tuple[int, int] | None = None  # (pid, fd): each process opens its own

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fd": None}

    def __del__(self) -> None:
        if self._fd is not None and self._fd[0] == os.getpid():
            os.close(self._fd[1])

    def _file(self) -> int:
        if self._fd is None or self._fd[0] != os.getpid():
            self._fd = (os.getpid(), os.open(self.af.path, os.O_RDONLY))
        return self._fd[1]

    def key(self, j: int) -> str:
        return f"{self.af.source.name}[{self.split(j)}]"

    def read(self, j: int) -> np.ndarray:
        return self._convert(self.af.image(self._file(), self.split(j)))

    def read_many(self, js) -> np.ndarray:
        """uint8 ``[len(js), H, W, C]`` of examples ``js``."""
        out = np.empty((len(js), self.shape[1], self.shape[2], self.channels), np.uint8)
        for k, j in enumerate(js):
            out[k] = self.read(int(j))
        return out

    def _channels(self, u8: np.ndarray) -> np.ndarray:
        c = u8.shape[-1]
        if self.channels == 1 and c == 3:
            return images.luma(u8)[..., None]
        if self.channels == 3 and c == 1:
            return np.repeat(u8, 3, axis=-1)
        return u8

    def _convert(self, img: np.ndarray) -> np.ndarray:
        img = self._channels(img)
        if self.size and img.shape[:2] != (self.size, self.size):
            pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
            img = np.asarray(images.resize_crop(pil, self.size)).reshape(
                self.size, self.size, -1)
        return img


class FolderReader(ImageReader):
    """Image files decoded one at a time. File names are kept as one bytes blob plus
    offsets: compact, and forked DataLoader workers share it without copy-on-write."""

    def __init__(self, root: Path, rel_paths: list[str], split: _Split, size: int,
                 channels: int, labels: np.ndarray | None, class_names: tuple[str, ...]):
        super().__init__(split)
        self.root, self.size, self.labels, self.class_names = root, size, labels, class_names
        encoded = [p.encode("utf-8", "surrogateescape") for p in rel_paths]
        self._blob = b"".join(encoded)
        self._offsets = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self.shape = (channels, size, size)

    def key(self, j: int) -> str:
        i = self.split(j)
        lo, hi = self._offsets[i], self._offsets[i + 1]
        return self._blob[lo:hi].decode("utf-8", "surrogateescape")

    def path(self, j: int) -> Path:
        return self.root / self.key(j)

    def where(self, j: int) -> str:
        return str(self.path(j))

    def read(self, j: int) -> np.ndarray:
        return images.decode(self.path(j), self.size, self.shape[0])


# ---- the Dataset ---------------------------------------------------------------------------

class Dataset:
    """A split of a data set.

    In memory (built-in sets): ``x`` float32 in [-1, 1], images ``[N, C, H, W]`` or points
    ``[N, 2]``. From files: ``reader`` gives one uint8 image at a time and ``x`` decodes the
    whole split on first use (for evaluation and tests; training reads through the loader).
    ``levels``: values per pixel on the grid ``-1 + 2k/(levels-1)``, ``None`` for points.
    ``labels``: int64 ``[N]`` classes, or None. ``skipped``: files left out as unreadable.
    """

    def __init__(self, name: str, x: torch.Tensor | None, levels: int | None, kind: str,
                 skipped: list[str] | None = None, *, reader: ImageReader | None = None,
                 labels: torch.Tensor | None = None, class_names: tuple[str, ...] = (),
                 bad_files: str = "skip"):
        if (x is None) == (reader is None):
            raise ValueError("a Dataset has either x (in memory) or a reader")
        self.name, self.levels, self.kind = name, levels, kind
        self.skipped = list(skipped or [])
        self.reader, self.bad_files, self._x = reader, bad_files, x
        self._labels = labels
        self.class_names = tuple(class_names or (reader.class_names if reader else ()))

    @property
    def in_memory(self) -> bool:
        return self.reader is None

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of one example: ``(C, H, W)`` or ``(2,)``."""
        return tuple(self.reader.shape) if self.reader is not None else tuple(self._x.shape[1:])

    def __len__(self) -> int:
        """Examples: of ``x`` once decoded (unreadable files dropped), else of the reader."""
        return int(self._x.shape[0]) if self._x is not None else len(self.reader)

    @property
    def labels(self) -> torch.Tensor | None:
        """int64 ``[N]`` class of each example, or None: of :attr:`x`'s rows once decoded
        (decoding drops unreadable files), else of the reader's rows, read from the index
        without decoding an image (a class-conditional run needs only these: its batches
        carry their own labels)."""
        if self.reader is None or self.reader.labels is None or self._x is not None:
            return self._labels
        if self._labels is None:
            r = self.reader
            self._labels = torch.tensor([r.label(j) for j in range(len(r))], dtype=torch.int64)
        return self._labels

    @property
    def x(self) -> torch.Tensor:
        """The whole split as float32 in [-1, 1] (decoded once for a file source)."""
        if self._x is None:
            self._x, self._labels = self._decode_all()
        return self._x

    def head(self, n: int) -> torch.Tensor:
        """The first ``n`` examples as float32 (decodes only those of a file source)."""
        if self._x is not None or n >= len(self):
            return self.x[:n]
        sub = Dataset(self.name, None, self.levels, self.kind, reader=_Head(self.reader, n),
                      bad_files=self.bad_files)
        return sub.x

    def _decode_all(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        reader, n = self.reader, len(self.reader)
        if getattr(getattr(reader, "base", reader), "streaming", False):
            raise DataError(f"{self.name} is a stream (pipe: shards): it is read in order "
                            "while training only; for eval, fid or show use local shards")
        if isinstance(reader, ArrayReader):
            u8 = reader.read_many(np.arange(n))
            keep = list(range(n))
        else:
            u8, keep = self._decode_files(reader, n)
        labels = None
        if reader.labels is not None:
            labels = torch.tensor([reader.label(j) for j in keep], dtype=torch.int64)
        return u8_to_float(torch.from_numpy(u8).permute(0, 3, 1, 2)), labels

    def _decode_files(self, reader: ImageReader, n: int) -> tuple[np.ndarray, list[int]]:
        out = np.empty((n, reader.shape[1], reader.shape[2], reader.shape[0]), np.uint8)
        errors: list[str | None] = [None] * n

        def work(j: int) -> None:
            try:
                out[j] = reader.read(j)
            except Exception as e:  # any decoder failure on user data means "unreadable"
                errors[j] = images.reason(e)

        workers = max(1, min(8, os.cpu_count() or 1, n // 16))
        with ThreadPoolExecutor(workers) as pool:  # PIL releases the GIL while decoding
            list(pool.map(work, range(n)))
        for j, err in enumerate(errors):
            if err is None:
                continue
            if self.bad_files == "fail":
                raise DataError(f"cannot read image {reader.where(j)}: {err} (pass "
                                "--bad-files skip to leave unreadable files out)")
            _warn(f"skipping unreadable image {reader.where(j)}: {err}")
            self.skipped.append(reader.where(j))
        self.skipped.sort()
        keep = [j for j in range(n) if errors[j] is None]
        if not keep:
            raise DataError(f"no readable image in {self.name}: all {n} image files of this "
                            "split failed to decode")
        return (out if len(keep) == n else out[keep]), keep


class _Head(ImageReader):
    """The first ``n`` examples of another reader."""

    def __init__(self, base: ImageReader, n: int):
        self.base, self.n, self.shape = base, n, base.shape
        self.labels, self.class_names = base.labels, base.class_names

    def __len__(self) -> int:
        return self.n

    def key(self, j: int) -> str:
        return self.base.key(j)

    def read(self, j: int) -> np.ndarray:
        return self.base.read(j)

    def label(self, j: int) -> int:
        return self.base.label(j)

    def where(self, j: int) -> str:
        return self.base.where(j)


def read_example(reader: ImageReader, j: int, bad_files: str
                 ) -> tuple[np.ndarray | None, int, str, list[tuple[str, str]]]:
    """Example ``j`` as (uint8 ``[H, W, C]``, label, key, unreadable ``(key, reason)`` met).

    Under ``bad_files="skip"`` an unreadable example is replaced by the next readable one
    (``j + 1``, ``j + 2``, ... wrapping around), so a batch keeps its size and the order stays
    a pure function of the data; under ``"fail"`` the image is None and the caller stops.
    """
    bad: list[tuple[str, str]] = []
    n = len(reader)
    for k in range(min(n, _MAX_REPLACEMENTS)):
        jj = (j + k) % n
        try:
            img = reader.read(jj)
            if img.shape != (reader.shape[1], reader.shape[2], reader.shape[0]):
                raise ValueError(f"decoded to shape {img.shape}, expected "
                                 f"{reader.shape[1:]} with {reader.shape[0]} channel(s)")
            return img, reader.label(jj), reader.key(jj), bad
        except Exception as e:  # any decoder failure on user data means "unreadable"
            bad.append((reader.where(jj), images.reason(e)))
            if bad_files == "fail":
                return None, -1, reader.key(jj), bad
    raise DataError(f"{len(bad)} unreadable images in a row from {bad[0][0]} on (last: "
                    f"{bad[-1][0]}: {bad[-1][1]}); check the data")


# ---- public entry point --------------------------------------------------------------------

def load_data(cfg: DataConfig, split: str = "train") -> Dataset:
    """Split ``"train"`` or ``"test"`` of ``cfg.name`` (a built-in set or a path)."""
    if split not in ("train", "test"):
        raise DataError(f"split={split!r} must be 'train' or 'test'")
    return _load(cfg, split)


def open_reader(cfg: DataConfig) -> tuple[ImageReader, Dataset]:
    """Every example of a file source (both splits, in order), for ``prepare``."""
    if cfg.name in BUILTIN_SETS:
        raise DataError(f"{cfg.name!r} is a built-in set: it needs no preparing")
    ds = _load(cfg, "all")
    return ds.reader, ds


def _load(cfg: DataConfig, split: str) -> Dataset:
    name = cfg.name
    if name in POINT_SETS:
        # Different seeds, so the test points are fresh draws, not a subset of train.
        n, seed = (cfg.num_points, 0) if split == "train" else (_TEST_POINTS, 1)
        gen = torch.Generator().manual_seed(seed)
        x, labels = sample_labelled_points(name, n, gen)
        return Dataset(name, x, None, "points", [], labels=labels,
                       class_names=POINT_CLASS_NAMES.get(name, ()))
    if name == "digits":
        return _load_digits(cfg, split)
    if not name.strip():  # Path("") is the current folder: never load that by accident
        raise DataError(f"data name {name!r} is empty; pass a built-in set "
                        f"({', '.join(BUILTIN_SETS)}), an image folder or a .npy/.npz file")
    from . import hf  # HF datasets / parquet: pyarrow is imported only when one is opened
    if hf.claims(name):
        return hf.load(cfg, split)
    path = Path(name).expanduser()
    from .shards import load_shard_source, looks_like_shards
    if looks_like_shards(name) and not path.is_dir():
        return load_shard_source(cfg, split)
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


def _split_or_borrow(n: int, split: str, what: object) -> _Split:
    """The split; a test split of a set smaller than 20 borrows the training examples."""
    if split == "test" and n < _TEST_EVERY:
        _warn(f"{what} has only {n} images (fewer than {_TEST_EVERY}), so its test split is "
              "the training images")
        split = "train"
    return _Split(n, split)


# ---- digits ------------------------------------------------------------------------------

def _load_digits(cfg: DataConfig, split: str) -> Dataset:
    """scikit-learn's 8x8 digits (values 0..16) as ``[N, C, 8k, 8k]`` on the 17-level grid,
    with their class labels 0..9."""
    all_images, all_labels = digits_arrays()  # uint8 [1797, 8, 8] 0..16, int64 [1797]
    part = slice(None, _DIGITS_TRAIN) if split == "train" else slice(_DIGITS_TRAIN, None)
    images_ = all_images[part].astype(np.float64)  # integers 0..16
    # v / 16 * 2 - 1 = v / 8 - 1 is exact in float32: the 17 bin centres -1 + 2k/16.
    x = torch.from_numpy(images_ / 8.0 - 1.0).to(torch.float32)[:, None]
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
    labels = torch.from_numpy(all_labels[part].copy())
    return Dataset("digits", x, 17, "image", [], labels=labels,
                   class_names=tuple(str(d) for d in range(10)))


# ---- image folders -------------------------------------------------------------------------

def _probe_all(files: list[Path]) -> list:
    """Each file's (size, colour) from its header, or the reason it cannot be read."""
    def one(p: Path):
        try:
            return images.probe(p)
        except Exception as e:  # any decoder failure on user data means "unreadable"
            return images.reason(e)

    workers = max(1, min(8, os.cpu_count() or 1, len(files) // 64))
    if workers == 1:
        return [one(p) for p in files]
    with ThreadPoolExecutor(workers) as pool:  # header reads wait on the disk, not the CPU
        return list(pool.map(one, files))


def _class_labels(rel: list[str]) -> tuple[np.ndarray | None, tuple[str, ...]]:
    """Labels from class subfolders: when every image lies in a subfolder, the class of an
    image is the rank of its top-level subfolder's name among them (sorted)."""
    tops = [r.split("/", 1)[0] if "/" in r else None for r in rel]
    if not tops or any(t is None for t in tops):
        return None, ()
    names = tuple(sorted(set(tops)))
    index = {n: i for i, n in enumerate(names)}
    return np.asarray([index[t] for t in tops], dtype=np.int64), names


def _load_folder(folder: Path, cfg: DataConfig, split: str) -> Dataset:
    manifest = folder / "manifest.json"
    if manifest.is_file():
        from .prepare import load_prepared
        return load_prepared(folder, cfg, split)
    files = images.list_images(folder)
    from . import hf
    if not files and hf.parquet_in(folder):  # a folder of parquet files
        return hf.load(cfg, split)
    if not files:
        raise DataError(f"folder {folder} holds no image files (looked for "
                        f"{', '.join(sorted(images.IMAGE_EXTENSIONS))}, recursively)")
    # Header pass over every file (both splits, so that train and test agree on the channel
    # count and the size check): one header read per file, threaded.
    probes = _probe_all(files)
    skipped = []
    for p, pr in zip(files, probes, strict=True):
        if isinstance(pr, str):
            if cfg.bad_files == "fail":
                raise DataError(f"cannot read image {p}: {pr} (pass --bad-files skip to leave "
                                "unreadable files out)")
            _warn(f"skipping unreadable image {p}: {pr}")
            skipped.append(str(p))
    good = [(p, pr) for p, pr in zip(files, probes, strict=True) if not isinstance(pr, str)]
    if not good:
        raise DataError(f"no readable image in {folder}: all {len(files)} image files failed "
                        f"to decode (e.g. {files[0]})")
    size = cfg.image_size or _common_size(folder, good)
    channels = cfg.channels or (3 if any(colour for _, (_, colour) in good) else 1)
    rel = [p.relative_to(folder).as_posix() for p, _ in good]
    labels, names = _class_labels(rel)
    reader = FolderReader(folder, rel, _split_or_borrow(len(rel), split, folder), size,
                          channels, labels, names)
    return Dataset(cfg.name, None, 256, "image", skipped, reader=reader,
                   bad_files=cfg.bad_files)


def _common_size(folder: Path, good: list) -> int:
    (p0, ((w0, h0), _)) = good[0]
    for p, ((w, h), _) in good:
        if (w, h) != (w0, h0):
            raise DataError(f"images in {folder} differ in size ({p0} is {w0}x{h0}, {p} is "
                            f"{w}x{h}); pass --image-size N to resize and centre-crop them to "
                            "N x N")
    if w0 != h0:
        raise DataError(f"images in {folder} are {w0}x{h0} (e.g. {p0}), not square; pass "
                        "--image-size N to resize and centre-crop them to N x N")
    return w0


# ---- .npy / .npz arrays ------------------------------------------------------------------

def _load_array_file(path: Path, cfg: DataConfig, split: str) -> Dataset:
    af = open_array_file(path)
    n, h, w, _ = af.shape
    if cfg.image_size == 0 and h != w:
        raise DataError(f"{path} holds {w}x{h} (width x height) images, which are not square; "
                        "pass --image-size N to resize and centre-crop them to N x N")
    reader = ArrayReader(af, _split_or_borrow(n, split, path), cfg.image_size, cfg.channels)
    return Dataset(cfg.name, None, 256, "image", [], reader=reader, bad_files=cfg.bad_files)
