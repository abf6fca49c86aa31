"""``pipe:`` shards: tar streams from a command's output, split across ranks and workers.

A stream cannot be read out of order, so these shards are not indexed (local shards are:
:mod:`.shards`); each process reads whole shards of its own, front to back.

**The splitting rule.** There are ``S = ranks x workers`` *slots* (worker ``w`` of rank ``r``
is slot ``r * W + w``; no workers count as one). The shards of all epochs form one sequence:
epoch ``e`` lists the ``n`` shards in a permutation seeded by ``(seed, e)``, and shard number
``g = e * n + i`` of the sequence goes to slot ``g mod S``. Within an epoch every shard is
read by exactly one slot, so across all processes each example is read once per epoch,
whether or not ``S`` divides ``n``; with fewer shards than slots a slot's next shard simply
comes from a later epoch. A slot's examples are its shards' examples in tar order (prepared
shards are written in a shuffle: :mod:`.shard_writer`); a rank's batches take the next
``B`` examples of its workers' slots in turn (DataLoader's round robin).

**Equal steps.** The sequence never ends, so every rank has a batch at every step: ranks
never wait for one another at an epoch's end (DDP would hang), they only drift across epoch
boundaries by up to a shard. Epochs are thus a property of the shard sequence, not of steps.

**Resume.** Each slot's position is ``(g, k)``: shard ``g`` of the sequence, ``k`` of its
examples taken. Checkpoints keep every slot's position, the slot count and the batches taken
per rank. Resumed with the same number of ranks and workers, each slot continues exactly
(a worker reads its shard again up to ``k`` and goes on), and the first batch comes from the
slot whose turn it was: the examples continue exactly. With another number of ranks or
workers the slots cannot continue (the rule assigns shards differently), so the sequence
restarts at the earliest shard any slot was reading, ``g0 = min g``, dealt out to the new
slots: nothing is skipped, and the shards between ``g0`` and the furthest any slot had got
(at most about ``S`` shards) are read again.

Labels arrive with each batch (``.cls``). The data set's size and classes come from a
``manifest.json`` beside a shard list (``prepare --format shards`` writes it; copy it with
the list); without one the size is estimated from the first shard, and a class-conditional
run cannot tell its class count (a one-line error says so). Only the first shard is probed
before training (sizes, colour: an empty or mixed-size first shard is an error before any
network is built); an image of another size met later is a bad example (skipped and
counted, or the error under ``bad_files="fail"``).
"""

from __future__ import annotations

import io
import os
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from ..errors import DataError
from . import images
from .loader import batch_chw
from .shards import (
    IMAGE_MEMBERS,
    CheckedInfo,
    decode_member,
    is_test,
    npy_member,
    parse_cls,
    split_key,
)
from .sources import ImageReader


def shard_name(url: str) -> str:
    """A short name for messages and keys: the ``.tar`` word of a command, or the file name."""
    words = [w for w in url.split() if ".tar" in w]
    return os.path.basename(words[-1] if words else url.split()[-1])


def _open(url: str):
    """(binary stream, process or None, stderr file or None)."""
    if not url.lower().startswith("pipe:"):
        return open(url, "rb"), None, None
    err = tempfile.TemporaryFile()
    proc = subprocess.Popen(url[5:], shell=True, stdout=subprocess.PIPE, stderr=err,
                            stdin=subprocess.DEVNULL)
    return proc.stdout, proc, err


def _finish(proc, err, complete: bool) -> str | None:
    """Close a pipe: the command's failure as a phrase, or None. A shard left part-way (a
    problem, or the loader closing) stops its command rather than wait for it."""
    if proc is None:
        return None
    proc.stdout.close()
    try:  # a command that failed has exited: its status says why better than the tar
        rc = proc.wait(timeout=None if complete else 2)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        err.close()
        return None
    err.seek(0)
    tail = err.read()[-300:].decode("utf-8", "replace").strip().splitlines()
    err.close()
    if rc in (0, -13):  # -13: SIGPIPE, when we stopped reading early
        return None
    return f"command exited with status {rc}" + (f": {tail[-1]}" if tail else "")


