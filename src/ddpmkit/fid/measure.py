"""Images -> Inception features -> scores, streamed: batch -> uint8 -> features.

Only features are kept (2048 + 1008 float32 numbers an image, ~600 MB for 50,000), never
the images: a sampled batch is turned into uint8 (as a saved PNG would hold it), passed
through the network and dropped.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .. import dist
from .inception import InceptionV3
from .scores import (
    feature_stats,
    features_fid,
    inception_score,
    kernel_inception_distance,
    precision_recall,
)
from .sources import ImageSource, Statistics

__all__ = ["Features", "extract_features", "sample_features", "scores", "source_features"]


@dataclass
class Features:
    """``pool`` ``[N, 2048]`` and IS ``logits`` ``[N, 1008]``, float32 on the CPU."""

    pool: torch.Tensor
    logits: torch.Tensor

    def __len__(self) -> int:
        return int(self.pool.shape[0])


def _net_device(net: InceptionV3) -> torch.device:
    return net.fc.weight.device


@contextlib.contextmanager
def _full_float32() -> Iterator[None]:
    """TF32 off while features are computed: cuDNN convolutions default to it on Ampere and
    newer GPUs (a 10-bit mantissa), and the reference features are float32."""
    conv, mm = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = conv, mm


@torch.no_grad()
def extract_features(net: InceptionV3, batches: Iterable[np.ndarray | torch.Tensor],
                     progress: Callable[[int], None] | None = None) -> Features:
    """Features of uint8 ``[n, H, W, 3]`` batches (numpy or torch), in order."""
    pools, logits = [torch.zeros(0, 2048)], [torch.zeros(0, 1008)]
    for b in batches:
        if isinstance(b, np.ndarray):  # slices of a read-only memory map or zip stream
            b = torch.from_numpy(np.require(b, requirements=["C", "W"]))
        x = b.to(_net_device(net)).permute(0, 3, 1, 2)
        with _full_float32():
            p, z = net(x)
        pools.append(p.cpu())
        logits.append(z.cpu())
        if progress is not None:
            progress(x.shape[0])
    return Features(torch.cat(pools), torch.cat(logits))


def _bar(total: int, desc: str, enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm
    return tqdm(total=total, desc=desc, unit="img", dynamic_ncols=True)


def source_features(net: InceptionV3, source: ImageSource, batch_size: int,
                    limit: int | None = None, progress: bool = True) -> Features:
    """Features of the first ``limit`` (default: all) images of ``source``."""
    total = source.count if limit is None else min(limit, source.count)

    def head():
        left = total
        for b in source.batches(batch_size):
            if left <= 0:
                return
            yield b[:left]
            left -= len(b)
    bar = _bar(total, f"features {source.name}", progress)
    try:
        return extract_features(net, head(), bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()


def _to_uint8_rgb(x: torch.Tensor) -> torch.Tensor:
    """Samples in [-1, 1] ``[n, C, H, W]`` -> uint8 ``[n, H, W, 3]`` on the same device, with
    the rounding of ``ddpmkit.data.to_uint8`` (what a saved .npz or PNG would hold)."""
    y = torch.nan_to_num(x.float(), nan=0.0, posinf=1.0, neginf=-1.0)
    y = ((y + 1.0) * 127.5).round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
    return y.expand(-1, -1, -1, 3) if y.shape[-1] == 1 else y


def sample_features(model, diffusion, data_shape: Sequence[int], net: InceptionV3, num: int,
                    *, batch_size: int, sampler: str, steps: int | None, seed: int,
                    spacing: str = "trailing", eta: float = 0.0, clip_denoised: bool = True,
                    device: torch.device | None = None,
                    progress: bool = True) -> Features | None:
    """Features of ``num`` samples of ``model``; sample ``i`` draws its noise from seed
    ``seed + i``, as ``ddpmkit sample`` does.

    Under torchrun, batch ``k`` goes to rank ``k mod world``, features (not images) are
    gathered to rank 0 and put back in sample order; rank 0 gets the features, the other
    ranks ``None``. The figures do not depend on the number of processes.
    """
    from ..sampling import sample

    if len(data_shape) != 3:
        raise ValueError(f"FID needs an image model, got data shape {tuple(data_shape)}")
    rank, world = dist.rank(), dist.world_size()
    starts = list(range(0, num, batch_size))
    owned = [starts[r::world] for r in range(world)]

    def size(start: int) -> int:
        return min(batch_size, num - start)

    def batches():
        for start in owned[rank]:
            n = size(start)
            x = sample(model, diffusion, (n, *data_shape), method=sampler, steps=steps,
                       spacing=spacing, eta=eta, clip_denoised=clip_denoised,
                       seeds=range(seed + start, seed + start + n), device=device)
            yield _to_uint8_rgb(x)

    mine = sum(map(size, owned[rank]))
    bar = _bar(mine, "FID samples" + (f" (rank 0 of {world})" if world > 1 else ""),
               progress and rank == 0)
    try:
        feats = extract_features(net, batches(), bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    both = torch.cat([feats.pool, feats.logits], 1)
    both = dist.gather_rows(both, [sum(map(size, o)) for o in owned])
    if both is None:
        return None
    gathered = [s for o in owned for s in o]   # rank-major: back to sample order
    pieces = dict(zip(gathered, torch.split(both, [size(s) for s in gathered]), strict=True))
    both = torch.cat([pieces[s] for s in starts])
    return Features(both[:, :2048].contiguous(), both[:, 2048:].contiguous())


def scores(samples: Features, ref: Features | Statistics, *, kid_subset_size: int = 1000,
           k: int = 3, device: torch.device | str | None = None) -> dict:
    """FID, KID (mean, standard error), IS (mean, std over 10 splits), precision and recall.

    Against a :class:`Statistics` reference, only FID and IS can be computed; KID,
    precision and recall are ``None``.
    """
    if isinstance(ref, Statistics):
        ref_mu, ref_sigma, n_ref = ref.mu, ref.sigma, None
    else:
        (ref_mu, ref_sigma), n_ref = feature_stats(ref.pool), len(ref)
    is_mean, is_std = inception_score(samples.logits, splits=min(10, len(samples)))
    out = {"fid": features_fid(samples.pool, ref_mu, ref_sigma),
           "kid": None, "kid_se": None, "is": is_mean, "is_std": is_std,
           "precision": None, "recall": None, "num_samples": len(samples), "num_ref": n_ref}
    if not isinstance(ref, Statistics):
        out["kid"], out["kid_se"] = kernel_inception_distance(samples.pool, ref.pool,
                                                              subset_size=kid_subset_size)
        out["precision"], out["recall"] = precision_recall(ref.pool, samples.pool, k=k,
                                                           device=device)
    return out
