"""Where a data name points, and a cheap content fingerprint of what is there.

The fingerprint is saved in a run's config (``DataConfig.fingerprint``) and checked at every
resume and ``eval``, so that a run never silently continues on other data.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from ..errors import DataError
from .images import list_images
from .sources import BUILTIN_SETS

_FINGERPRINT_ITEMS = 32     # files of a folder, or chunks of an array file, that are hashed
_FINGERPRINT_CHUNK = 1 << 16


def data_path(name: str) -> Path | None:
    """The absolute path a data name points to, or None for a built-in set.

    Saved in ``config.json`` this way, so that ``eval`` run from another folder reads the same
    data, not whatever a relative path means there.
    """
    if name in BUILTIN_SETS or not name.strip() or name.strip().lower().startswith("pipe:"):
        return None  # a pipe: command is kept as given (it is not a path)
    return Path(os.path.abspath(Path(name).expanduser()))


def fingerprint(name: str) -> str:
    """A short content fingerprint of a data folder or array file ("" for built-in sets).

    ``"files=N sha256=H"`` for a folder: N image files, H over the relative name, size and
    bytes of up to 32 of them, evenly spaced in sorted order. ``"bytes=N sha256=H"`` for an
    array file: its size, and H over up to 32 evenly spaced 64 KiB chunks. Reads at most a
    few MiB, so it is cheap enough to check at every resume and ``eval``. A Hugging Face
    source (:mod:`.hf`; a parquet glob too) is ``"files=N sha256=H"`` over its data files'
    names and sizes and the first 64 KiB of up to 32 of them.
    """
    from . import hf  # looks at names only

    path = data_path(name)
    if path is None:
        return ""
    if not (path.exists() or hf.claims(name)):
        return _shards_fingerprint(str(path))
    h = hashlib.sha256()
    try:
        if hf.claims(name) or (path.is_dir() and not list_images(path) and hf.parquet_in(path)):
            root = path if path.is_dir() else path.parent
            return _fingerprint_files(root, hf.source_files(name), h)
        if path.is_dir():
            files = list_images(path)
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


def _fingerprint_files(path: Path, files: list[Path], h) -> str:
    """A Hugging Face source's data files: each one's name and size, plus the first 64 KiB
    of up to 32 of them (evenly spaced)."""
    for f in files:
        h.update(f"{os.path.relpath(f, path)}\0{f.stat().st_size}\0".encode())
    for i in _evenly_spaced(len(files)):
        with open(files[i], "rb") as fh:
            h.update(fh.read(_FINGERPRINT_CHUNK))
    return f"files={len(files)} sha256={h.hexdigest()[:16]}"


def _evenly_spaced(n: int) -> list[int]:
    """Up to ``_FINGERPRINT_ITEMS`` indices spread over ``range(n)``, first and last included."""
    k = min(n, _FINGERPRINT_ITEMS)
    if k <= 1:
        return list(range(k))
    return sorted({round(j * (n - 1) / (k - 1)) for j in range(k)})


def _shards_fingerprint(spec: str) -> str:
    """``"shards=N sha256=H"`` for a brace pattern or glob of local shards: H over each
    shard's path and size, and the first 64 KiB of up to 32 evenly spaced shards ("" for
    anything else)."""
    from .shards import looks_like_shards, shard_urls
    if not looks_like_shards(spec):
        return ""
    try:
        urls = shard_urls(spec)
        h = hashlib.sha256()
        for u in urls:
            h.update(f"{u}\0{os.stat(u).st_size}\0".encode())
        for i in _evenly_spaced(len(urls)):
            with open(urls[i], "rb") as f:
                h.update(f.read(_FINGERPRINT_CHUNK))
    except (OSError, DataError):
        return ""  # missing shards are reported (and skipped or refused) by the loader
    return f"shards={len(urls)} sha256={h.hexdigest()[:16]}"
