"""Batches for training: one endless shuffled stream, split by rank, read by workers, resumable.

The order of examples is a pure function of the seed and of how many examples the run has
consumed (``images_seen``): epoch ``e`` is a permutation seeded by ``(seed, e)``, and the
stream is the epochs one after another. A global batch is the next ``global_batch`` examples
of the stream; rank ``r`` reads only its rows of it (see :func:`rank_rows`). Hence:

* **resume** continues exactly: the checkpoint's ``images_seen`` is the stream position;
* **worker count** does not matter: DataLoader returns batches in sampler order, whichever
  worker read them;
* **a different number of ranks** on resume continues the same stream from the same
  position: the remaining examples of the current epoch come next, in the same order, just
  cut into global batches of the new size and sliced across the new ranks. Nothing is
  skipped or repeated.

Map-style sources (built-in sets, arrays, folders, prepared folders, local tar shards) follow
these rules; ``pipe:`` shards are streams with rules of their own (:mod:`.stream`), served
through the same :class:`Loader`. Images cross the worker boundary as uint8 and become
[-1, 1] floats here, per batch.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from ..errors import DataError
from . import images
from .images import mirror_rows, u8_to_float
from .sources import ArrayReader, Dataset, DataWarning, ImageReader, read_example


class DataOrder:
    """Indices of the endless shuffled stream: epoch permutations seeded by (seed, epoch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed = n, seed
        self._epoch, self._perm = -1, None

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=g)
        return self._perm

    def indices(self, start: int, count: int) -> torch.Tensor:
        """Indices of examples start .. start + count - 1 of the endless shuffled stream."""
        out = []
        while count > 0:
            epoch, offset = divmod(start, self.n)
            take = min(count, self.n - offset)
            out.append(self._permutation(epoch)[offset:offset + take])
            start, count = start + take, count - take
        return torch.cat(out)


def rank_rows(rank: int, world: int, batch_size: int, grad_accum: int) -> torch.Tensor:
    """Rows of the global batch that rank ``rank`` trains on, micro-batch by micro-batch.

    Micro-batch ``a`` of the global batch is ``world`` consecutive blocks of ``batch_size``
    rows, block ``r`` for rank ``r`` (the slicing of the trainer's noise and timesteps).
    """
    return torch.cat([torch.arange((a * world + rank) * batch_size,
                                   (a * world + rank + 1) * batch_size)
                      for a in range(grad_accum)])


def random_flip(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Mirror each image of ``x`` ``[N, C, H, W]`` left-right with probability 1/2 (new tensor)."""
    if x.ndim != 4:
        raise DataError(f"random_flip expects images [N, C, H, W], got shape {tuple(x.shape)}")
    coin = torch.rand(x.shape[0], generator=generator, device=generator.device) < 0.5
    return mirror_rows(x, coin)


@dataclass
class Batch:
    """This rank's examples of one global batch.

    ``data``: the examples as read: uint8 ``[B, C, H, W]`` (0..255) from file sources,
    float32 in [-1, 1] from in-memory sets (``[B, C, H, W]``, or ``[B, 2]`` points); ``x``:
    the same as float32 in [-1, 1]. ``y``: int64 ``[B]`` classes, -1 where the source has
    none; ``keys``: each example's name (when asked for); ``bad``: ``(where, reason)`` of each
    unreadable image met (and replaced) on the way.

    The trainer moves ``data`` to the device and only then flips and converts it
    (:meth:`to_float`): a quarter of the bytes to copy, and on a GPU the conversion runs there.
    """

    data: torch.Tensor
    y: torch.Tensor
    keys: list[str] | None
    bad: list[tuple[str, str]]

    @property
    def x(self) -> torch.Tensor:
        return self.to_float(self.data)

    @staticmethod
    def to_float(data: torch.Tensor, mirror: torch.Tensor | None = None) -> torch.Tensor:
        """``data`` (uint8 or float, any device) -> float32 in [-1, 1], the images where
        ``mirror`` (bool ``[B]``, optional) is True mirrored left-right (a new tensor)."""
        if data.dtype == torch.uint8:
            return u8_to_float(data, mirror)
        if mirror is not None:
            return mirror_rows(data, mirror)
        return data


def default_workers(data: Dataset) -> int:
    """Worker processes when ``--workers`` is -1: none for in-memory sets; otherwise up to 4,
    half the CPUs (the rest run the training step)."""
    if data.in_memory:
        return 0
    return min(4, max(1, (os.cpu_count() or 1) // 2))


class _RankSteps(Sampler):
    """Per step, the dataset indices of this rank's rows of the next global batch."""

    def __init__(self, order: DataOrder, start: int, global_batch: int, rows: torch.Tensor):
        self.order, self.start, self.global_batch, self.rows = order, start, global_batch, rows

    def __iter__(self):
        pos = self.start
        while True:
            yield self.order.indices(pos, self.global_batch)[self.rows].tolist()
            pos += self.global_batch


class _SlotPool:
    """Shared-memory batch buffers that DataLoader workers fill again and again.

    A worker that returns a fresh batch allocates it in new shared memory, and the kernel
    zero-fills and maps it page by page: for 256x256 RGB batches that cost a worker more time
    than decoding the JPEGs (~250 us per image, ``benchmarks/data.py``). Each worker instead
    keeps ``slots`` buffers and fills one that the main process has released; the main
    process copies the batch out (cheap: memory it reuses) and releases the slot at once, so
    a slot is never written while anything reads it. A worker with no free slot allocates a
    fresh batch as before, so it never waits.
    """

    def __init__(self, workers: int, slots: int):
        # free[w, k] == 1: worker w may fill its slot k. Only worker w clears it, only the
        # main process sets it, so no two processes ever write the same flag.
        self.free = torch.ones(workers, slots, dtype=torch.uint8).share_memory_()
        self._buffers: dict[int, torch.Tensor] = {}  # in a worker: its filled slots

    def take(self, shape: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, int]] | None:
        """In a worker: a free uint8 buffer of ``shape`` and its id; None anywhere else."""
        info = torch.utils.data.get_worker_info()
        if info is None:
            return None
        w = info.id
        for k in range(self.free.shape[1]):
            if self.free[w, k]:
                buf = self._buffers.get(k)
                if buf is None or tuple(buf.shape) != shape:
                    buf = self._buffers[k] = torch.empty(shape, dtype=torch.uint8).share_memory_()
                self.free[w, k] = 0
                return buf, (w, k)
        return None

    def release(self, slot: tuple[int, int]) -> None:
        """In the main process: the batch in ``slot`` has been copied out."""
        self.free[slot] = 1


