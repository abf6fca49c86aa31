"""WebDataset-style tar shards: naming them, indexing local ones, reading one example.

**Names.** ``--data`` takes shards as a brace pattern (``data/train-{000000..000099}.tar``:
numeric ranges keep the zero padding of their ends; ``{a,b}`` lists alternatives), a glob
(``data/*.tar``), a text file listing one shard per line (``#`` comments; relative paths are
relative to the list), a prepared shard folder (``ddpmkit prepare --format shards``), or
``pipe:CMD`` entries whose standard output is a tar (``pipe:aws s3 cp s3://b/x-{0..9}.tar -``;
the braces are expanded first). Entries can be mixed in a list file.

**Members.** An example is the run of consecutive members sharing a key (the member name up
to the first dot of its base name): ``KEY.png|jpg|jpeg|webp`` or ``KEY.npy`` (uint8
``[H, W]`` or ``[H, W, C]``) is the image, ``KEY.cls`` its class index as text. ``KEY.json``
and any other member are ignored (a label is never taken from JSON: one rule, no guessing of
field names). A key without an image member is not an example. Labels exist when every
example has a ``.cls``; where some lack one their label is -1, which a class-conditional run
refuses.

**Local shards are read map-style.** Opening them scans the tar headers once (tarfile seeks
over the data: one 512-byte read per member) into an index of (shard, offset, size) per
example; an example is then one ``os.pread`` and a decode, in any order. So the loader's
rules for files hold unchanged (:mod:`.loader`): one seeded permutation per epoch over all
examples of all shards, each rank its rows of each global batch, exact resume from
``images_seen`` for any worker count, the remaining examples of an epoch after a change of
rank count. ``pipe:`` shards cannot be read out of order; :mod:`.stream` reads them.

**Split.** Example ``k`` (0-based, in tar order) of each shard is a test example when
``k % 20 == 19``, the same rule as folders and arrays, per shard so that a stream applies it
without knowing the other shards.

**Why not the webdataset package.** It was slower than a plain ``tarfile`` reader on the
same 32x32 PNG shards in the same run (1,826 and 1,722 vs 2,035 and 2,211 images/s, one
process, ``python benchmarks/data.py --readers``, 2026-12-03, shared 2-core machine), and it
could not give what local shards get here: an index and random access. So ddpmkit reads tar
files with the standard library, here and in :mod:`.stream`.

**Bad data.** A shard that cannot be opened, a garbled header or a member cut off by the end
of the file is reported (shard, and the key or byte offset) and its unreadable examples are
left out (``bad_files="skip"``: warned and counted; ``"fail"``: a one-line error). An image
that does not decode is met while training, like a broken file of a folder.
"""

from __future__ import annotations

import glob
import os
import re
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DataError
from . import images
from .sources import ImageReader

IMAGE_MEMBERS: tuple[str, ...] = ("png", "jpg", "jpeg", "webp", "npy")
LIST_SUFFIXES: tuple[str, ...] = (".txt", ".shards")
_TEST_EVERY = 20
_BRACE = re.compile(r"\{([^{}]*)\}")
_GLOB = re.compile(r"[*?\[]")


# ---- names -----------------------------------------------------------------------------------

def looks_like_shards(name: str) -> bool:
    """Whether a ``--data`` value names tar shards (and not a folder or an array)."""
    low = name.strip().lower()
    return (low.startswith("pipe:") or low.endswith(".tar") or low.endswith(LIST_SUFFIXES)
            or (_BRACE.search(name) is not None and ".tar" in low))


def expand_braces(pattern: str) -> list[str]:
    """``a{1..3}b`` -> a1b a2b a3b; ``{08..10}`` keeps the padding (08 09 10); ``{x,y}``."""
    m = _BRACE.search(pattern)
    if m is None:
        return [pattern]
    head, body, tail = pattern[:m.start()], m.group(1), pattern[m.end():]
    rng = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if rng:
        a, b = rng.group(1), rng.group(2)
        lo, hi = int(a), int(b)
        if abs(hi - lo) > 10_000_000:
            raise DataError(f"brace range {{{body}}} names more than 10 million shards")
        width = len(a) if (a.startswith("0") and len(a) > 1) or len(a) == len(b) else 0
        step = 1 if hi >= lo else -1
        items = [str(v).zfill(width) for v in range(lo, hi + step, step)]
    else:
        items = body.split(",")
    return [out for item in items for out in expand_braces(head + item + tail)]


