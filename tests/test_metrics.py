"""Tests for ddpmkit.metrics: FD/KD estimators, the digit classifier and its cache, and the
digit and 2-D point quality reports."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ddpmkit import metrics as M
from ddpmkit.config import DataConfig
from ddpmkit.data import load_data, sample_points
from ddpmkit.errors import DataError


def digits(split: str) -> torch.Tensor:
    return load_data(DataConfig(name="digits"), split).x


def exact_moments(n: int, mu: np.ndarray, cov: np.ndarray, seed: int) -> torch.Tensor:
    """``n`` points whose sample mean is exactly ``mu`` and whose sample covariance
    (N - 1 denominator) is exactly ``cov``: whiten a random draw, then colour it."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, len(mu)))
    z -= z.mean(0)
    z = z @ np.linalg.inv(np.linalg.cholesky(np.cov(z.T)).T)      # sample cov -> I
    return torch.from_numpy(z @ np.linalg.cholesky(cov).T + mu)


def fd_closed_form_2d(mu_a, s_a, mu_b, s_b) -> float:
    """FD of two 2-D Gaussians without any matrix square root: S_a S_b has eigenvalues
    l1, l2 >= 0, so Tr (S_a S_b)^{1/2} = sqrt(l1) + sqrt(l2) = sqrt(tr + 2 sqrt(det))."""
    p = s_a @ s_b
    tr_sqrt = math.sqrt(np.trace(p) + 2.0 * math.sqrt(np.linalg.det(p)))
    return float(np.sum((mu_a - mu_b) ** 2) + np.trace(s_a) + np.trace(s_b) - 2.0 * tr_sqrt)


MU_A, MU_B = np.array([0.5, -1.0]), np.array([-0.25, 0.75])
# Non-commuting covariances, so the cross term is not just a product of diagonals.
S_A = np.array([[2.0, 0.6], [0.6, 0.5]])
S_B = np.array([[0.7, -0.3], [-0.3, 1.5]])


# ---- frechet_distance --------------------------------------------------------------------

def test_fd_identical_sets_is_zero():
    x = torch.randn(500, 32, generator=torch.Generator().manual_seed(0)).double() * 3 + 1
    assert M.frechet_distance(x, x) == pytest.approx(0.0, abs=1e-6)
    assert M.frechet_distance(x.numpy(), x.clone()) == pytest.approx(0.0, abs=1e-6)


def test_fd_equals_closed_form_for_exact_moments():
    # Sets built to have exactly the target mean and covariance: the estimator must give
    # the closed form to round-off, with no statistical slack at all.
    a = exact_moments(50, MU_A, S_A, seed=1)
    b = exact_moments(80, MU_B, S_B, seed=2)
    want = fd_closed_form_2d(MU_A, S_A, MU_B, S_B)
    assert M.frechet_distance(a, b) == pytest.approx(want, rel=1e-9)


def test_fd_matches_closed_form_for_large_gaussian_samples():
    g = torch.Generator().manual_seed(3)
    n = 50_000
    la, lb = np.linalg.cholesky(S_A), np.linalg.cholesky(S_B)
    a = torch.randn(n, 2, generator=g).double() @ torch.from_numpy(la).T + torch.from_numpy(MU_A)
    b = torch.randn(n, 2, generator=g).double() @ torch.from_numpy(lb).T + torch.from_numpy(MU_B)
    want = fd_closed_form_2d(MU_A, S_A, MU_B, S_B)
    # The FD is a smooth function of the sample means and covariances, whose errors are
    # O(scale / sqrt(N)) with scale ~ tr S_a + tr S_b + |mu_a - mu_b|^2 ~ 8 here; the bias
    # is O(scale / N). 5 * scale / sqrt(N) ~ 0.18 is a loose bound for FD = 3.9 and leaves
    # the test free of seed luck; a wrong cross term would be off by ~1.
    scale = np.trace(S_A) + np.trace(S_B) + np.sum((MU_A - MU_B) ** 2)
    assert abs(M.frechet_distance(a, b) - want) < 5 * scale / math.sqrt(n)


def test_fd_matches_scipy_sqrtm_in_high_dimension():
    linalg = pytest.importorskip("scipy.linalg")   # a cross-check only; metrics avoids scipy
    g = torch.Generator().manual_seed(4)
    a = torch.randn(300, 20, generator=g).double() @ torch.randn(20, 20, generator=g).double()
    b = torch.randn(400, 20, generator=g).double() * 2 + 0.5
    sa, sb = np.cov(a.numpy().T), np.cov(b.numpy().T)
    cross = np.real(linalg.sqrtm(sa @ sb))
    want = (np.sum((a.numpy().mean(0) - b.numpy().mean(0)) ** 2) + np.trace(sa) + np.trace(sb)
            - 2 * np.trace(cross))
    assert M.frechet_distance(a, b) == pytest.approx(want, rel=1e-6)


