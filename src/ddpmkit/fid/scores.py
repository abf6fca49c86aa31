"""FID, KID, Inception Score and precision/recall on feature sets: pure functions.

* :func:`frechet_distance` -- FID from Gaussian fits (Heusel et al. 2017), float64.
* :func:`kernel_inception_distance` -- KID (Binkowski et al. 2018): unbiased MMD^2 with the
  cubic polynomial kernel ``(x.y / d + 1)^3``, averaged over disjoint subsets, with the
  standard error of that mean.
* :func:`inception_score` -- IS (Salimans et al. 2016) over 10 splits, mean and std.
* :func:`precision_recall` -- improved precision and recall (Kynkaanniemi et al. 2019) from
  k-nearest-neighbour balls, k = 3.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..errors import DataError

__all__ = [
    "feature_stats",
    "features_fid",
    "frechet_distance",
    "inception_score",
    "kernel_inception_distance",
    "knn_radii",
    "precision_recall",
]


def _as_matrix(a, name: str, min_rows: int = 2) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(a) if not isinstance(a, torch.Tensor) else a)
    if t.ndim != 2:
        raise DataError(f"{name} must be a 2-D array [N, D], got shape {tuple(t.shape)}")
    if t.shape[0] < min_rows:
        raise DataError(f"{name} needs at least {min_rows} rows, got {t.shape[0]}")
    if not torch.isfinite(t).all():
        raise DataError(f"{name} holds NaN or infinite values")
    return t


def feature_stats(feats) -> tuple[np.ndarray, np.ndarray]:
    """(mu ``[D]``, sigma ``[D, D]``) of features ``[N, D]`` in float64; sigma with N - 1, as
    pytorch-fid and the TF code compute it."""
    f = _as_matrix(feats, "features").to(torch.float64)
    mu = f.mean(0)
    c = f - mu
    return mu.numpy(), (c.T @ c / (f.shape[0] - 1)).numpy()


def _check_stats(mu: np.ndarray, sigma: np.ndarray, name: str) -> None:
    if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise DataError(f"{name}: mu {mu.shape} and sigma {sigma.shape} do not fit "
                        "(expected [D] and [D, D])")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise DataError(f"{name}: statistics hold NaN or infinite values")


def frechet_distance(mu1, sigma1, mu2, sigma2, factor1=None) -> float:
    """``|mu1 - mu2|^2 + Tr(S1 + S2 - 2 (S1 S2)^{1/2})`` in float64.

    ``Tr (S1 S2)^{1/2}`` is computed as ``Tr (R S2 R)^{1/2}`` with ``R = S1^{1/2}``: the two
    matrices are similar and the second is symmetric PSD, so an eigendecomposition gives its
    root with no complex round-off (scipy's ``sqrtm`` of ``S1 S2`` returns tiny imaginary
    parts that the reference code has to drop). Negative eigenvalues of round-off size are
    clipped to 0, which also handles singular covariances (N <= D).

    ``factor1`` (optional, ``[n, D]`` with ``S1 = factor1.T @ factor1``: the centred features
    over ``sqrt(n - 1)``): with ``n < D`` the root's trace is taken from the ``n x n`` matrix
    ``factor1 S2 factor1.T``, which has the non-zero eigenvalues of ``S1 S2``; the same
    figure, without two ``D x D`` eigendecompositions.
    """
    mu1, mu2 = (np.asarray(m, dtype=np.float64) for m in (mu1, mu2))
    s1, s2 = (np.asarray(s, dtype=np.float64) for s in (sigma1, sigma2))
    _check_stats(mu1, s1, "first statistics")
    _check_stats(mu2, s2, "second statistics")
    if mu1.shape != mu2.shape:
        raise DataError(f"statistics differ in width: {mu1.shape[0]} vs {mu2.shape[0]}")
    if factor1 is not None and factor1.shape[0] < factor1.shape[1]:
        m = factor1 @ s2 @ factor1.T
    else:
        w, v = np.linalg.eigh(0.5 * (s1 + s1.T))
        root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
        m = root @ s2 @ root
    tr_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (m + m.T)), 0.0, None)).sum()
    fd = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt
    return float(max(fd, 0.0))   # a tiny negative is round-off


def features_fid(feats, mu2, sigma2) -> float:
    """FID of features ``[N, D]`` against statistics (``mu2``, ``sigma2``)."""
    f = _as_matrix(feats, "features").to(torch.float64)
    factor = ((f - f.mean(0)) / math.sqrt(f.shape[0] - 1)).numpy()
    mu1, sigma1 = feature_stats(f)
    return frechet_distance(mu1, sigma1, mu2, sigma2, factor1=factor)


def _mmd2_unbiased(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with ``k(u, v) = (u.v / d + 1)^3`` between ``x`` [m, d], ``y`` [m, d]."""
    d, m = x.shape[1], x.shape[0]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    within = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    return float(within - 2.0 * kxy.mean())


