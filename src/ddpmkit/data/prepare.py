"""``ddpmkit prepare``: decode, resize/crop and quantise a source once, into a prepared folder.

A prepared folder (``--format npy``) holds ``images.npy`` (uint8 ``[N, S, S, C]``, every
example of the source in its order, unreadable files left out), ``labels.npy`` (int64
``[N]``, when the source has labels) and ``manifest.json``::

    {"format": "ddpmkit-prepared", "version": 1, "layout": "npy", "count": N,
     "shape": [C, S, S], "levels": 256, "class_names": [...], "source": "...",
     "skipped": [...], "files": {"images.npy": {"bytes": ..., "sha256": "..."}, ...}}

``--format shards`` writes ``shard-000000.tar``, ... instead (:mod:`.shard_writer`), with
``"layout": "shards"`` and a ``count`` per shard in ``files``.

``ddpmkit train --data DIR`` recognises the manifest, checks it against the files (count,
shape, sizes; the small labels file's SHA-256) and reads ``images.npy`` in place. The train /
test split is the usual one (every 20th example is a test example), over the prepared order.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..config import DataConfig
from ..errors import DataError
from ..outputs import atomic_write, check_output, refuse_link, write_text_atomic
from . import images
from .arrays import open_array_file
from .fingerprint import data_path
from .sources import ArrayReader, Dataset, ImageReader, _split_or_borrow, _warn, open_reader

FORMAT = "ddpmkit-prepared"
VERSION = 1
_HEADER_BYTES = 128  # fixed .npy header, so the count can be written once it is known


class _Decoded(torch.utils.data.Dataset):
    """Examples by index: (index, uint8 ``[H, W, C]`` or None, label, where, reason or None)."""

    def __init__(self, reader: ImageReader):
        self.reader = reader

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, j: int):
        r = self.reader
        try:
            img = r.read(j)
            return j, img, r.label(j), r.where(j), None
        except Exception as e:  # any decoder failure on user data means "unreadable"
            return j, None, -1, r.where(j), images.reason(e)


def prepare(src: str, out: str | Path, image_size: int = 0, channels: int = 0,
            fmt: str = "npy", workers: int = -1, progress: bool = True,
            bad_files: str = "skip", shard_size: int = 10_000) -> dict:
    """Prepare ``src`` (anything ``--data`` takes) into the folder ``out``; returns the manifest.

    Decoding runs in ``workers`` processes (-1: all CPUs), in order, so the output is the
    same whatever the worker count. ``fmt``: ``"npy"`` or ``"shards"`` (:mod:`.shard_writer`).
    """
    if fmt not in ("npy", "shards"):
        raise DataError(f"--format {fmt!r}: use 'npy' or 'shards'")
    out = Path(out)
    cfg = DataConfig(name=str(src), image_size=image_size, channels=channels,
                     bad_files=bad_files, workers=workers)  # checks the limits
    source = data_path(str(src))
    check_output(out, data=source if source is not None and source.is_dir() else None)
    refuse_link(out, "a prepared folder")
    reader, ds = open_reader(cfg)
    workers = (os.cpu_count() or 1) if workers < 0 else workers
    skipped = list(ds.skipped)
    if fmt == "shards":
        from .shard_writer import ShardWriter, split_keeping_shuffle
        writer = ShardWriter(out, shard_size, bool(ds.class_names) or reader.labels is not None)
        order, labels = split_keeping_shuffle(len(reader)), []
        for j, img, label in _readable(reader, order, workers, progress, bad_files, skipped):
            writer.add(f"{j:08d}", img, label)
            labels.append(label)
        writer.flush()
        if not writer.written:
            raise DataError(f"no readable image in {src}")
        n = sum(k for _, k in writer.written)
        files = {name: {"count": k, **_file_entry(out / name)} for name, k in writer.written}
        extra = {}
        if writer.labelled and min(labels) >= 0:  # classes for streams, which see no index
            y = np.asarray(labels)
            test = np.arange(len(y)) % shard_size % 20 == 19  # the per-shard split rule
            k = int(y.max()) + 1
            extra["label_counts"] = {"train": np.bincount(y[~test], minlength=k).tolist(),
                                     "test": np.bincount(y[test], minlength=k).tolist()}
        return _write_manifest(out, "shards", n, reader.shape, ds, src, skipped, files, extra)
    c, h, w = reader.shape
    labels = []

    def write_images(f) -> None:
        # Fixed-size header first, rewritten once the count of readable images is known.
        f.write(b"\0" * _HEADER_BYTES)
        for _, img, label in _readable(reader, None, workers, progress, bad_files, skipped):
            f.write(np.ascontiguousarray(img).tobytes())
            labels.append(label)
        if not labels:
            raise DataError(f"no readable image in {src}")
        f.seek(0)
        f.write(_npy_header((len(labels), h, w, c)))

    # Every file goes through a fresh temporary file and a rename (outputs.py): a link
    # already at out/images.npy is replaced, never written through.
    atomic_write(out / "images.npy", write_images)
    files = {"images.npy": _file_entry(out / "images.npy")}
    if ds.class_names or any(v >= 0 for v in labels):
        arr = np.asarray(labels, dtype=np.int64)
        atomic_write(out / "labels.npy", lambda f: np.save(f, arr))
        files["labels.npy"] = _file_entry(out / "labels.npy")
    return _write_manifest(out, "npy", len(labels), reader.shape, ds, src, skipped, files)


def _readable(reader: ImageReader, order, workers: int, progress: bool, bad_files: str,
              skipped: list[str]):
    """(index, uint8 image, label) of each readable example, in ``order`` (None: 0, 1, ...);
    unreadable ones are warned about and listed in ``skipped`` (or stop, under "fail")."""
    loader = DataLoader(_Decoded(reader), batch_size=64, num_workers=workers,
                        sampler=None if order is None else [int(j) for j in order],
                        collate_fn=lambda items: items)
    bar = _bar(len(reader), progress)
    for items in loader:
        for j, img, label, where, why in items:
            if img is None:
                if bad_files == "fail":
                    raise DataError(f"cannot read image {where}: {why} (pass --bad-files "
                                    "skip to leave unreadable files out)")
                _warn(f"skipping unreadable image {where}: {why}")
                skipped.append(where)
                continue
            yield j, img, label
        if bar is not None:
            bar.update(len(items))
    if bar is not None:
        bar.close()


def _write_manifest(out: Path, layout: str, n: int, shape, ds: Dataset, src, skipped,
                    files: dict, extra: dict | None = None) -> dict:
    c, h, w = shape
    manifest = {"format": FORMAT, "version": VERSION, "layout": layout, "count": n,
                "shape": [c, h, w], "levels": 256, "class_names": list(ds.class_names),
                "source": str(src), "skipped": skipped, "files": files, **(extra or {})}
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2))
    return manifest


def _bar(total: int, progress: bool):
    if not progress:
        return None
    from tqdm import tqdm
    return tqdm(total=total, unit="img", dynamic_ncols=True, desc="prepare")


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """A version 1.0 .npy header of exactly ``_HEADER_BYTES`` bytes for uint8 ``shape``."""
    text = f"{{'descr': '|u1', 'fortran_order': False, 'shape': {tuple(shape)}, }}"
    body = text.ljust(_HEADER_BYTES - 10 - 1) + "\n"
    return b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body.encode("latin1")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def _file_entry(path: Path) -> dict:
    return {"bytes": path.stat().st_size, "sha256": _sha256(path)}


# ---- reading a prepared folder --------------------------------------------------------------

def load_prepared(folder: Path, cfg: DataConfig, split: str) -> Dataset:
    """A prepared folder's split, after checking its manifest against its files."""
    manifest = read_manifest(folder)
    if manifest["layout"] == "shards":
        return _load_prepared_shards(folder, manifest, cfg, split)
    af = open_array_file(folder / "images.npy")
    c, h, w = manifest["shape"]
    if af.shape != (manifest["count"], h, w, c):
        raise DataError(f"{folder}: images.npy holds {af.shape} (N, H, W, C), the manifest "
                        f"says {manifest['count']} images of {c}x{h}x{w}; prepare it again")
    for name, entry in manifest["files"].items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != entry["bytes"]:
            raise DataError(f"{folder}: {name} is missing or not the {entry['bytes']} bytes "
                            "its manifest lists; prepare the folder again")
    if "labels.npy" in manifest["files"]:
        if _sha256(folder / "labels.npy") != manifest["files"]["labels.npy"]["sha256"]:
            raise DataError(f"{folder}: labels.npy does not match its manifest's SHA-256")
    reader = ArrayReader(af, _split_or_borrow(af.shape[0], split, folder), cfg.image_size,
                         cfg.channels)
    reader.class_names = tuple(manifest.get("class_names", ()))
    return Dataset(cfg.name, None, manifest["levels"], "image", [], reader=reader,
                   bad_files=cfg.bad_files)