def test_fd_symmetric_and_non_negative():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(200, 16, generator=g)
    b = torch.randn(300, 16, generator=g) * 1.5 + 0.2
    assert M.frechet_distance(a, b) == pytest.approx(M.frechet_distance(b, a), rel=1e-9)
    assert M.frechet_distance(a, b) > 0
    # Near-identical and rank-deficient (N < D) sets: round-off must not go negative.
    assert M.frechet_distance(a, a + 1e-9) >= 0.0
    small = torch.randn(5, 16, generator=g)
    assert M.frechet_distance(small, small) >= 0.0
    assert math.isfinite(M.frechet_distance(small, a))


@pytest.mark.parametrize("a, b", [
    (torch.zeros(10, 3), torch.zeros(10, 4)),        # widths differ
    (torch.zeros(1, 3), torch.zeros(10, 3)),         # one row: no covariance
    (torch.zeros(10), torch.zeros(10)),              # not [N, D]
    (torch.full((10, 3), math.nan), torch.zeros(10, 3)),
])
def test_estimators_reject_bad_input(a, b):
    with pytest.raises(DataError):
        M.frechet_distance(a, b)
    with pytest.raises(DataError):
        M.kernel_distance(a, b, subsets=2)


# ---- kernel_distance ---------------------------------------------------------------------

