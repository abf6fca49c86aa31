"""Hugging Face data: ``datasets`` folders (``save_to_disk``) and parquet files, read lazily.

Sources (``--data SRC``, ``ddpmkit prepare SRC``):

* a folder written by ``Dataset.save_to_disk`` (``state.json`` beside ``data-*.arrow``), or by
  ``DatasetDict.save_to_disk`` (``dataset_dict.json`` and one such folder per split);
* parquet: a ``.parquet`` file, a glob (``'data/train-*.parquet'``), or a folder of parquet
  files (the Hub's ``data/train-00000-of-00001.parquet`` layout). A file belongs to split
  ``train`` (``test``) when its name starts with ``train`` (``test``) followed by ``-``, ``_``
  or ``.``, or when it lies in a folder of that name.

Splits: a source with both a ``train`` and a ``test`` split uses them as they are; otherwise
its ``train`` split (else its first) is split by the usual rule (every 20th example is a test
example). ``prepare`` reads that same base split, ``train`` when there is one: prepare a split
folder on its own to keep another.

Columns: the image is the column whose feature is ``Image`` (one named ``image``/``img`` first),
else a column of encoded bytes (``binary``, or a struct with a ``bytes`` field, as ``Image`` is
stored); a row whose ``bytes`` are empty is read from its ``path``. Labels: the ``label``
column, else the only ``ClassLabel`` column; a ClassLabel's names become the class names; a
null label is -1 (none).

Reading: encoded images are never loaded whole. The arrow files of a ``datasets`` folder are
uncompressed IPC streams, so each row's encoded image is one run of bytes at a known offset: an
index (file, offset, length; 20 bytes a row) is built once at open, and a row is read with
``os.pread`` (as :mod:`.arrays` reads ``.npy`` rows: the pages stay in the page cache, out of
the resident set) and decoded by :mod:`.images` in the DataLoader worker. Parquet is compressed
per row group, so it is copied once (the encoded bytes and labels, nothing decoded) into an
uncompressed arrow file in the data cache, keyed by the parquet files' content, and read the
same way. Needs ``pyarrow`` (``pip install 'ddpmkit[hf]'``), imported only when such a source is
opened; ``datasets`` itself is never imported.
"""

from __future__ import annotations

import glob
import hashlib
import io
import json
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..config import DataConfig
from ..errors import DataError
from . import images
from .arrays import _content_key, cache_dir
from .sources import Dataset, ImageReader, _common_size, _split_or_borrow, _warn

_MARKERS = ("state.json", "dataset_dict.json")
_IMAGE_NAMES = ("image", "img")
_SPLITS = ("train", "test")
_CACHE_VERSION = 1       # part of the parquet cache key: bump when the copy changes
INSTALL = "pip install 'ddpmkit[hf]'"


# ---- recognising a source (names only: nothing imported) -------------------------------------

def claims(name: str) -> bool:
    """Whether ``name`` is a ``datasets`` folder, a parquet file or a glob matching parquet."""
    p = Path(name).expanduser()
    if p.is_dir():
        return any((p / m).is_file() for m in _MARKERS)
    if p.exists():
        return p.suffix.lower() == ".parquet"
    return any(c in name for c in "*?[") and bool(_glob_parquet(name))


def parquet_in(folder: Path) -> list[Path]:
    """Parquet files under ``folder`` (recursively, hidden ones left out), sorted."""
    return sorted(p for p in folder.rglob("*.parquet") if p.is_file()
                  and not any(s.startswith(".") for s in p.relative_to(folder).parts))


def source_files(name: str) -> list[Path]:
    """The files holding the data of a source that :func:`claims` (for the fingerprint)."""
    p = Path(name).expanduser()
    if p.is_dir() and any((p / m).is_file() for m in _MARKERS):
        return sorted(p.rglob("*.arrow"))
    if p.is_dir():
        return parquet_in(p)
    return [p] if p.exists() else _glob_parquet(name)


def _glob_parquet(pattern: str) -> list[Path]:
    return sorted(Path(f) for f in glob.glob(os.path.expanduser(pattern), recursive=True)
                  if f.lower().endswith(".parquet") and os.path.isfile(f))


def _split_of(rel: Path) -> str:
    """``train``/``test`` from a file's relative path (folder or file-name prefix), else ""."""
    for part in (*rel.parts[:-1], rel.name):
        low = part.lower()
        for s in _SPLITS:
            if low == s or low[:len(s) + 1] in (f"{s}-", f"{s}_", f"{s}."):
                return s
    return ""