class _Examples(torch.utils.data.Dataset):
    """The reader, batch by batch: (uint8 ``[B, C, H, W]``, labels, keys, unreadable met,
    the slot of :class:`_SlotPool` the batch lies in or None)."""

    def __init__(self, reader: ImageReader, bad_files: str, pool: _SlotPool | None = None):
        self.reader, self.bad_files, self.pool = reader, bad_files, pool

    def __len__(self) -> int:
        return len(self.reader)

    def __getitem__(self, j: int):
        return self.__getitems__([j])

    def __getitems__(self, js: list[int]):
        # Runs in a worker process: an exception here would reach the trainer as a
        # multi-line "Caught ... in DataLoader worker" traceback, so it travels as a one-line
        # message instead (Loader.next raises it as a DataError).
        try:
            return self._read(js)
        except DataError as e:
            return str(e), None, None, [], None
        except Exception as e:  # any reader failure on user data (a file changed under us)
            return (f"cannot read {self.reader.where(js[0])}: {images.reason(e)}", None, None,
                    [], None)

    def _read(self, js: list[int]):
        r = self.reader
        if isinstance(r, ArrayReader):  # arrays cannot hold an unreadable image
            u8 = r.read_many(js)
            labels = [r.label(j) for j in js]
            x, slot = self._stack(u8)
            return x, torch.tensor(labels, dtype=torch.int64), [r.key(j) for j in js], [], slot
        imgs, labels, keys, bad = [], [], [], []
        for j in js:
            img, label, key, met = read_example(r, j, self.bad_files)
            bad += met
            if img is None:  # bad_files="fail": the main process stops with a one-line error
                return None, None, None, bad, None
            imgs.append(img)
            labels.append(label)
            keys.append(key)
        x, slot = self._stack(imgs)
        return x, torch.tensor(labels, dtype=torch.int64), keys, bad, slot

    def _stack(self, imgs: list[np.ndarray] | np.ndarray):
        """The batch (:func:`batch_chw`), in a reused slot of the pool when there is one."""
        h, w, c = imgs[0].shape
        taken = None
        if self.pool is not None and h * w * c >= _STACK_IN_PLACE:
            taken = self.pool.take((len(imgs), c, h, w))
        if taken is None:
            return batch_chw(imgs), None
        out, slot = taken
        return batch_chw(imgs, out), slot


# Values per image from which batches are stacked image by image (and workers use slots).
_STACK_IN_PLACE = 1 << 14

# Workers run at a lower priority than the process they feed: where the cores are all taken,
# the trainer's step goes first and decoding fills the time it leaves (benchmarks/data.py).
WORKER_NICENESS = 5