def shard_urls(spec: str) -> list[str]:
    """The shards a ``--data`` value names, in order: paths (absolute) and ``pipe:`` commands."""
    spec = spec.strip()
    if spec.lower().startswith("pipe:"):
        return expand_braces(spec)
    path = Path(spec).expanduser()
    if path.suffix.lower() in LIST_SUFFIXES:
        if not path.is_file():
            raise DataError(f"shard list {path}: no such file")
        return _list_file(path)
    out = []
    for p in expand_braces(str(path)):
        if _GLOB.search(p):
            hits = sorted(glob.glob(p))
            if not hits:
                raise DataError(f"no shard matches {p}")
            out += [os.path.abspath(h) for h in hits]
        else:
            out.append(os.path.abspath(p))
    return out


def _list_file(path: Path) -> list[str]:
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read shard list {path}: {images.reason(e)}") from None
    out = []
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if not line.lower().startswith("pipe:") and not os.path.isabs(line):
            line = str(path.parent / line)
        out += shard_urls(line)
    if not out:
        raise DataError(f"shard list {path} names no shard")
    return out


def split_key(name: str) -> tuple[str, str]:
    """Member name -> (key, extension): ``a/b/x.seg.png`` -> (``a/b/x``, ``seg.png``)."""
    folder, _, base = name.rpartition("/")
    stem, dot, ext = base.partition(".")
    return (f"{folder}/{stem}" if folder else stem), (ext.lower() if dot else "")


def is_test(k: int) -> bool:
    """Whether example ``k`` of a shard (0-based, tar order) belongs to the test split."""
    return k % _TEST_EVERY == _TEST_EVERY - 1


# ---- decoding one member ------------------------------------------------------------------

def decode_member(data: bytes, ext: str, size: int, channels: int) -> np.ndarray:
    """An image member's bytes -> uint8 ``[H, W, C]`` (``size``/``channels`` as in
    :func:`.images.decode`; 0 keeps the image's own)."""
    if ext != "npy":
        import io
        return images.decode(io.BytesIO(data), size, channels or 3)
    arr = npy_member(data)
    img = arr[..., None] if arr.ndim == 2 else arr
    c = img.shape[2]
    if channels == 1 and c == 3:
        img = images.luma(img)[..., None]
    elif channels == 3 and c == 1:
        img = np.repeat(img, 3, axis=2)
    if size and img.shape[:2] != (size, size):
        from PIL import Image
        pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
        img = np.asarray(images.resize_crop(pil, size)).reshape(size, size, -1)
    return img


_NPY_HEADERS: dict[bytes, tuple[int, ...]] = {}  # header bytes -> shape, once checked


def npy_member(data: bytes) -> np.ndarray:
    """A ``.npy`` member's uint8 ``[H, W]`` or ``[H, W, C]`` (C = 1 or 3); never unpickles.

    Every member of a prepared set has the same header, so a header seen before is looked up
    (a dict hit) instead of parsed again (parsing is ~40x slower than the copy itself).
    """
    end = 10 + int.from_bytes(data[8:10], "little") if data[6:7] == b"\x01" else 0
    shape = _NPY_HEADERS.get(data[:end]) if end else None
    if shape is None:
        import io
        f = io.BytesIO(data)
        version = np.lib.format.read_magic(f)
        read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read(f)
        if dtype != np.uint8 or fortran or len(shape) not in (2, 3) \
                or (len(shape) == 3 and shape[2] not in (1, 3)) or 0 in shape:
            raise ValueError(f".npy member holds {dtype} {shape}; expected uint8 [H, W] or "
                             "[H, W, C] with C = 1 or 3")
        end = f.tell()
        if len(_NPY_HEADERS) < 64 and version == (1, 0):
            _NPY_HEADERS[data[:end]] = shape
    body = memoryview(data)[end:]
    if len(body) != int(np.prod(shape)):
        raise ValueError(f".npy member holds {len(body)} bytes of pixels, its header says "
                         f"{int(np.prod(shape))} (truncated?)")
    return np.frombuffer(body, np.uint8).reshape(shape)