@dataclass
class Example:
    key: str
    ext: str = ""
    data: bytes = b""
    label: int = -1
    problem: str | None = None
    members: dict = field(default_factory=dict)


def shard_examples(url: str, split: str):
    """A shard's examples of ``split`` in tar order, as :class:`Example`; a problem (the
    shard cannot be opened, a garbled or cut-off member, a failing command) is an Example
    with ``problem`` set, and ends the shard."""
    where = url
    try:
        f, proc, err = _open(url)
    except OSError as e:
        yield Example(url, problem=f"cannot open shard: {images.reason(e)}")
        return
    k, group, last, complete = 0, {}, None, False
    try:
        with tarfile.open(fileobj=f, mode="r|", tarinfo=CheckedInfo) as tf:
            for m in tf:
                if not m.isfile():
                    continue
                key, ext = split_key(m.name)
                where = f"{url}:{key}"
                if key != last and group:
                    ex, k = _example(last, group, k, split)
                    if ex is not None:
                        yield ex
                    group = {}
                last = key
                data = tf.extractfile(m).read()
                if len(data) != m.size:
                    raise tarfile.ReadError(f"member {m.name} is cut off (truncated)")
                group[ext] = data
        complete = True
        if group:
            ex, k = _example(last, group, k, split)
            if ex is not None:
                yield ex
    except (tarfile.TarError, OSError, EOFError, ValueError) as e:
        problem = Example(where, problem=f"unreadable tar data: {images.reason(e)}")
    else:
        problem = None
    finally:
        failed = _finish(proc, err, complete)
    if failed or problem:
        yield Example(url, problem=failed) if failed else problem


def _example(key: str, group: dict, k: int, split: str) -> tuple[Example | None, int]:
    image = next((e for e in IMAGE_MEMBERS if e in group), None)
    if image is None:
        return None, k
    keep = split == "all" or (split == "test") == is_test(k)
    if not keep:
        return None, k + 1
    ex = Example(key, image, group[image])
    if "cls" in group:
        try:
            ex.label = parse_cls(group["cls"])
        except ValueError as e:
            ex.problem = images.reason(e)
    return ex, k + 1