def kernel_inception_distance(feats_a, feats_b, subset_size: int = 1000,
                              max_subsets: int = 100, seed: int = 0) -> tuple[float, float]:
    """KID: (mean, standard error) of the unbiased MMD^2 over disjoint subsets.

    ``feats_a`` ``[N, D]``, ``feats_b`` ``[M, D]``. Both sets are shuffled (``seed``) and cut
    into ``k`` disjoint pairs of subsets of ``m = min(subset_size, N // 2, M // 2)`` rows,
    ``k = min(max_subsets, N // m, M // m)``; each pair gives an unbiased MMD^2 estimate. The
    subsets are independent, so the spread of the ``k`` estimates divided by ``sqrt(k)`` is a
    true standard error of their mean (overlapping random subsets, as in the reference code,
    estimate the same mean but make the spread over subsets no standard error). Unbiased:
    the mean can be slightly negative.
    """
    a = _as_matrix(feats_a, "first features", 4).to(torch.float64)
    b = _as_matrix(feats_b, "second features", 4).to(torch.float64)
    if a.shape[1] != b.shape[1]:
        raise DataError(f"feature sets differ in width: {a.shape[1]} vs {b.shape[1]}")
    m = min(subset_size, a.shape[0] // 2, b.shape[0] // 2)
    if m < 2:
        raise DataError(f"subset_size={subset_size} must be >= 2")
    k = min(max_subsets, a.shape[0] // m, b.shape[0] // m)
    g = torch.Generator().manual_seed(seed)
    ia, ib = torch.randperm(a.shape[0], generator=g), torch.randperm(b.shape[0], generator=g)
    vals = np.array([_mmd2_unbiased(a[ia[i * m:(i + 1) * m]], b[ib[i * m:(i + 1) * m]])
                     for i in range(k)])
    return float(vals.mean()), float(vals.std(ddof=1) / math.sqrt(k))


def inception_score(logits, splits: int = 10) -> tuple[float, float]:
    """IS = exp(E_x KL(p(y|x) || p(y))) in each of ``splits`` consecutive splits of
    ``logits`` ``[N, C]``: (mean, std over splits), float64; the std as the original code
    (ddof 0)."""
    z = _as_matrix(logits, "logits", splits).to(torch.float64)
    log_p = torch.log_softmax(z, dim=1)
    scores = []
    for part in torch.tensor_split(log_p, splits):
        log_marginal = torch.logsumexp(part, 0) - math.log(part.shape[0])   # log p(y)
        kl = (part.exp() * (part - log_marginal)).sum(1).mean()
        scores.append(math.exp(float(kl)))
    s = np.array(scores)
    return float(s.mean()), float(s.std())


def _sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared distances ``[n, m]`` via |a|^2 + |b|^2 - 2 a.b (clamped at 0), in a's dtype."""
    d = a.square().sum(1, keepdim=True) + b.square().sum(1)[None] - 2.0 * a @ b.T
    return d.clamp_min_(0.0)


def _chunk(n_cols: int) -> int:
    return max(1, 2 ** 24 // max(n_cols, 1))   # ~64 MB of float32 distances a block


def knn_radii(feats: torch.Tensor, k: int = 3) -> torch.Tensor:
    """Squared distance of each row of ``feats`` ``[N, D]`` to its k-th nearest *other* row."""
    if feats.shape[0] <= k:
        raise DataError(f"k-nearest-neighbour radii need more than k = {k} rows, "
                        f"got {feats.shape[0]}")
    out = []
    step = _chunk(feats.shape[0])
    for i in range(0, feats.shape[0], step):
        d = _sq_dist(feats[i:i + step], feats)
        # the row itself is at distance 0: the (k + 1)-th smallest is the k-th other row
        out.append(d.topk(k + 1, dim=1, largest=False).values[:, -1])
    return torch.cat(out)


def _coverage(queries: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> float:
    """Fraction of ``queries`` inside at least one ball (``centres``, squared ``radii``)."""
    hit, step = 0, _chunk(centres.shape[0])
    for i in range(0, queries.shape[0], step):
        hit += int((_sq_dist(queries[i:i + step], centres) <= radii[None]).any(1).sum())
    return hit / queries.shape[0]


def precision_recall(real, fake, k: int = 3,
                     device: torch.device | str | None = None) -> tuple[float, float]:
    """Improved precision and recall (Kynkaanniemi et al. 2019).

    The real manifold is the union of balls around each real feature ``[N, D]`` reaching its
    k-th nearest real neighbour; precision is the fraction of fake features ``[M, D]`` inside
    it. Recall swaps the roles. Distances in float32 on ``device`` (blocks of ~64 MB), float64
    when both sets are small.
    """
    r = _as_matrix(real, "real features", k + 1)
    f = _as_matrix(fake, "fake features", k + 1)
    if r.shape[1] != f.shape[1]:
        raise DataError(f"feature sets differ in width: {r.shape[1]} vs {f.shape[1]}")
    dtype = torch.float64 if r.shape[0] * f.shape[0] <= 2 ** 22 else torch.float32
    r, f = r.to(device=device, dtype=dtype), f.to(device=device, dtype=dtype)
    precision = _coverage(f, r, knn_radii(r, k))
    recall = _coverage(r, f, knn_radii(f, k))
    return precision, recall