def parse_cls(data: bytes) -> int:
    """A ``.cls`` member: a class index >= 0 as decimal text."""
    text = data.decode("ascii", "replace").strip()
    if not text.isdigit() or len(text) > 9:
        raise ValueError(f".cls member holds {text[:20]!r}, not a class index 0, 1, ...")
    return int(text)


# ---- indexing local shards -----------------------------------------------------------------

class CheckedInfo(tarfile.TarInfo):
    """Tar headers that fail loudly: tarfile ends an archive quietly at a garbled or cut-off
    header (only an all-zero block is a real end, or the file simply ending there)."""

    @classmethod
    def fromtarfile(cls, tf):
        try:
            return super().fromtarfile(tf)
        except (tarfile.InvalidHeaderError, tarfile.TruncatedHeaderError) as e:
            if tf.offset == 0:
                raise
            raise tarfile.ReadError(f"garbled or cut-off tar header at byte {tf.offset} "
                                    f"({e})") from None


@dataclass
class ShardIndex:
    """Examples of local shards, in shard order then tar order (arrays ``[N]``)."""

    shards: list[str]
    shard: np.ndarray            # int32 index into shards
    offset: np.ndarray           # int64 byte offset of the image member's data
    size: np.ndarray             # int64 its length
    ext: np.ndarray              # int8 index into IMAGE_MEMBERS
    label: np.ndarray            # int64 class, -1 without a .cls
    ordinal: np.ndarray          # int64 example number within its shard (for the split)
    keys: list[str]
    problems: list[tuple[str, str]] = field(default_factory=list)  # (where, reason)


def _scan(path: str) -> tuple[list, list[tuple[str, str]]]:
    """One shard's examples [(key, ext, offset, size, label)] and its problems."""
    rows, problems = [], []
    try:
        end = os.path.getsize(path)
        tf = tarfile.open(path, "r:", tarinfo=CheckedInfo)
    except (OSError, tarfile.TarError, EOFError, ValueError) as e:
        return [], [(path, f"cannot open shard: {images.reason(e)}")]
    with tf, open(path, "rb") as raw:
        groups: dict = {}
        last, broken = None, False
        try:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                if m.offset_data + m.size > end:  # the file ends inside this member
                    problems.append((f"{path}:{key}", f"member {m.name} is cut off by the end "
                                     "of the shard (truncated)"))
                    broken = True
                    break
                if key != last:
                    _flush(groups, rows, problems, path, raw)
                    groups, last = {}, key
                groups[ext] = (m.offset_data, m.size, m.name)
        except (tarfile.TarError, OSError, EOFError, ValueError) as e:
            problems.append((path, f"unreadable after byte {tf.offset}: {images.reason(e)}"))
            broken = True
        _flush(groups, rows, problems, path, raw)
        stop = tf.offset
        raw.seek(stop)
        rest = raw.read(1 << 16)
        if rest.strip(b"\0") and not broken:
            problems.append((path, f"garbled tar header at byte {stop} (after key {last!r}); "
                             "the members after it are left out"))
    return rows, problems


def _flush(groups: dict, rows: list, problems: list, path: str, raw) -> None:
    """Turn one key's members into an example row (or a problem)."""
    if not groups:
        return
    name = next(iter(groups.values()))[2]
    key, _ = split_key(name)
    image = next((e for e in IMAGE_MEMBERS if e in groups), None)
    if image is None:
        return  # not an example (metadata only)
    label = -1
    if "cls" in groups:
        off, size, _ = groups["cls"]
        try:
            label = parse_cls(os.pread(raw.fileno(), min(size, 64), off))
        except ValueError as e:
            problems.append((f"{path}:{key}", images.reason(e)))
            return
    off, size, _ = groups[image]
    rows.append((key, IMAGE_MEMBERS.index(image), off, size, label))


def index_shards(paths: list[str], progress: bool = False) -> ShardIndex:
    """Scan local shards (threaded: the scans wait on the disk)."""
    workers = max(1, min(8, os.cpu_count() or 1, len(paths)))
    with ThreadPoolExecutor(workers) as pool:
        scans = list(pool.map(_scan, paths))
    cols: dict[str, list] = {k: [] for k in ("shard", "offset", "size", "ext", "label",
                                             "ordinal")}
    keys, problems = [], []
    for s, (rows, probs) in enumerate(scans):
        problems += probs
        for k, (key, ext, off, size, label) in enumerate(rows):
            keys.append(key)
            for name, v in zip(cols, (s, off, size, ext, label, k), strict=True):
                cols[name].append(v)
    types = {"shard": np.int32, "ext": np.int8}
    arr = {k: np.asarray(v, dtype=types.get(k, np.int64)) for k, v in cols.items()}
    return ShardIndex(list(paths), keys=keys, problems=problems, **arr)