def _epoch_shards(seed: int, n: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def slot_shards(seed: int, n: int, slots: int, start: int):
    """A slot's sequence numbers ``g`` (``start``, ``start + slots``, ...) and shard indices."""
    g = start
    while True:
        e, i = divmod(g, n)
        yield g, _epoch_shards(seed, n, e)[i]
        g += slots


@dataclass
class StreamState:
    """Where every slot is: ``cursors[s] = (g, k)``; ``batches``: batches each rank took."""

    slots: int
    origin: int
    batches: int
    cursors: list[tuple[int, int]]

    @staticmethod
    def fresh(slots: int, origin: int = 0) -> StreamState:
        return StreamState(slots, origin, 0, [(origin + s, 0) for s in range(slots)])

    def resumed(self, slots: int) -> StreamState:
        """This state for ``slots`` slots: itself, or a restart at the earliest shard."""
        if slots == self.slots:
            return self
        return StreamState.fresh(slots, min(g for g, _ in self.cursors))


class StreamSource(ImageReader):
    """``pipe:`` (or mixed) shards: no index, read in :class:`StreamBatches` only."""

    streaming = True

    def __init__(self, urls: list[str], split: str, size: int, channels: int, count: int,
                 class_names: tuple[str, ...] = ()):
        self.urls, self.split_name, self.size, self.n = urls, split, size, count
        self.shape, self.class_names, self.labels = (channels, size, size), class_names, None

    def __len__(self) -> int:
        return self.n

    def read(self, j: int) -> np.ndarray:
        raise DataError("pipe: shards are a stream: they are read in order while training; "
                        "for eval, fid or show, use local shards")


class StreamBatches(IterableDataset):
    """One rank's batches of ``batch`` examples from its slots (module docstring); each item:
    (uint8 ``[B, C, H, W]``, labels, keys, unreadable met, (slot, g, k) after the batch)."""

    def __init__(self, src: StreamSource, seed: int, rank: int, world: int, batch: int,
                 state: StreamState, bad_files: str):
        self.src, self.seed, self.rank, self.world, self.batch = src, seed, rank, world, batch
        self.state, self.bad_files = state, bad_files

    def __iter__(self):
        info = get_worker_info()
        workers, w = (info.num_workers, info.id) if info else (1, 0)
        slot = self.rank * workers + (self.state.batches + w) % workers
        g0, skip = self.state.cursors[slot]
        shards = slot_shards(self.seed, len(self.src.urls), self.state.slots, g0)
        pending: list = []
        bad: list[tuple[str, str]] = []
        empty_run = 0
        for g, i in shards:
            url, taken = self.src.urls[i], 0
            for ex in shard_examples(url, self.src.split_name):
                if taken < skip:  # resuming inside this shard
                    taken += 1
                    continue
                taken += 1
                img = self._decode(url, ex, bad)
                if img is None:
                    if self.bad_files == "fail" and bad:
                        yield None, None, None, bad, (slot, g, taken)
                        return
                    continue
                pending.append((img, ex.label, f"{shard_name(url)}:{ex.key}"))
                if len(pending) == self.batch:
                    yield (*_stack(pending), bad, (slot, g, taken))
                    pending, bad = [], []
                    empty_run = 0
            skip = 0
            empty_run = empty_run + 1 if taken == 0 else 0
            if empty_run > len(self.src.urls) + self.state.slots:
                yield (f"no readable example in the last {empty_run} shards read (e.g. "
                       f"{url}); check the data"), None, None, bad, None
                return

    def _decode(self, url: str, ex: Example, bad: list) -> np.ndarray | None:
        where = ex.key if ex.key.startswith(url) else f"{url}:{ex.key}"
        if ex.problem is None:
            try:
                img = decode_member(ex.data, ex.ext, self.src.size, self.src.shape[0])
                if img.shape != (self.src.size, self.src.size, self.src.shape[0]):
                    raise ValueError(f"decoded to shape {img.shape}, expected "
                                     f"{self.src.shape[1:]} with {self.src.shape[0]} channels")
                return img
            except Exception as e:  # any decoder failure on user data means "unreadable"
                ex.problem = images.reason(e)
        bad.append((where, ex.problem))
        return None


def _stack(items: list) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    return (batch_chw([img for img, _, _ in items]),
            torch.tensor([y for _, y, _ in items], dtype=torch.int64), [k for _, _, k in items])


# ---- opening a stream as a Dataset -----------------------------------------------------------

def load_stream(cfg, split: str, urls: list[str], manifest: dict | None = None):
    """A Dataset over ``pipe:`` shards: shape and size from ``manifest`` or the first shard."""
    from .sources import Dataset
    if manifest is not None:
        c, size, _ = manifest["shape"]
        counts = [int(e.get("count", 0)) for e in manifest["files"].values()]
        count = sum(_split_count(n, split) for n in counts)
        labels = _label_multiset(manifest, split)
        names = tuple(manifest.get("class_names", ()))
    else:
        c, size, count = _probe_first(urls[0], split, cfg.image_size, cfg.channels)
        count, labels, names = count * len(urls), None, ()
    src = StreamSource(urls, split, cfg.image_size or size, cfg.channels or c, count, names)
    return Dataset(cfg.name, None, 256, "image", [], reader=src, labels=labels,
                   bad_files=cfg.bad_files)


def _split_count(n: int, split: str) -> int:
    tests = (n + 1) // 20
    return {"all": n, "test": tests}.get(split, n - tests)


def _label_multiset(manifest: dict, split: str) -> torch.Tensor | None:
    """The split's classes as a multiset (``label_counts``: examples per class and split): a
    stream has no fixed order, so these give the class count, not each example's label."""
    counts = manifest.get("label_counts")
    if not isinstance(counts, dict):
        return None
    per = [counts.get(s) or [] for s in (("train", "test") if split == "all" else (split,))]
    k = max(len(c) for c in per)
    total = torch.zeros(k, dtype=torch.int64)
    for c in per:
        total[:len(c)] += torch.tensor(c, dtype=torch.int64)
    return torch.repeat_interleave(torch.arange(k), total)


def _probe_first(url: str, split: str, image_size: int, channels: int) -> tuple[int, int, int]:
    """(channels, size, examples of ``split``) of the first shard, read whole; its images
    must agree in size unless ``image_size`` is given."""
    sizes, colour, count = set(), False, 0
    for ex in shard_examples(url, "all"):
        if ex.problem is not None and not ex.ext:  # the shard itself: nothing to go on
            raise DataError(f"cannot read the first shard {ex.key}: {ex.problem}")
        try:
            if ex.ext == "npy":
                a = npy_member(ex.data)
                (w, h), c = (a.shape[1], a.shape[0]), a.ndim == 3 and a.shape[2] == 3
            else:
                (w, h), c = images.probe(io.BytesIO(ex.data))
        except Exception:  # an unreadable image: met (and counted) again while training
            continue
        sizes.add((w, h))
        colour |= c
        count += 1
    if not count:
        raise DataError(f"the first shard {url} holds no example")
    if not image_size and (len(sizes) > 1 or any(w != h for w, h in sizes)):
        raise DataError(f"images of {url} differ in size or are not square "
                        f"({sorted(sizes)[:2]}); pass --image-size N")
    size = image_size or next(iter(sizes))[0]
    return channels or (3 if colour else 1), size, _split_count(count, split)


class _Position:
    """The main process's view of a rank's stream: every slot's cursor, batches taken."""

    def __init__(self, state: StreamState):
        self.state = state

    def advance(self, slot: int, g: int, k: int) -> None:
        self.state.cursors[slot] = (g, k)
        self.state.batches += 1

    def to_dict(self) -> dict:
        s = self.state
        return {"slots": s.slots, "origin": s.origin, "batches": s.batches,
                "cursors": [list(c) for c in s.cursors]}


def state_from_dict(d: dict) -> StreamState:
    """A checkpoint's stream state (checked: a one-line error when it is malformed)."""
    try:
        st = StreamState(int(d["slots"]), int(d["origin"]), int(d["batches"]),
                         [(int(g), int(k)) for g, k in d["cursors"]])
    except (KeyError, TypeError, ValueError):
        raise DataError("the checkpoint's stream position is malformed") from None
    if st.slots < 1 or len(st.cursors) != st.slots or min(st.batches, st.origin) < 0 \
            or any(g < 0 or k < 0 for g, k in st.cursors):
        raise DataError("the checkpoint's stream position is malformed")
    return st


def merge_ranks(per_rank: list[dict]) -> dict:
    """Each rank knows its own slots' cursors; the checkpoint keeps all of them."""
    merged = dict(per_rank[0])
    cursors = [list(c) for c in merged["cursors"]]
    workers = merged["slots"] // max(1, len(per_rank))
    for r, d in enumerate(per_rank):
        cursors[r * workers:(r + 1) * workers] = d["cursors"][r * workers:(r + 1) * workers]
    merged["cursors"] = cursors
    return merged


def _as_is(batch):
    return batch


def stream_loader(data, seed: int, batch: int, rank: int, world: int, workers: int,
                  pin_memory: bool, saved: dict | None):
    """(iterator of batches, :class:`_Position`) for this rank of a stream Dataset."""
    from torch.utils.data import DataLoader
    slots = world * max(1, workers)
    state = state_from_dict(saved).resumed(slots) if saved else StreamState.fresh(slots)
    ds = StreamBatches(data.reader, seed, rank, world, batch, state, data.bad_files)
    loader = DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=_as_is,
                        pin_memory=pin_memory, persistent_workers=workers > 0,
                        prefetch_factor=2 if workers > 0 else None)
    return iter(loader), _Position(state)
