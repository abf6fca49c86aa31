"""Sample-quality metrics that need no downloaded weights.

Images (the built-in ``digits`` set) are scored in the feature space of a small CNN that
ddpmkit trains itself on the 1500 training digits (a few seconds on a CPU) and caches as
safetensors; 2-D point sets are scored directly against fresh draws of the true
distribution. Every figure comes with a real-data reference point, because a bare FD or MMD
is hard to read:

* :func:`digit_quality` -- Frechet distance (FD, the FID formula), kernel distance (KD, the
  KID estimator), class histogram and confidence of generated digits;
  :func:`real_digit_baseline` -- the same figures for real digits the reference does not hold.
* :func:`points_quality` -- MMD, energy distance, sliced Wasserstein-1 and k-NN
  precision/recall of generated 2-D points, with a "baseline" of fresh data of the same size.
* :func:`frechet_distance`, :func:`kernel_distance` -- the estimators on any feature sets.

FD is biased upwards at small N (the covariance estimates are noisy), so FD figures are only
comparable at the same N; KD is unbiased and comparable across sample sizes.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .config import POINT_SETS, DataConfig
from .data import load_data, sample_points
from .errors import DataError

__all__ = [
    "DIGIT_CLASSIFIER_VERSION",
    "DigitClassifier",
    "classifier_accuracy",
    "digit_features",
    "digit_labels",
    "digit_quality",
    "frechet_distance",
    "kernel_distance",
    "load_digit_classifier",
    "points_quality",
    "real_digit_baseline",
    "train_digit_classifier",
]

# Part of the cache file name: bump it whenever the architecture, the training recipe or the
# data preparation changes, so stale weights are never picked up (and figures computed with
# different classifiers are never mixed up).
DIGIT_CLASSIFIER_VERSION = "digitcnn-v1"

_DIGITS_TRAIN = 1500      # same split as ddpmkit.data: the first 1500 of load_digits train
_FEATURE_DIM = 128
_EVAL_BATCH = 2048


# ---- the digit classifier ----------------------------------------------------------------

class DigitClassifier(nn.Module):
    """Small CNN for 8x8 grey digits in [-1, 1]: ``[N, 1, 8, 8]`` -> logits ``[N, 10]``.

    :meth:`features` gives the 128-d penultimate activations ``[N, 128]`` that FD and KD
    are computed on.
    """

    feature_dim = _FEATURE_DIM

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.conv3 = nn.Conv2d(64, 64, 3, padding=1)
        self.fc = nn.Linear(64 * 2 * 2, _FEATURE_DIM)
        self.dropout = nn.Dropout(0.3)
        self.head = nn.Linear(_FEATURE_DIM, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """``[N, 1, 8, 8]`` -> ``[N, 128]`` (post-ReLU, like Inception's pool features)."""
        h = F.relu(self.conv1(x))
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)       # 4x4
        h = F.max_pool2d(F.relu(self.conv3(h)), 2)       # 2x2
        return F.relu(self.fc(h.flatten(1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.dropout(self.features(x)))


def digit_labels(split: str = "test") -> torch.Tensor:
    """Class labels (int64 ``[N]``) of ``load_data(digits, split)``, in the same order."""
    if split not in ("train", "test"):
        raise DataError(f"split={split!r} must be 'train' or 'test'")
    from .data.digits import digits_arrays

    y = torch.from_numpy(digits_arrays()[1].copy())
    return y[:_DIGITS_TRAIN] if split == "train" else y[_DIGITS_TRAIN:]


def _digits(split: str) -> torch.Tensor:
    return load_data(DataConfig(name="digits"), split).x      # [N, 1, 8, 8] float32


def _augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random shift by up to 1 pixel each way plus half-bin uniform noise, ``[B,1,8,8]``.

    The noise matters: real digits sit on 17 levels, generated ones do not, and the
    features should not react to off-grid values alone.
    """
    b = x.shape[0]
    padded = F.pad(x, (1, 1, 1, 1), value=-1.0)[:, 0]           # background is -1
    oy = torch.randint(0, 3, (b,), generator=g)
    ox = torch.randint(0, 3, (b,), generator=g)
    ar = torch.arange(8)
    rows = (oy[:, None] + ar)[:, :, None]                       # [B, 8, 1]
    cols = (ox[:, None] + ar)[:, None, :]                       # [B, 1, 8]
    out = padded[torch.arange(b)[:, None, None], rows, cols][:, None]
    noise = (torch.rand(out.shape, generator=g) - 0.5) * (2.0 / 16.0)
    return (out + noise).clamp_(-1.0, 1.0)


@contextlib.contextmanager
def _one_thread() -> Iterator[None]:
    """Run torch CPU ops on one thread for the duration (restored afterwards).

    The model is so small that threads buy nothing, while on a busy machine they cost a
    lot: on 2 cores at load ~6, one training step took 0.03 s on 1 thread and ~1 s on 2.
    One thread also keeps the order of float reductions, hence the features, from
    depending on the thread count. (``set_num_threads`` is process-wide: other threads of
    the process run single-threaded meanwhile.)
    """
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_digit_classifier(seed: int = 0, epochs: int = 30) -> DigitClassifier:
    """Train a :class:`DigitClassifier` on the 1500 training digits (CPU, a few seconds).

    Deterministic for a given ``seed`` and torch build: all randomness comes from
    ``seed``, the global RNG state is left as it was, and the work runs on one thread
    (see :func:`_one_thread`). Returned in eval mode with gradients switched off.
    """
    x, y = _digits("train"), digit_labels("train")
    g = torch.Generator().manual_seed(seed)
    batch = 128
    steps_per_epoch = math.ceil(x.shape[0] / batch)
    with torch.random.fork_rng(devices=[]), _one_thread():
        torch.manual_seed(seed)                                 # init and dropout
        model = DigitClassifier()
        opt = torch.optim.AdamW(model.parameters(), lr=5e-3, weight_decay=1e-4)
        sched = torch.optim.lr_scheduler.OneCycleLR(
            opt, max_lr=5e-3, total_steps=epochs * steps_per_epoch, pct_start=0.15)
        model.train()
        for _ in range(epochs):
            order = torch.randperm(x.shape[0], generator=g)
            for i in range(0, x.shape[0], batch):
                idx = order[i:i + batch]
                loss = F.cross_entropy(model(_augment(x[idx], g)), y[idx],
                                       label_smoothing=0.05)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                sched.step()
    return _frozen(model)


def _frozen(model: DigitClassifier) -> DigitClassifier:
    model.eval()
    model.requires_grad_(False)
    return model


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def _run(classifier: DigitClassifier, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(features ``[N, 128]`` float64, logits ``[N, 10]`` float64) for digits ``x``."""
    was_training = classifier.training
    classifier.eval()
    device = _device_of(classifier)
    feats, logits = [], []
    with _one_thread():
        for i in range(0, x.shape[0], _EVAL_BATCH):
            f = classifier.features(x[i:i + _EVAL_BATCH].to(device, torch.float32))
            feats.append(f.double().cpu())
            logits.append(classifier.head(f).double().cpu())
    classifier.train(was_training)
    if not feats:
        return (torch.zeros(0, _FEATURE_DIM, dtype=torch.float64),
                torch.zeros(0, 10, dtype=torch.float64))
    return torch.cat(feats), torch.cat(logits)


def classifier_accuracy(classifier: DigitClassifier, split: str = "test") -> float:
    """Fraction of the digits of ``split`` that ``classifier`` labels correctly."""
    _, logits = _run(classifier, _digits(split))
    return float((logits.argmax(1) == digit_labels(split)).double().mean())


def _cache_path(cache_dir: str | os.PathLike | None) -> Path:
    if cache_dir is None:
        env = os.environ.get("DDPMKIT_CACHE")
        cache_dir = env if env else Path.home() / ".cache" / "ddpmkit"
    return Path(cache_dir).expanduser() / f"{DIGIT_CLASSIFIER_VERSION}.safetensors"


def _read_cached(path: Path) -> DigitClassifier:
    """Load cached weights; any problem (truncated, wrong keys, NaN) raises."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if meta.get("version") != DIGIT_CLASSIFIER_VERSION:
        raise ValueError(f"version {meta.get('version')!r}, expected "
                         f"{DIGIT_CLASSIFIER_VERSION!r}")
    state = load_file(str(path))
    for k, v in state.items():
        if not torch.isfinite(v).all():
            raise ValueError(f"tensor {k!r} holds NaN or infinite values")
    model = DigitClassifier()
    model.load_state_dict(state, strict=True)   # RuntimeError on missing/extra/mis-shaped
    return _frozen(model)


def _write_cached(path: Path, model: DigitClassifier, accuracy: float) -> None:
    """Atomic write: a reader sees the old file or the complete new one, never a torn one."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        save_file(state, tmp, metadata={"version": DIGIT_CLASSIFIER_VERSION,
                                        "test_accuracy": f"{accuracy:.4f}"})
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_digit_classifier(cache_dir: str | os.PathLike | None = None) -> DigitClassifier:
    """The standard digit classifier (seed 0), trained once and cached as safetensors.

    The cache lives in ``cache_dir``, else ``$DDPMKIT_CACHE``, else ``~/.cache/ddpmkit``,
    under a file name holding :data:`DIGIT_CLASSIFIER_VERSION`. An unreadable or stale
    file is replaced (with a warning); an unwritable cache folder only costs a retrain
    next time (also with a warning). Returned on the CPU, in eval mode.
    """
    path = _cache_path(cache_dir)
    if path.exists():
        try:
            return _read_cached(path)
        except Exception as e:  # noqa: BLE001 -- any failure means: rebuild the cache
            warnings.warn(f"digit classifier cache {path} is unreadable ({e}); retraining "
                          "and overwriting it", RuntimeWarning, stacklevel=2)
    model = train_digit_classifier(seed=0)
    try:
        _write_cached(path, model, classifier_accuracy(model, "test"))
    except OSError as e:
        warnings.warn(f"cannot write the digit classifier cache {path} ({e}); it will be "
                      "retrained next time", RuntimeWarning, stacklevel=2)
    return model