# ---- reading local shards map-style ----------------------------------------------------------

class _Rows:
    """Example ``j`` of a split -> row of the index (the per-shard rule of :func:`is_test`)."""

    def __init__(self, ordinal: np.ndarray, split: str):
        self.split = split
        if split == "all":
            self.rows = np.arange(len(ordinal), dtype=np.int64)
        else:
            test = (ordinal % _TEST_EVERY) == _TEST_EVERY - 1
            self.rows = np.flatnonzero(test if split == "test" else ~test).astype(np.int64)
        self.n = len(self.rows)

    def __call__(self, j: int) -> int:
        return int(self.rows[j])


class ShardReader(ImageReader):
    """Split ``split`` of local shards: one ``pread`` of an image member, then a decode.

    ``size``/``channels`` must be known (the manifest, or :func:`probe_shape`). Keys are
    one bytes blob plus offsets (compact; forked workers share it).
    """

    def __init__(self, index: ShardIndex, split: str, size: int, channels: int,
                 class_names: tuple[str, ...] = ()):
        super().__init__(_Rows(index.ordinal, split))
        self.shards, self.size = index.shards, size
        self.shape = (channels, size, size)
        self.offset, self.nbytes, self.ext = index.offset, index.size, index.ext
        self.shard = index.shard
        has = len(index.label) and bool((index.label >= 0).any())
        self.labels = index.label if has else None
        self.class_names = class_names
        encoded = [k.encode("utf-8", "surrogateescape") for k in index.keys]
        self._blob = b"".join(encoded)
        self._koff = np.cumsum([0] + [len(e) for e in encoded], dtype=np.int64)
        self._fds: dict[int, int] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": {}}

    def _fd(self, s: int) -> int:
        if self._pid != os.getpid():  # a forked worker: open its own files
            self._fds, self._pid = {}, os.getpid()
        if s not in self._fds:
            if len(self._fds) >= 64:  # bound the open files: close the oldest
                os.close(self._fds.pop(next(iter(self._fds))))
            self._fds[s] = os.open(self.shards[s], os.O_RDONLY)
        return self._fds[s]

    def _raw_key(self, i: int) -> str:
        return self._blob[self._koff[i]:self._koff[i + 1]].decode("utf-8", "surrogateescape")

    def key(self, j: int) -> str:
        i = self.split(j)
        return f"{os.path.basename(self.shards[self.shard[i]])}:{self._raw_key(i)}"

    def where(self, j: int) -> str:
        i = self.split(j)
        return f"{self.shards[self.shard[i]]}:{self._raw_key(i)}"

    def member(self, j: int) -> tuple[bytes, str]:
        i = self.split(j)
        n = int(self.nbytes[i])
        data = os.pread(self._fd(int(self.shard[i])), n, int(self.offset[i]))
        if len(data) != n:
            raise OSError("the shard ends before this member (truncated?)")
        return data, IMAGE_MEMBERS[self.ext[i]]

    def read(self, j: int) -> np.ndarray:
        data, ext = self.member(j)
        return decode_member(data, ext, self.size, self.shape[0])


def probe_shape(reader: ShardReader, image_size: int, channels: int
                ) -> tuple[int, int, list[int]]:
    """(size, channels, unreadable examples) from every image header of ``reader``; the images
    must agree in size and be square unless ``image_size`` is given."""
    def one(j: int):
        try:
            data, ext = reader.member(j)
            if ext == "npy":
                a = npy_member(data)
                return (a.shape[1], a.shape[0]), a.ndim == 3 and a.shape[2] == 3
            import io
            return images.probe(io.BytesIO(data))
        except Exception as e:  # any decoder failure on user data means "unreadable"
            return images.reason(e)

    with ThreadPoolExecutor(max(1, min(8, os.cpu_count() or 1))) as pool:
        probes = list(pool.map(one, range(len(reader))))
    good = [(j, p) for j, p in enumerate(probes) if not isinstance(p, str)]
    bad = [(j, p) for j, p in enumerate(probes) if isinstance(p, str)]
    if not good:
        raise DataError(f"no readable image in the shards (e.g. {reader.where(0)}: "
                        f"{bad[0][1]})")
    size = image_size
    if not size:
        j0, ((w0, h0), _) = good[0]
        for j, ((w, h), _) in good:
            if (w, h) != (w0, h0) or w != h:
                raise DataError(f"images in the shards differ in size or are not square "
                                f"({reader.where(j0)} is {w0}x{h0}, {reader.where(j)} is "
                                f"{w}x{h}); pass --image-size N to resize and centre-crop "
                                "them to N x N")
        size = w0
    return size, channels or (3 if any(c for _, (_, c) in good) else 1), bad