def _check_sizes(folder: Path, manifest: dict) -> None:
    for name, entry in manifest["files"].items():
        p = folder / name
        if not p.is_file() or p.stat().st_size != entry["bytes"]:
            raise DataError(f"{folder}: {name} is missing or not the {entry['bytes']} bytes "
                            "its manifest lists; prepare the folder again")


def _load_prepared_shards(folder: Path, manifest: dict, cfg: DataConfig, split: str) -> Dataset:
    """Prepared shards: sizes checked against the manifest (the SHA-256s are for a full check
    by hand: hashing every shard at each start would read the whole data set), read map-style
    (:mod:`.shards`), the example count checked after indexing."""
    from .shards import load_shards
    _check_sizes(folder, manifest)
    urls = [str(folder / name) for name in sorted(manifest["files"])]
    ds = load_shards(cfg.name, urls, split, cfg.image_size, cfg.channels, cfg.bad_files,
                     manifest=manifest)
    total = len(ds.reader.split.rows) if split == "all" else None
    if total is not None and total != manifest["count"]:
        raise DataError(f"{folder}: the shards hold {total} examples, the manifest says "
                        f"{manifest['count']}; prepare the folder again")
    return ds


def read_manifest(folder: Path) -> dict:
    path = folder / "manifest.json"
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise DataError(f"cannot read {path}: {images.reason(e)}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise DataError(f"{path} is not a ddpmkit prepared-data manifest")
    if not isinstance(m.get("version"), int) or m["version"] > VERSION:
        raise DataError(f"{path} has version {m.get('version')!r}, newer than this ddpmkit "
                        f"reads ({VERSION}); upgrade ddpmkit")
    if m.get("layout") not in ("npy", "shards"):
        raise DataError(f"{path}: layout {m.get('layout')!r} is not one this ddpmkit reads")
    try:
        count, shape = int(m["count"]), [int(v) for v in m["shape"]]
        if m["layout"] == "npy":
            m["files"]["images.npy"]
        elif not m["files"] or any(not isinstance(e["bytes"], int) or "/" in k or
                                   k.startswith(".") for k, e in m["files"].items()):
            raise ValueError("bad shard list")
    except (KeyError, TypeError, ValueError):
        raise DataError(f"{path} lacks count, shape or files; prepare the folder again") \
            from None
    if len(shape) != 3 or count <= 0:
        raise DataError(f"{path}: count {count} and shape {shape} describe no images")
    m.setdefault("levels", 256)
    return m