# ---- estimators on feature sets ----------------------------------------------------------

def _as_features(a: torch.Tensor | np.ndarray, name: str) -> torch.Tensor:
    """Validate a feature set ``[N, D]`` and return it as float64 CPU tensor."""
    t = torch.as_tensor(a).detach().cpu()
    if t.ndim != 2:
        raise DataError(f"{name} must be a 2-D array [N, D], got shape {tuple(t.shape)}")
    if t.shape[0] < 2:
        raise DataError(f"{name} needs at least 2 rows to estimate a spread, got {t.shape[0]}")
    t = t.to(torch.float64)
    if not torch.isfinite(t).all():
        raise DataError(f"{name} holds {int((~torch.isfinite(t)).sum())} NaN/infinite values")
    return t


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape[1] != b.shape[1]:
        raise DataError(f"feature sets differ in width: {a.shape[1]} vs {b.shape[1]}")


def _psd_sqrt(s: torch.Tensor) -> torch.Tensor:
    """Symmetric square root of a symmetric PSD matrix (negative rounding noise clipped)."""
    w, v = torch.linalg.eigh(s)
    return (v * w.clamp_min(0.0).sqrt()) @ v.T


def frechet_distance(feats_a: torch.Tensor | np.ndarray,
                     feats_b: torch.Tensor | np.ndarray) -> float:
    """Frechet distance between Gaussian fits of ``feats_a`` ``[N, D]`` and ``feats_b`` ``[M, D]``.

    ``|mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` in float64 (the FID formula).
    ``Tr (S_a S_b)^{1/2}`` is taken as ``Tr (S_a^{1/2} S_b S_a^{1/2})^{1/2}``: the two
    matrices are similar, and the second is symmetric PSD, so an eigendecomposition gives
    it without the complex round-off of a general matrix square root, and singular
    covariances (N <= D) are fine. Biased upwards at small N: compare at equal N.
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    _check_pair(a, b)
    mu_a, mu_b = a.mean(0), b.mean(0)
    ca, cb = a - mu_a, b - mu_b
    s_a = ca.T @ ca / (a.shape[0] - 1)
    s_b = cb.T @ cb / (b.shape[0] - 1)
    r = _psd_sqrt(s_a)
    m = r @ s_b @ r
    m = 0.5 * (m + m.T)                          # symmetric up to round-off; make it exact
    tr_sqrt = torch.linalg.eigvalsh(m).clamp_min(0.0).sqrt().sum()
    fd = (mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2.0 * tr_sqrt
    return max(float(fd), 0.0)                   # tiny negatives are round-off


def _mmd2_cubic(x: torch.Tensor, y: torch.Tensor) -> float:
    """Unbiased MMD^2 with k(u, v) = (u.v / d + 1)^3 between ``x`` [m, d] and ``y`` [n, d]."""
    d = x.shape[1]
    kxx = (x @ x.T / d + 1.0) ** 3
    kyy = (y @ y.T / d + 1.0) ** 3
    kxy = (x @ y.T / d + 1.0) ** 3
    m, n = x.shape[0], y.shape[0]
    return float((kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
                 + (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
                 - 2.0 * kxy.mean())


def kernel_distance(feats_a: torch.Tensor | np.ndarray, feats_b: torch.Tensor | np.ndarray,
                    subsets: int = 100, subset_size: int = 1000,
                    seed: int = 0) -> tuple[float, float]:
    """Kernel distance (KID): (mean, std) of unbiased MMD^2 over random subsets.

    ``feats_a`` ``[N, D]``, ``feats_b`` ``[M, D]``; kernel ``(x.y / D + 1)^3``; each of
    ``subsets`` rounds draws ``min(subset_size, N, M)`` rows of each set without
    replacement (fixed ``seed``, so a figure is reproducible). Unbiased, so it can be
    slightly negative and is comparable across sample sizes. ``std`` is the spread over
    subsets, not a standard error.
    """
    a, b = _as_features(feats_a, "feats_a"), _as_features(feats_b, "feats_b")
    _check_pair(a, b)
    if subsets < 1:
        raise DataError(f"subsets={subsets} must be >= 1")
    m = min(subset_size, a.shape[0], b.shape[0])
    if m < 2:
        raise DataError(f"subset_size={subset_size} must be >= 2")
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(subsets):
        ia = torch.from_numpy(rng.choice(a.shape[0], m, replace=False))
        ib = torch.from_numpy(rng.choice(b.shape[0], m, replace=False))
        vals.append(_mmd2_cubic(a[ia], b[ib]))
    v = np.asarray(vals)
    return float(v.mean()), float(v.std(ddof=1)) if len(v) > 1 else 0.0


# ---- digits ------------------------------------------------------------------------------

def _prepare_digits(samples: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Generated images -> ``[N, 1, 8, 8]`` float32 in [-1, 1], plus the non-finite count.

    Accepts ``[N, C, 8k, 8k]`` with C = 1 or 3 (what ``image_size``/``channels`` options
    of the digits set produce): channels are averaged and k x k blocks mean-pooled.
    Non-finite values are mapped like :func:`ddpmkit.data.to_uint8` does when samples are
    saved (NaN -> 0, +-inf -> +-1) and everything is clamped to [-1, 1], so the images
    scored are the images a user would see.
    """
    if not isinstance(samples, torch.Tensor):
        samples = torch.as_tensor(np.asarray(samples))
    x = samples.detach()
    if x.ndim != 4 or x.shape[1] not in (1, 3) or x.shape[2] != x.shape[3] \
            or x.shape[2] % 8 or x.shape[2] == 0:
        raise DataError(f"digit samples must be images [N, 1, 8, 8] (or [N, 1|3, 8k, 8k]), "
                        f"got shape {tuple(x.shape)}")
    if x.shape[0] < 2:
        raise DataError(f"need at least 2 samples to compare distributions, got {x.shape[0]}")
    x = x.cpu().float()
    bad = int((~torch.isfinite(x)).sum())
    x = torch.nan_to_num(x, nan=0.0, posinf=1.0, neginf=-1.0).clamp_(-1.0, 1.0)
    x = x.mean(1, keepdim=True)
    k = x.shape[2] // 8
    if k > 1:
        x = F.avg_pool2d(x, k)
    return x, bad