def _without(index: ShardIndex, drop: list[int]) -> ShardIndex:
    keep = np.ones(len(index.keys), bool)
    keep[drop] = False
    cols = {k: getattr(index, k)[keep] for k in ("shard", "offset", "size", "ext", "label",
                                                   "ordinal")}
    keys = [k for k, ok in zip(index.keys, keep, strict=True) if ok]
    return ShardIndex(index.shards, keys=keys, problems=index.problems, **cols)


def load_shards(name: str, urls: list[str], split: str, image_size: int, channels: int,
                bad_files: str, manifest: dict | None = None):
    """A :class:`~.sources.Dataset` of local shards (``manifest``: a prepared folder's, which
    gives the shape and class names without probing)."""
    from .sources import Dataset, _warn

    index = index_shards(urls)
    skipped = []
    for where, why in index.problems:
        if bad_files == "fail":
            raise DataError(f"cannot read shard {where}: {why} (pass --bad-files skip to leave "
                            "unreadable shards and members out)")
        _warn(f"skipping unreadable shard data {where}: {why}")
        skipped.append(where)
    if not index.keys:
        raise DataError(f"no example in {name}: {len(urls)} shard(s), none holding a "
                        f"{'/'.join(IMAGE_MEMBERS)} member")
    names: tuple[str, ...] = ()
    if manifest is not None:
        c, size, _ = manifest["shape"]
        names = tuple(manifest.get("class_names", ()))
        size, c = image_size or size, channels or c
    else:
        whole = ShardReader(index, "all", 0, 0)
        size, c, bad = probe_shape(whole, image_size, channels)
        for j, why in bad:
            where = whole.where(j)
            if bad_files == "fail":
                raise DataError(f"cannot read image {where}: {why} (pass --bad-files skip to "
                                "leave unreadable files out)")
            _warn(f"skipping unreadable image {where}: {why}")
            skipped.append(where)
        if bad:
            index = _without(index, [j for j, _ in bad])
    if split == "test" and not (index.ordinal % _TEST_EVERY == _TEST_EVERY - 1).any():
        _warn(f"{name} has no test example (example 20, 40, ... of a shard); its test split "
              "is the training examples")
        split = "train"
    reader = ShardReader(index, split, size, c, names)
    return Dataset(name, None, 256, "image", skipped, reader=reader, bad_files=bad_files)


def load_shard_source(cfg, split: str):
    """``--data`` naming shards: local ones indexed here, ``pipe:`` ones streamed."""
    urls = shard_urls(cfg.name)
    if any(u.lower().startswith("pipe:") for u in urls):
        from .stream import load_stream
        return load_stream(cfg, split, urls, _manifest_beside(cfg.name, urls))
    return load_shards(cfg.name, urls, split, cfg.image_size, cfg.channels, cfg.bad_files)


def _manifest_beside(spec: str, urls: list[str]) -> dict | None:
    """The prepared manifest.json beside a shard list, when its shards are the listed ones."""
    path = Path(spec.strip()).expanduser()
    if path.suffix.lower() not in LIST_SUFFIXES or not (path.parent / "manifest.json").is_file():
        return None
    from .prepare import read_manifest
    from .stream import shard_name
    m = read_manifest(path.parent)
    if m["layout"] != "shards" or set(m["files"]) != {shard_name(u) for u in urls}:
        raise DataError(f"{path.parent / 'manifest.json'} lists shards "
                        f"{sorted(m['files'])[:3]}..., not the {len(urls)} shards of {path}")
    return m