def _splits(name: str) -> tuple[dict[str, list[Path]], dict[str, str], bool]:
    """(split -> data files, split -> display name, whether the files are parquet)."""
    p = Path(name).expanduser()
    if p.is_dir() and (p / "dataset_dict.json").is_file():
        listed = _json(p / "dataset_dict.json").get("splits")
        names = listed if isinstance(listed, list) and listed else sorted(
            d.name for d in p.iterdir() if (d / "state.json").is_file())
        return ({s: _arrow_files(p / str(s)) for s in names},
                {s: str(p / str(s)) for s in names}, False)
    if p.is_dir() and (p / "state.json").is_file():
        return {"": _arrow_files(p)}, {"": str(p)}, False
    files = [p] if p.is_file() else parquet_in(p) if p.is_dir() else _glob_parquet(name)
    if not files:
        raise DataError(f"{name} holds no parquet files")
    splits: dict[str, list[Path]] = {}
    for f in files:
        splits.setdefault(_split_of(f.relative_to(p) if p.is_dir() else Path(f.name)),
                          []).append(f)
    return splits, {s: f"{name}:{s}" if s else name for s in splits}, True


def _json(path: Path) -> dict:
    try:
        out = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"cannot read {path}: {images.reason(e)}") from None
    return out if isinstance(out, dict) else {}


def _arrow_files(folder: Path) -> list[Path]:
    state = _json(folder / "state.json") if (folder / "state.json").is_file() else {}
    listed = state.get("_data_files")
    if listed == []:  # save_to_disk of an empty dataset writes no arrow file
        raise DataError(f"{folder} holds no rows")
    if isinstance(listed, list):
        files = [folder / str(d.get("filename", "")) for d in listed if isinstance(d, dict)]
    else:
        files = sorted(folder.glob("*.arrow"))
    missing = [f for f in files if not f.is_file()]
    if not files or missing:
        what = f"missing {missing[0]}" if missing else "no .arrow files"
        raise DataError(f"{folder}: {what}; save the dataset again with save_to_disk")
    return files


def _choose(splits: dict[str, list[Path]], split: str) -> tuple[str, str]:
    """(the source's split to read, the rule applied to it: "all", "train" or "test")."""
    if split != "all" and "train" in splits and "test" in splits:
        return split, "all"
    return ("train" if "train" in splits else next(iter(splits))), split


# ---- columns ---------------------------------------------------------------------------------

def _pyarrow(name: str):
    try:
        import pyarrow as pa
        import pyarrow.ipc  # noqa: F401 - a submodule, imported for pa.ipc
    except ImportError:
        raise DataError(f"reading {name} (a Hugging Face dataset or parquet) needs pyarrow, "
                        f"which is not installed: {INSTALL}") from None
    return pa


def _is_bytes(pa, t) -> bool:
    if pa.types.is_struct(t):
        return t.get_field_index("bytes") >= 0 and _is_bytes(pa, t.field("bytes").type)
    return pa.types.is_binary(t) or pa.types.is_large_binary(t)


def _columns(pa, schema, where: str) -> tuple[str, str | None, tuple[str, ...]]:
    """(image column, label column or None, class names) of an arrow schema."""
    meta = (schema.metadata or {}).get(b"huggingface", b"{}")
    try:
        feats = json.loads(meta).get("info", {}).get("features", {}) or {}
    except (ValueError, AttributeError):
        feats = {}
    kind = {n: f.get("_type") if isinstance(f, dict) else None for n, f in feats.items()}
    cands = [n for n in schema.names if kind.get(n) == "Image"
             and _is_bytes(pa, schema.field(n).type)]
    cands = cands or [n for n in schema.names if _is_bytes(pa, schema.field(n).type)]
    if not cands:
        cols = ", ".join(f"{n} ({schema.field(n).type})" for n in schema.names)
        raise DataError(f"{where}: no image column among {cols or 'no columns'}; expected an "
                        "Image feature or a column of encoded image bytes")
    image = next((n for n in cands if n.lower() in _IMAGE_NAMES), cands[0])
    ints = [n for n in schema.names if pa.types.is_integer(schema.field(n).type)]
    classes = [n for n in ints if kind.get(n) == "ClassLabel"]
    label = "label" if "label" in ints else classes[0] if len(classes) == 1 else None
    names = feats.get(label, {}).get("names") if kind.get(label) == "ClassLabel" else None
    return image, label, tuple(str(v) for v in names or ())


# ---- the index: each row's encoded bytes, by file and offset --------------------------------