RECOGNISABLE = 0.9  # max softmax probability from which a sample counts as a readable digit


def digit_features(x: torch.Tensor, classifier: DigitClassifier | None = None) -> torch.Tensor:
    """Classifier features ``[N, 128]`` (float64) of digits ``x`` ``[N, 1, 8, 8]``."""
    classifier = classifier if classifier is not None else load_digit_classifier()
    return _run(classifier, _prepare_digits(x)[0])[0]


def _reference_features(reference: str, classifier: DigitClassifier) -> torch.Tensor:
    if reference not in ("train", "test"):
        raise DataError(f"reference={reference!r} must be 'test' or 'train'")
    return _run(classifier, _digits(reference))[0]


def digit_quality(samples: torch.Tensor, reference: str = "test",
                  classifier: DigitClassifier | None = None) -> dict:
    """Score generated digits ``samples`` ``[N, 1, 8, 8]`` in [-1, 1] against real ones.

    ``reference``: ``"test"`` (the 297 held-out digits, default) or ``"train"`` (1500).
    Returns floats/ints: ``fd`` (Frechet distance of classifier features), ``kd`` and
    ``kd_std`` (kernel distance, :func:`kernel_distance`), ``class_histogram`` (10 counts
    of predicted classes), ``classes_present`` (classes with >= 2% of the samples),
    ``confidence`` (mean max softmax probability), ``recognisable`` (share of samples read
    with confidence >= :data:`RECOGNISABLE`), ``n``, ``n_ref``, ``reference`` and
    ``nonfinite`` (NaN/inf values replaced before scoring).

    FD grows as N shrinks even for perfect samples, so compare FD only at equal N, and
    read it against :func:`real_digit_baseline` with ``n=N``. KD has no such bias.
    """
    classifier = classifier if classifier is not None else load_digit_classifier()
    x, bad = _prepare_digits(samples)
    feats, logits = _run(classifier, x)
    ref = _reference_features(reference, classifier)
    kd, kd_std = kernel_distance(feats, ref)
    n = x.shape[0]
    hist = torch.bincount(logits.argmax(1), minlength=10)
    return {
        "fd": frechet_distance(feats, ref),
        "kd": kd,
        "kd_std": kd_std,
        "class_histogram": [int(c) for c in hist],
        "classes_present": int((hist >= 0.02 * n).sum()),
        "confidence": float(logits.softmax(1).amax(1).mean()),
        "recognisable": float((logits.softmax(1).amax(1) >= RECOGNISABLE).float().mean()),
        "n": n,
        "n_ref": int(ref.shape[0]),
        "reference": reference,
        "nonfinite": bad,
    }