def test_kd_matches_definition_on_a_tiny_set():
    g = torch.Generator().manual_seed(6)
    x, y = torch.randn(5, 3, generator=g).double(), torch.randn(6, 3, generator=g).double()
    k = lambda u, v: (float(u @ v) / 3 + 1) ** 3
    m = 5       # subset_size = min(N, M): all of x, 5 of the 6 rows of y
    # With one subset, recompute on the same rows the function drew.
    rng = np.random.default_rng(0)
    xi, yi = x[rng.choice(5, m, replace=False)], y[rng.choice(6, m, replace=False)]
    xx = sum(k(xi[i], xi[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(yi[i], yi[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    xy = sum(k(xi[i], yi[j]) for i in range(m) for j in range(m)) / (m * m)
    mean, std = M.kernel_distance(x, y, subsets=1, subset_size=10, seed=0)
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10)
    assert std == 0.0


def test_kd_near_zero_for_one_distribution_and_positive_for_a_shift():
    g = torch.Generator().manual_seed(7)
    a, b = torch.randn(2000, 16, generator=g), torch.randn(2000, 16, generator=g)
    mean, std = M.kernel_distance(a, b, subsets=50, subset_size=200)
    assert std > 0
    # std is the spread of one subset's estimate; the mean of 50 is far tighter, so 3 std
    # is a generous bound for an unbiased estimator of 0.
    assert abs(mean) < 3 * std
    shifted, sstd = M.kernel_distance(a, b + 0.5, subsets=50, subset_size=200)
    assert shifted > 10 * std and shifted > 3 * sstd
    assert M.kernel_distance(a, b, subsets=5, subset_size=100, seed=1) == \
        M.kernel_distance(a, b, subsets=5, subset_size=100, seed=1)


# ---- the digit classifier and its cache --------------------------------------------------

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("ddpmkit-cache")


@pytest.fixture(scope="module")
def clf(cache_dir) -> M.DigitClassifier:
    # Trains once for the module (~10 s on 2 busy cores) and fills the cache.
    return M.load_digit_classifier(cache_dir)


def cache_file(cache_dir: Path) -> Path:
    files = list(cache_dir.glob("*.safetensors"))
    assert len(files) == 1, files
    return files[0]


def test_classifier_accuracy(clf):
    assert M.classifier_accuracy(clf, "test") >= 0.95
    assert not clf.training


def test_cache_file_is_versioned_and_written_cleanly(clf, cache_dir):
    path = cache_file(cache_dir)
    assert M.DIGIT_CLASSIFIER_VERSION in path.name
    assert [p.name for p in cache_dir.iterdir()] == [path.name]     # no temp files left
    assert path.read_bytes()[:8] != b"\x80\x04\x95"                  # not a pickle


def test_cache_round_trip_gives_identical_predictions(clf, cache_dir, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("a valid cache must not be retrained")
    monkeypatch.setattr(M, "train_digit_classifier", no_training)
    again = M.load_digit_classifier(cache_dir)
    x = digits("test")
    with torch.no_grad():
        assert torch.equal(again(x), clf(x))
        assert torch.equal(again.features(x), clf.features(x))


def test_cache_dir_from_environment(clf, cache_dir, monkeypatch):
    monkeypatch.setenv("DDPMKIT_CACHE", str(cache_dir))
    monkeypatch.setattr(M, "train_digit_classifier", lambda *a, **k: pytest.fail("retrained"))
    assert isinstance(M.load_digit_classifier(), M.DigitClassifier)


@pytest.mark.parametrize("damage", ["garbage", "truncate", "other_version", "wrong_shapes"])
def test_unreadable_cache_is_replaced(clf, cache_dir, tmp_path, monkeypatch, damage):
    good = cache_file(cache_dir)
    bad = tmp_path / good.name
    if damage == "garbage":
        bad.write_bytes(b"not a safetensors file at all")
    elif damage == "truncate":
        bad.write_bytes(good.read_bytes()[:200])
    else:
        from safetensors.torch import save_file
        state = {k: v.clone() for k, v in clf.state_dict().items()}
        version = M.DIGIT_CLASSIFIER_VERSION
        if damage == "other_version":
            version = "digitcnn-v0"
        else:
            state["head.weight"] = torch.zeros(3, 3)
        save_file(state, str(bad), metadata={"version": version})
    calls = []
    monkeypatch.setattr(M, "train_digit_classifier",   # reuse the trained model: it is slow
                        lambda seed=0, epochs=30: calls.append(seed) or clf)
    with pytest.warns(RuntimeWarning, match="unreadable"):
        got = M.load_digit_classifier(tmp_path)
    assert calls == [0] and got is clf
    # Overwritten with the good weights (compared as tensors: safetensors does not keep
    # the metadata's key order, so the bytes may differ).
    from safetensors.torch import load_file
    fresh, want = load_file(str(bad)), load_file(str(good))
    assert fresh.keys() == want.keys() and all(torch.equal(fresh[k], want[k]) for k in want)
    assert sorted(p.name for p in tmp_path.iterdir()) == [good.name]


def test_unwritable_cache_warns_but_works(clf, tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setattr(M, "train_digit_classifier", lambda seed=0, epochs=30: clf)
    with pytest.warns(RuntimeWarning, match="cannot write"):
        assert M.load_digit_classifier(blocker) is clf


def test_training_is_deterministic_and_leaves_global_state_alone():
    torch.manual_seed(123)
    state, threads = torch.get_rng_state(), torch.get_num_threads()
    a = M.train_digit_classifier(seed=3, epochs=1)
    b = M.train_digit_classifier(seed=3, epochs=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.get_num_threads() == threads
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    c = M.train_digit_classifier(seed=4, epochs=1)
    assert not torch.equal(c.state_dict()["fc.weight"], sa["fc.weight"])


# ---- digit_quality -----------------------------------------------------------------------

def test_real_digits_beat_noise_blur_and_shuffled_pixels(clf):
    real = digits("test")                       # 297 digits, scored against the 1500 train
    g = torch.Generator().manual_seed(8)
    noise = torch.rand(real.shape, generator=g) * 2 - 1
    kernel = torch.tensor([[1.0, 2, 1], [2, 4, 2], [1, 2, 1]]) / 16
    blurred = F.conv2d(F.pad(real, (1, 1, 1, 1), value=-1.0), kernel[None, None])
    perm = torch.stack([torch.randperm(64, generator=g) for _ in range(real.shape[0])])
    shuffled = torch.gather(real.flatten(1), 1, perm).view_as(real)
    q = {name: M.digit_quality(x, reference="train", classifier=clf)
         for name, x in [("real", real), ("noise", noise), ("blur", blurred),
                         ("shuffled", shuffled)]}
    # All at N = 297, so the FD figures are comparable despite its small-N bias.
    for bad in ("noise", "blur", "shuffled"):
        assert q[bad]["fd"] > 5 * q["real"]["fd"], (bad, q[bad]["fd"], q["real"]["fd"])
        assert q[bad]["kd"] > 5 * q["real"]["kd"] + 3 * q[bad]["kd_std"]
        assert q[bad]["confidence"] < q["real"]["confidence"]
    r = q["real"]
    assert r["classes_present"] == 10
    assert sum(r["class_histogram"]) == r["n"] == 297 and r["n_ref"] == 1500
    assert r["confidence"] > 0.8 and r["nonfinite"] == 0
    assert r == M.real_digit_baseline("train", classifier=clf)
    # recognisable: the share of samples read with confidence >= 0.9, by its definition
    for name, x in (("real", real), ("noise", noise)):
        conf = M._run(clf, M._prepare_digits(x)[0])[1].softmax(1).amax(1)
        assert q[name]["recognisable"] == pytest.approx(float((conf >= 0.9).double().mean()))
    assert q["noise"]["recognisable"] < 0.5 < q["real"]["recognisable"]


def test_missing_classes_show_up(clf):
    x, y = digits("train"), M.digit_labels("train")
    q = M.digit_quality(x[y < 5], classifier=clf)
    assert q["classes_present"] == 5
    base = M.real_digit_baseline(n=q["n"], classifier=clf)
    assert base["n"] == q["n"] and base["classes_present"] == 10
    assert q["fd"] > 5 * base["fd"]


def test_baseline_defaults_to_train_digits_against_test(clf):
    b = M.real_digit_baseline(classifier=clf)
    assert (b["n"], b["n_ref"], b["reference"]) == (1500, 297, "test")
    assert b["classes_present"] == 10
    with pytest.raises(DataError):
        M.real_digit_baseline(n=5000, classifier=clf)


def test_digit_quality_input_handling(clf):
    x = digits("test")[:100]
    base = M.digit_quality(x, classifier=clf)
    # image_size=16, channels=3 versions of the same digits: pixel replication and grey
    # RGB undo exactly, so the figures match.
    big = x.repeat_interleave(2, 2).repeat_interleave(2, 3).expand(-1, 3, -1, -1)
    assert M.digit_quality(big, classifier=clf)["fd"] == pytest.approx(base["fd"], rel=1e-6)
    # NaN/inf are scored the way they would be saved (to_uint8), and counted.
    y = x.clone()
    y[0, 0, 0, :3] = torch.tensor([math.nan, math.inf, -math.inf])
    q = M.digit_quality(y, classifier=clf)
    assert q["nonfinite"] == 3 and math.isfinite(q["fd"])
    for bad in (torch.zeros(10, 8, 8), torch.zeros(10, 1, 7, 7), torch.zeros(10, 2, 8, 8),
                torch.zeros(1, 1, 8, 8)):
        with pytest.raises(DataError):
            M.digit_quality(bad, classifier=clf)
    with pytest.raises(DataError):
        M.digit_quality(x, reference="val", classifier=clf)


# ---- points_quality ----------------------------------------------------------------------

N_PTS = 1000


@pytest.mark.parametrize("name", ["moons", "8gaussians"])
def test_points_data_matches_baseline_and_distortions_do_not(name):
    x = sample_points(name, N_PTS, torch.Generator().manual_seed(9))
    r = M.points_quality(x, name, n_ref=N_PTS)
    b = r["baseline"]
    assert (r["n"], r["n_ref"]) == (N_PTS, N_PTS) and r["bandwidth"] > 0
    # Measured spread at N = 1000 over seeds: MMD^2 std ~4e-4, energy ~1.2e-3, SWD mean
    # ~0.045 (std 0.011); the bounds below are ~5 std from 0.
    assert abs(r["mmd"]) < 2e-3 and abs(b["mmd"]) < 2e-3
    assert abs(r["energy"]) < 6e-3 and abs(b["energy"]) < 6e-3
    assert r["swd"] < 0.1 and b["swd"] < 0.1
    assert min(r["precision"], r["recall"], b["precision"], b["recall"]) > 0.95
    for bad in (x + torch.tensor([0.5, 0.0]), x * 1.3):
        q = M.points_quality(bad, name, n_ref=N_PTS)
        assert q["mmd"] > 5 * 2e-3 and q["energy"] > 5 * 6e-3 and q["swd"] > 0.15
        assert min(q["precision"], q["recall"]) < 0.9
        assert q["baseline"] == b                      # depends on the reference only


def test_points_recall_catches_missing_modes():
    x = sample_points("8gaussians", 2 * N_PTS, torch.Generator().manual_seed(10))
    # Keeps the 3 modes at 45, 90 and 135 degrees (y >= 1 there, std 0.1); the cut is far
    # from the y = 0 modes, whose stray points would otherwise have wide k-NN balls.
    three = x[x[:, 1] > 0.5]
    r = M.points_quality(three, "8gaussians", n_ref=N_PTS)
    assert r["recall"] < 0.5 and r["precision"] > 0.95
    assert r["mmd"] > 0.02


def test_sliced_w1_is_exact_in_one_dimension():
    u = torch.tensor([[0.0], [1.0]], dtype=torch.float64)
    assert float(M._w1_1d(u, u + 0.5)) == pytest.approx(0.5)
    assert float(M._w1_1d(torch.zeros(1, 1, dtype=torch.float64), u)) == pytest.approx(0.5)
    # Unequal sizes: 3 points at 0 vs 1 at 0 and 1 at 3 -> half the mass moves by 3.
    v = torch.tensor([[0.0], [3.0]], dtype=torch.float64)
    assert float(M._w1_1d(torch.zeros(3, 1, dtype=torch.float64), v)) == pytest.approx(1.5)


@pytest.mark.parametrize("x, name", [
    (torch.zeros(100, 3), "moons"),
    (torch.zeros(3, 2), "moons"),
    (torch.full((100, 2), math.nan), "moons"),
    (torch.zeros(100, 2), "spiral"),
])
def test_points_quality_rejects_bad_input(x, name):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(DataError):
            M.points_quality(x, name)