@dataclass
class _Index:
    """Where each row's encoded image lies: ``files[fid[r]]`` at ``offset[r]``, ``length[r]``
    bytes (-1: the row has no bytes; read the file ``paths[r]``)."""

    files: list[str]
    fid: np.ndarray
    offset: np.ndarray
    length: np.ndarray
    paths: dict[int, str]
    labels: np.ndarray | None
    class_names: tuple[str, ...]
    root: str = ""                     # relative image paths are looked up here
    _fds: tuple[int, dict] | None = field(default=None, repr=False)

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_fds": None}  # each process opens its own files

    def __len__(self) -> int:
        return len(self.fid)

    def read(self, r: int) -> io.BytesIO | Path:
        """Row ``r``'s encoded image, ready for :func:`images.decode`."""
        n = int(self.length[r])
        if n < 0:
            if not self.paths.get(r):
                raise ValueError("the row has neither image bytes nor a path")
            p = Path(self.paths[r])
            return p if p.is_absolute() or not self.root else Path(self.root) / p
        if self._fds is None or self._fds[0] != os.getpid():
            self._fds = (os.getpid(), {})
        fds, f = self._fds[1], int(self.fid[r])
        if f not in fds:
            fds[f] = os.open(self.files[f], os.O_RDONLY)
        buf = os.pread(fds[f], n, int(self.offset[r]))
        if len(buf) != n:
            raise OSError(f"{self.files[f]} ends before row {r} (truncated?)")
        return io.BytesIO(buf)


def _index_file(pa, path: Path, image: str, label: str | None):
    """Per record batch of the arrow stream ``path``: (offsets, lengths, paths, labels)."""
    with pa.memory_map(str(path)) as mm:
        whole = mm.read_buffer()
        reader = pa.ipc.open_stream(whole)
        for batch in reader:
            col = batch.column(image)
            data = col.field("bytes") if pa.types.is_struct(col.type) else col
            where = col.field("path") if pa.types.is_struct(col.type) and \
                col.type.get_field_index("path") >= 0 else None
            width = np.int64 if pa.types.is_large_binary(data.type) else np.int32
            bufs = data.buffers()
            ends = np.frombuffer(bufs[1], width)[data.offset:data.offset + len(data) + 1] \
                if bufs[1] is not None else np.zeros(len(data) + 1, width)
            stored = bufs[2] is not None and bufs[2].size > 0
            base = bufs[2].address - whole.address if stored else 0
            if stored and not 0 <= base <= whole.size:
                raise DataError(f"{path}: its arrow buffers are compressed; save the dataset "
                                "again without compression")
            lengths = np.diff(ends).astype(np.int64)
            valid = (data.is_valid().to_numpy(zero_copy_only=False)
                     & col.is_valid().to_numpy(zero_copy_only=False))  # a null image row
            lengths[~valid | (lengths == 0)] = -1
            paths = {k: where[k].as_py() for k in np.flatnonzero(lengths < 0).tolist()} \
                if where is not None else {k: None for k in np.flatnonzero(lengths < 0).tolist()}
            labels = batch.column(label).fill_null(-1).to_numpy(zero_copy_only=False) \
                if label else None
            yield base + ends[:-1].astype(np.int64), lengths, paths, labels


def _build_index(pa, files: list[Path], where: str, root: str) -> _Index:
    with pa.memory_map(str(files[0])) as mm:
        schema = pa.ipc.open_stream(mm).schema
    image, label, names = _columns(pa, schema, where)
    fid, offs, lens, labs, paths, seen = [], [], [], [], {}, 0
    for f, path in enumerate(files):
        for o, n, p, y in _index_file(pa, path, image, label):
            paths.update({seen + k: v for k, v in p.items()})
            seen += len(o)
            fid.append(np.full(len(o), f, np.int32))
            offs.append(o)
            lens.append(n)
            labs.append(y)
    if not seen:
        raise DataError(f"{where} holds no rows")
    labels = np.concatenate(labs).astype(np.int64) if label else None
    return _Index([str(f) for f in files], np.concatenate(fid), np.concatenate(offs),
                  np.concatenate(lens), paths, labels, names, root)