def real_digit_baseline(reference: str = "test", n: int | None = None, seed: int = 0,
                        classifier: DigitClassifier | None = None) -> dict:
    """:func:`digit_quality` of *real* digits the reference does not contain.

    ``reference="test"`` scores training digits against the test split (what a model that
    reproduced its training data perfectly would get); ``reference="train"`` scores the
    297 test digits against the 1500 training digits. ``n``: how many real digits to
    score (a random subset, ``seed``); pass the number of generated samples so the FD
    figures are comparable. Default: the whole other split.
    """
    if reference not in ("train", "test"):
        raise DataError(f"reference={reference!r} must be 'test' or 'train'")
    other = _digits("train" if reference == "test" else "test")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or not 2 <= n <= other.shape[0]:
            raise DataError(f"n={n!r} must be an integer in [2, {other.shape[0]}] here")
        idx = torch.randperm(other.shape[0], generator=torch.Generator().manual_seed(seed))
        other = other[idx[:n]]
    return digit_quality(other, reference=reference, classifier=classifier)


# ---- 2-D points --------------------------------------------------------------------------

_CHUNK = 512


def _dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Euclidean distances ``[n, m]`` from coordinate differences: the faster
    |a|^2 + |b|^2 - 2 a.b route loses close pairs to cancellation."""
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def _pair_means(a: torch.Tensor, b: torch.Tensor, bandwidth: float,
                same: bool) -> tuple[float, float]:
    """Means of the Gaussian kernel and of the distance over pairs (i, j) of ``a`` x ``b``;
    pairs i == j are left out when ``same`` (``a`` is ``b``), as the unbiased estimators need."""
    k_sum = d_sum = 0.0
    for i in range(0, a.shape[0], _CHUNK):
        d = _dist(a[i:i + _CHUNK], b)
        k = torch.exp(d.square() / (-2.0 * bandwidth**2))
        if same:
            rows = torch.arange(d.shape[0])
            k[rows, rows + i] = 0.0           # the distance is 0 there already
        k_sum += float(k.sum())
        d_sum += float(d.sum())
    pairs = a.shape[0] * (b.shape[0] - 1) if same else a.shape[0] * b.shape[0]
    return k_sum / pairs, d_sum / pairs


def _knn_radius(a: torch.Tensor, k: int) -> torch.Tensor:
    """Distance of each row of ``a`` to its k-th nearest other row, ``[n]``."""
    out = []
    for i in range(0, a.shape[0], _CHUNK):
        d = _dist(a[i:i + _CHUNK], a)
        rows = torch.arange(d.shape[0])
        d[rows, rows + i] = math.inf
        out.append(d.topk(k, dim=1, largest=False).values[:, -1])
    return torch.cat(out)


def _covered(queries: torch.Tensor, centres: torch.Tensor, radius: torch.Tensor) -> float:
    """Fraction of ``queries`` inside at least one ball (``centres``, ``radius``)."""
    hit = 0
    for i in range(0, queries.shape[0], _CHUNK):
        hit += int((_dist(queries[i:i + _CHUNK], centres) <= radius[None]).any(1).sum())
    return hit / queries.shape[0]


def _w1_1d(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Exact Wasserstein-1 between the empirical distributions of the columns of ``u``
    ``[n, P]`` and ``v`` ``[m, P]``: the integral of |F_u - F_v| over the merged support."""
    allv, _ = torch.cat([u, v]).sort(0)
    us, _ = u.sort(0)
    vs, _ = v.sort(0)
    cdf_u = torch.searchsorted(us.T.contiguous(), allv.T.contiguous(), right=True).T / u.shape[0]
    cdf_v = torch.searchsorted(vs.T.contiguous(), allv.T.contiguous(), right=True).T / v.shape[0]
    gaps = allv[1:] - allv[:-1]
    return ((cdf_u[:-1] - cdf_v[:-1]).abs() * gaps).sum(0)