def batch_chw(imgs: list[np.ndarray] | np.ndarray, out: torch.Tensor | None = None
              ) -> torch.Tensor:
    """B uint8 ``[H, W, C]`` images (a list, or one ``[B, H, W, C]`` array) -> one contiguous
    uint8 ``[B, C, H, W]`` batch (written into ``out`` when given).

    Large images are transposed one at a time straight into the batch, in shared memory when
    this runs in a DataLoader worker (the batch then travels as it is). numpy's transposing
    copy is ~2x faster than torch's here (69 against 149 us per 256x256 RGB image).
    """
    if out is None and imgs[0].size < _STACK_IN_PLACE:  # small: one numpy transposing copy
        stacked = imgs if isinstance(imgs, np.ndarray) else np.stack(imgs)
        return torch.from_numpy(np.ascontiguousarray(stacked.transpose(0, 3, 1, 2)))
    if out is None:
        h, w, c = imgs[0].shape
        out = torch.empty((len(imgs), c, h, w), dtype=torch.uint8)
        if torch.utils.data.get_worker_info() is not None:
            out.share_memory_()  # before it is written: moving it later would be a copy
    for row, img in zip(out.numpy(), imgs, strict=True):
        row[...] = img.transpose(2, 0, 1)
    return out


def _as_is(batch):
    return batch


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # decoding is per process; the trainer owns the other threads
    try:
        os.nice(WORKER_NICENESS)
    except (AttributeError, OSError):  # pragma: no cover - no nice here: the trainer's priority
        pass


class Loader:
    """This rank's batches, from stream position ``start`` on (see the module docstring).

    ``rows``: this rank's rows of each global batch (:func:`rank_rows`). In-memory sets are
    indexed directly (no worker processes: they would only add copies); file sources go
    through a DataLoader with ``workers`` processes (-1: :func:`default_workers`).
    """

    def __init__(self, data: Dataset, seed: int, start: int, global_batch: int,
                 rows: torch.Tensor, workers: int = -1, pin_memory: bool = False,
                 keys: bool = False, rank: int = 0, world: int = 1,
                 stream_state: dict | None = None):
        self.data, self.want_keys = data, keys
        self.order = DataOrder(len(data), seed)
        self.pos, self.global_batch, self.rows = start, global_batch, rows
        self.workers = default_workers(data) if workers < 0 else workers
        self._it, self._pool = None, None
        self._warned: set[str] = set()
        self.stream = None  # the position of a pipe: stream (data.stream.StreamState)
        if getattr(data.reader, "streaming", False):
            from .stream import stream_loader
            self._it, self.stream = stream_loader(
                data, seed, len(rows), rank, world, self.workers, pin_memory, stream_state)
        elif not data.in_memory:
            prefetch = 4
            # prefetch batches queued per worker, one being filled, one being pinned
            self._pool = _SlotPool(self.workers, prefetch + 2) if self.workers > 0 else None
            loader = DataLoader(
                _Examples(data.reader, data.bad_files, self._pool),
                batch_sampler=_RankSteps(self.order, start, global_batch, rows),
                num_workers=self.workers, collate_fn=_as_is, pin_memory=pin_memory,
                persistent_workers=self.workers > 0,
                prefetch_factor=prefetch if self.workers > 0 else None,
                worker_init_fn=_worker_init if self.workers > 0 else None,
                # its own generator: by default DataLoader draws a worker seed from the
                # global RNG, which would shift the trainer's (saved) dropout stream
                generator=torch.Generator().manual_seed(seed))
            self._it = iter(loader)

    def next(self) -> Batch:
        """The next global batch's rows for this rank (and advance the stream)."""
        if self._it is None:
            batch = self._from_memory()
        else:
            try:
                u8, y, keys, bad, where = next(self._it)
            except RuntimeError as e:  # a worker died (killed, out of memory)
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise DataError(f"a data loader worker failed: {first[:200]}") from None
            if isinstance(u8, str):
                raise DataError(u8)
            self._report(bad, failed=u8 is None)
            if self.stream is not None:  # where: the stream's cursor
                if where is not None:
                    self.stream.advance(*where)
            elif where is not None:  # where: the pool slot the batch lies in
                if not u8.is_pinned():  # (pinning has already copied it)
                    u8 = u8.clone()
                self._pool.release(where)
            batch = Batch(u8, y, keys if self.want_keys else None, bad)
        self.pos += self.global_batch
        return batch

    def _from_memory(self) -> Batch:
        idx = self.order.indices(self.pos, self.global_batch)[self.rows]
        data = self.data
        y = data.labels[idx] if data.labels is not None else torch.full((len(idx),), -1)
        keys = [str(i) for i in idx.tolist()] if self.want_keys else None
        return Batch(data.x[idx], y, keys, [])

    def _report(self, bad: list[tuple[str, str]], failed: bool) -> None:
        if failed:
            where, why = bad[-1]
            raise DataError(f"cannot read image {where}: {why} (pass --bad-files skip to "
                            "leave unreadable files out)")
        for where, why in bad:
            if where not in self._warned:  # once per file and process; counted every time
                self._warned.add(where)
                warnings.warn(f"skipping unreadable image {where}: {why}", DataWarning,
                              stacklevel=3)

    def close(self) -> None:
        """Stop the worker processes (the loader cannot be used after this)."""
        # Dropping the DataLoader's iterator stops its workers (its finaliser joins them).
        self._it, self.data = None, None