def _parquet_cache(pa, files: list[Path], where: str) -> Path:
    """The parquet files' image and label columns, copied once into an uncompressed arrow
    stream in the data cache (named by the files' content)."""
    import pyarrow.parquet as pq
    try:
        schema = pq.read_schema(files[0])
    except (OSError, pa.ArrowException) as e:
        raise DataError(f"cannot read parquet file {files[0]}: {images.reason(e)}") from None
    image, label, _ = _columns(pa, schema, where)
    cols = [image] + ([label] if label else [])
    h = hashlib.sha256(f"ddpmkit-hf-v{_CACHE_VERSION}\0{cols}".encode())
    for f in files:
        h.update(_content_key(f).encode())
    target = cache_dir() / "hf" / f"{h.hexdigest()[:40]}.arrow"
    if target.is_file():
        return target
    keep = pa.schema([schema.field(c) for c in cols], metadata=schema.metadata)
    tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with pa.OSFile(str(tmp), "wb") as sink, pa.ipc.new_stream(sink, keep) as out:
            for f in files:
                _copy_parquet(pa, f, keep, out)
        os.replace(tmp, target)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise DataError(f"cannot write the data cache {target}: {e.strerror or e} (set "
                        "DDPMKIT_DATA_CACHE to a folder with room)") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return target


def _copy_parquet(pa, path: Path, keep, out) -> None:
    """Append the ``keep`` columns of the parquet file ``path`` to the arrow stream ``out``."""
    import pyarrow.parquet as pq
    try:
        pf = pq.ParquetFile(path)
        missing = [c for c in keep.names if c not in pf.schema_arrow.names]
        if missing:
            raise DataError(f"parquet file {path} has no column {missing[0]!r} (columns: "
                            f"{', '.join(pf.schema_arrow.names)}); the files of one source "
                            "must share their columns")
        for batch in pf.iter_batches(batch_size=1024, columns=keep.names):
            out.write_batch(batch.cast(keep))
    except DataError:
        raise
    except (pa.ArrowException, ValueError) as e:
        raise DataError(f"cannot read parquet file {path}: {images.reason(e)}") from None


# ---- the reader ------------------------------------------------------------------------------

class HFReader(ImageReader):
    """Rows of a Hugging Face source, read by offset and decoded one at a time. ``rows``: the
    readable rows (the header pass left the others out); keys are ``SOURCE[row]``."""

    def __init__(self, name: str, index: _Index, rows: np.ndarray, split, size: int,
                 channels: int):
        super().__init__(split)
        self.name, self.index, self.rows, self.size = name, index, rows, size
        self.labels = None if index.labels is None else index.labels[rows]
        self.class_names = index.class_names
        self.shape = (channels, size, size)

    def key(self, j: int) -> str:
        return f"{self.name}[{int(self.rows[self.split(j)])}]"

    def read(self, j: int) -> np.ndarray:
        return images.decode(self.index.read(int(self.rows[self.split(j)])), self.size,
                             self.shape[0])


def _probe_rows(index: _Index) -> list:
    """Each row's (size, colour) from its header, or the reason it cannot be read."""
    def one(r: int):
        try:
            return images.probe(index.read(r))
        except Exception as e:  # any decoder failure on user data means "unreadable"
            return images.reason(e)

    n = len(index)
    workers = max(1, min(8, os.cpu_count() or 1, n // 64))
    if workers == 1:
        return [one(r) for r in range(n)]
    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(one, range(n), chunksize=256))


def load(cfg: DataConfig, split: str) -> Dataset:
    """Split ``split`` ("train", "test" or "all") of the Hugging Face source ``cfg.name``."""
    pa = _pyarrow(cfg.name)
    splits, shown, parquet = _splits(cfg.name)
    part, rule = _choose(splits, split)
    name, files = shown[part], splits[part]
    root = str(Path(cfg.name).expanduser()) if Path(cfg.name).expanduser().is_dir() else ""
    if parquet:
        root = root or str(files[0].parent)
        files = [_parquet_cache(pa, files, name)]
    index = _build_index(pa, files, name, root)
    probes = _probe_rows(index)
    skipped = []
    for r, pr in enumerate(probes):
        if isinstance(pr, str):
            if cfg.bad_files == "fail":
                raise DataError(f"cannot read image {name}[{r}]: {pr} (pass --bad-files skip "
                                "to leave unreadable rows out)")
            _warn(f"skipping unreadable image {name}[{r}]: {pr}")
            skipped.append(f"{name}[{r}]")
    good = [(f"{name}[{r}]", pr) for r, pr in enumerate(probes) if not isinstance(pr, str)]
    if not good:
        raise DataError(f"no readable image in {name}: all {len(probes)} rows failed to decode")
    size = cfg.image_size or _common_size(name, good)
    channels = cfg.channels or (3 if any(colour for _, (_, colour) in good) else 1)
    rows = np.asarray([r for r, pr in enumerate(probes) if not isinstance(pr, str)], np.int64)
    reader = HFReader(name, index, rows, _split_or_borrow(len(rows), rule, name), size, channels)
    return Dataset(cfg.name, None, 256, "image", skipped, reader=reader,
                   bad_files=cfg.bad_files)