def _point_scores(x: torch.Tensor, ref: torch.Tensor, bandwidth: float,
                  directions: torch.Tensor, k: int, ref_radius: torch.Tensor,
                  ref_self: tuple[float, float]) -> dict:
    """All point figures of ``x`` against ``ref``; ``ref_*`` are the reference-only terms."""
    k_xx, d_xx = _pair_means(x, x, bandwidth, True)
    k_xr, d_xr = _pair_means(x, ref, bandwidth, False)
    return {
        "mmd": k_xx + ref_self[0] - 2.0 * k_xr,
        "energy": 2.0 * d_xr - d_xx - ref_self[1],
        "swd": float(_w1_1d(x @ directions, ref @ directions).mean()),
        "precision": _covered(x, ref, ref_radius),
        "recall": _covered(ref, x, _knn_radius(x, k)),
    }


def points_quality(samples: torch.Tensor, name: str, n_ref: int | None = None,
                   seed: int = 0, k: int = 5) -> dict:
    """Score generated 2-D points ``samples`` ``[N, 2]`` against fresh points of set ``name``.

    The reference is ``sample_points(name, n_ref)`` (default ``n_ref = max(N, 2000)``);
    a second fresh data sample of size N, scored the same way, is returned as
    ``"baseline"`` -- the noise floor that a perfect model would reach at this N.
    Figures (lower is better unless noted):

    * ``mmd``: unbiased MMD^2, Gaussian kernel with bandwidth = median pairwise distance
      of the reference (fixed by the reference, so the samples cannot move it);
    * ``energy``: energy distance 2E|X-Y| - E|X-X'| - E|Y-Y'|;
    * ``swd``: sliced Wasserstein-1 over 64 fixed random directions;
    * ``precision`` / ``recall`` (higher is better): share of samples inside the k-NN
      balls of the reference / of reference points inside the k-NN balls of the samples
      (Kynkaanniemi et al., 2019) -- low recall means missing modes.

    Also ``n``, ``n_ref``, ``bandwidth``. The reference and baseline use RNG streams
    derived from ``seed`` that differ from the train (seed 0) and test (seed 1) streams of
    :func:`ddpmkit.data.load_data`. Non-finite samples are an error.
    """
    if name not in POINT_SETS:
        raise DataError(f"unknown 2-D point set {name!r}; choose one of {', '.join(POINT_SETS)}")
    x = torch.as_tensor(samples).detach().cpu()
    if x.ndim != 2 or x.shape[1] != 2:
        raise DataError(f"points must have shape [N, 2], got {tuple(x.shape)}")
    n = x.shape[0]
    if n <= k:
        raise DataError(f"need more than k={k} points, got {n}")
    x = x.double()
    if not torch.isfinite(x).all():
        raise DataError(f"samples hold {int((~torch.isfinite(x)).sum())} NaN/infinite values "
                        "(a diverged model?)")
    n_ref = max(n, 2000) if n_ref is None else n_ref
    if isinstance(n_ref, bool) or not isinstance(n_ref, int) or n_ref <= k:
        raise DataError(f"n_ref={n_ref!r} must be an integer > k={k}")
    # Seeds far from 0 and 1 so that neither stream replays load_data's train/test points.
    ref = sample_points(name, n_ref, torch.Generator().manual_seed(1_000_003 + 2 * seed))
    base = sample_points(name, n, torch.Generator().manual_seed(1_000_004 + 2 * seed))
    ref, base = ref.double(), base.double()
    # Median heuristic on (at most) 1000 reference points: ~500k pairs pin the median down
    # to well under 1%, and the reference alone decides it.
    sub = ref[:1000]
    iu = torch.triu_indices(sub.shape[0], sub.shape[0], 1)
    bandwidth = float(_dist(sub, sub)[iu[0], iu[1]].median())
    dirs = torch.randn(2, 64, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    dirs = dirs / dirs.norm(dim=0, keepdim=True)
    # Reference-only terms are shared by the samples and the baseline: compute them once.
    ref_self = _pair_means(ref, ref, bandwidth, True)
    ref_radius = _knn_radius(ref, k)
    out = _point_scores(x, ref, bandwidth, dirs, k, ref_radius, ref_self)
    out.update(n=n, n_ref=n_ref, bandwidth=bandwidth,
               baseline=_point_scores(base, ref, bandwidth, dirs, k, ref_radius, ref_self))
    return out
