"""FID, KID, IS, precision/recall against closed forms; the TF-Inception against a reference
implementation (torch-fidelity) with the same random weights; the `fid` commands."""

import json
import math
import sys
import zipfile

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.cli import main
from ddpmkit.data import to_uint8
from ddpmkit.errors import ConfigError, DataError
from ddpmkit.fid import (
    Features,
    extract_features,
    feature_stats,
    frechet_distance,
    inception_score,
    kernel_inception_distance,
    load_inception,
    open_source,
    precision_recall,
    sample_features,
    scores,
)
from ddpmkit.fid.inception import InceptionV3, resize_tf1_bilinear
from ddpmkit.fid.scores import features_fid, knn_radii
from ddpmkit.fid.sources import Statistics

LAYOUT = json.load(open(__file__.replace("test_fid.py", "data/inception_2015_12_05_layout.json")))


# ---- Frechet distance ----------------------------------------------------------------------

def test_frechet_distance_of_diagonal_gaussians_is_the_closed_form():
    # Commuting (diagonal) covariances: Tr (S1 S2)^(1/2) = sum sqrt(s1 s2), so the distance is
    # |mu1 - mu2|^2 + sum (sqrt s1 - sqrt s2)^2.
    g = np.random.default_rng(0)
    d = 64
    mu1, mu2 = g.normal(size=d), g.normal(size=d)
    s1, s2 = g.uniform(0.1, 3.0, d), g.uniform(0.1, 3.0, d)
    want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(s1) - np.sqrt(s2)) ** 2)
    got = frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2))
    assert got == pytest.approx(want, rel=1e-10)


def test_frechet_distance_of_non_commuting_2x2_covariances():
    # For 2x2 matrices with positive eigenvalues l1, l2: Tr M^(1/2) = sqrt(Tr M + 2 sqrt(det M)).
    s1 = np.array([[2.0, 0.9], [0.9, 1.0]])
    s2 = np.array([[0.5, -0.3], [-0.3, 1.5]])
    tr_sqrt = math.sqrt(np.trace(s1 @ s2) + 2 * math.sqrt(np.linalg.det(s1) * np.linalg.det(s2)))
    mu1, mu2 = np.array([0.0, 1.0]), np.array([1.0, -1.0])
    want = 1.0 + 4.0 + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-12)


def test_frechet_distance_matches_scipy_sqrtm_on_singular_covariances():
    scipy_linalg = pytest.importorskip("scipy.linalg")
    g = np.random.default_rng(1)
    a, b = g.normal(size=(30, 40)), g.normal(size=(30, 40)) * 1.5 + 0.2  # N < D: singular
    (mu1, s1), (mu2, s2) = feature_stats(a), feature_stats(b)
    root = scipy_linalg.sqrtm(s1 @ s2)
    want = np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * root.real)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_feature_stats_are_float64_with_n_minus_1():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0], [5.0, 4.0]])
    mu, sigma = feature_stats(x)
    assert mu.dtype == sigma.dtype == np.float64
    np.testing.assert_allclose(sigma, np.cov(x.numpy().astype(np.float64), rowvar=False))


def test_frechet_distance_rejects_bad_statistics():
    with pytest.raises(DataError, match="do not fit"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))
    with pytest.raises(DataError, match="NaN"):
        frechet_distance(np.full(2, np.nan), np.eye(2), np.zeros(2), np.eye(2))


# ---- KID -----------------------------------------------------------------------------------

def _poly_mmd2_of_unit_gaussians(a: np.ndarray, b: np.ndarray) -> float:
    """Closed-form MMD^2 with k(x, y) = (x.y/d + 1)^3 between N(a, I) and N(b, I).

    For independent x ~ N(a, I), y ~ N(b, I): given y, x.y ~ N(a.y, |y|^2), and E Z^3 =
    m^3 + 3 m v for Z ~ N(m, v); averaging over y gives
    E k = m^3 + 3 m v_a + 3/d^2 (m (|b|^2 + d) + 2 a.b / d), m = a.b/d + 1, v_a = |a|^2/d^2.
    """
    d = a.shape[0]

    def e_k(a, b):
        m = a @ b / d + 1
        return m**3 + 3 * m * (a @ a) / d**2 + 3 / d**2 * (m * (b @ b + d) + 2 * (a @ b) / d)
    return e_k(a, a) + e_k(b, b) - 2 * e_k(a, b)


def test_kid_of_two_draws_of_one_distribution_is_zero_within_its_standard_error():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(4000, 16, generator=g), torch.randn(4000, 16, generator=g)
    kid, se = kernel_inception_distance(x, y, subset_size=500)   # 8 disjoint subsets
    assert 0 < se < 0.05
    assert abs(kid) <= 4 * se


def test_kid_of_shifted_gaussians_matches_the_closed_form():
    d = 16
    a, b = np.zeros(d), np.full(d, 0.25)
    want = _poly_mmd2_of_unit_gaussians(a, b)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4000, d, generator=g, dtype=torch.float64)
    y = torch.randn(4000, d, generator=g, dtype=torch.float64) + torch.from_numpy(b)
    kid, se = kernel_inception_distance(x, y, subset_size=500)
    assert want > 10 * se                # the test can tell a shift from no shift
    assert abs(kid - want) <= 4 * se


def test_kid_subsets_shrink_for_small_sets():
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(10, 4, generator=g), torch.randn(12, 4, generator=g)
    kid, se = kernel_inception_distance(x, y, subset_size=1000)  # subsets of 5, 2 of them
    assert math.isfinite(kid) and se > 0
    with pytest.raises(DataError, match="width"):
        kernel_inception_distance(x, torch.randn(10, 3))


# ---- Inception Score -----------------------------------------------------------------------

def test_inception_score_of_confident_balanced_classes_is_the_class_count():
    # Each split holds 10 samples of each of 10 classes, each predicted with certainty:
    # KL(p(y|x) || p(y)) = log 10 for every x, so IS = 10 in every split.
    labels = torch.arange(1000) % 10
    logits = torch.full((1000, 1008), -1e4)
    logits[torch.arange(1000), labels] = 0.0
    mean, std = inception_score(logits)
    assert mean == pytest.approx(10.0, rel=1e-9) and std == pytest.approx(0.0, abs=1e-9)
    same = torch.zeros(100, 1008)
    same[:, 3] = 5.0
    assert inception_score(same)[0] == pytest.approx(1.0, rel=1e-12)


def test_inception_score_matches_the_formula_on_random_logits():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200, 7, generator=g, dtype=torch.float64) * 2
    p = torch.softmax(z, 1).numpy()
    per_split = []
    for part in np.array_split(p, 10):
        py = part.mean(0)
        per_split.append(np.exp(np.mean(np.sum(part * (np.log(part) - np.log(py)), 1))))
    mean, std = inception_score(z)
    assert mean == pytest.approx(np.mean(per_split), rel=1e-10)
    assert std == pytest.approx(np.std(per_split), rel=1e-8)


# ---- precision / recall --------------------------------------------------------------------

def test_knn_radii_on_a_line_are_the_third_nearest_other_point():
    x = torch.arange(10, dtype=torch.float64)[:, None]
    # point 0: others at 1, 2, 3 -> 3; point 5: 4 and 6 at 1, 3 and 7 at 2 -> 2
    want = torch.tensor([3, 2, 2, 2, 2, 2, 2, 2, 2, 3], dtype=torch.float64) ** 2
    assert torch.equal(knn_radii(x, 3), want)


def test_precision_recall_of_half_overlapping_boxes():
    # real U[0,1]^2, fake U[0.5,1.5] x [0,1]: half of each lies in the other's support, so
    # precision = recall = 1/2 up to (a) the k-NN balls reaching past the real support by
    # about their radius r_k = sqrt(k / (pi n)) and (b) binomial noise sqrt(p (1-p) / n).
    n, k = 3000, 3
    g = torch.Generator().manual_seed(0)
    real = torch.rand(n, 2, generator=g, dtype=torch.float64)
    fake = torch.rand(n, 2, generator=g, dtype=torch.float64) + torch.tensor([0.5, 0.0],
                                                                                dtype=torch.float64)
    tol = 2 * math.sqrt(k / (math.pi * n)) + 3 * math.sqrt(0.25 / n)
    precision, recall = precision_recall(real, fake, k=k)
    assert abs(precision - 0.5) <= tol and abs(recall - 0.5) <= tol
    same = torch.rand(n, 2, generator=g, dtype=torch.float64)
    p_same, r_same = precision_recall(real, same, k=k)
    assert p_same > 0.9 and r_same > 0.9
    far = fake + 2.0                     # a gap far wider than any k-NN radius
    assert precision_recall(real, far, k=k) == (0.0, 0.0)


# ---- the Inception network -----------------------------------------------------------------

def _random_inception_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights of the published layout whose activations stay O(1) through the
    net (He-scaled convolutions, batch-norm statistics near (0, 1)), so that a feature
    tolerance means something."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for key, shape in LAYOUT["keys"].items():
        if key.endswith("conv.weight"):
            v = torch.randn(shape, generator=g) * math.sqrt(2.0 / math.prod(shape[1:]))
        elif key.endswith(("bn.weight", "running_var")):
            v = torch.rand(shape, generator=g) + 0.5
        elif key.endswith(("bn.bias", "running_mean")):
            v = torch.randn(shape, generator=g) * 0.1
        else:                            # fc
            v = torch.randn(shape, generator=g) * 0.02
        sd[key] = v
    return sd


@pytest.fixture(scope="session")
def inception_file(tmp_path_factory):
    """A random-weight weights file in pytorch-fid's layout (.pth, as the published one)."""
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(_random_inception_state(), path)
    return path


@pytest.fixture(scope="session")
def inception(inception_file):
    return load_inception(inception_file)


def test_state_dict_layout_is_pytorch_fids():
    ours = {k: list(v.shape) for k, v in InceptionV3().state_dict().items()}
    assert ours == LAYOUT["keys"]
    assert list(ours) == list(LAYOUT["keys"])      # the same order, too
    assert sum(math.prod(s) for s in ours.values()) == 23_885_392


def test_tf1_bilinear_resize_samples_at_i_times_in_over_out():
    # TF1 (no half-pixel centres): outputs read positions 0, 0.5, 1, 1.5 of [a, b]; the last
    # is clamped to b. Half-pixel bilinear (torch, pytorch-fid) would give a, 0.75a + 0.25b, ...
    x = torch.tensor([[[[10.0, 30.0]]]])
    x = x.expand(1, 1, 2, 2).contiguous()
    out = resize_tf1_bilinear(x, 4)
    assert torch.equal(out[0, 0, 0], torch.tensor([10.0, 20.0, 30.0, 30.0]))
    up = resize_tf1_bilinear(torch.arange(3.0).view(1, 1, 3, 1).expand(1, 1, 3, 3), 299)
    pos = torch.arange(299, dtype=torch.float64) * 3 / 299
    assert torch.allclose(up[0, 0, :, 0].double(), pos.clamp_max(2.0), atol=1e-5)


def _fake_torchvision(root):
    """A stand-in `torchvision` with only the names torch-fidelity's imports touch (the real
    one cannot be imported beside this torch)."""
    pkg = root / "torchvision"
    (pkg / "transforms").mkdir(parents=True)
    (pkg / "__init__.py").write_text("from . import datasets, models, transforms\n")
    (pkg / "datasets.py").write_text("class CIFAR10: pass\nclass CIFAR100: pass\n"
                                     "class STL10: pass\n")
    (pkg / "models.py").write_text("")
    (pkg / "transforms" / "__init__.py").write_text("from . import functional\n")
    (pkg / "transforms" / "functional.py").write_text("")


def test_features_equal_torch_fidelity_with_the_same_weights(inception, inception_file,
                                                             tmp_path, monkeypatch):
    for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "torch_fidelity")]:
        monkeypatch.delitem(sys.modules, name)
    _fake_torchvision(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    pytest.importorskip("torch_fidelity")
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    ref = FeatureExtractorInceptionV3("inception-v3-compat", ["2048", "logits_unbiased"],
                                      feature_extractor_weights_path=str(inception_file))
    ref_keys = {k: list(v.shape) for k, v in ref.state_dict().items()
                if not k.endswith("num_batches_tracked")}
    assert ref_keys == LAYOUT["keys"]
    g = torch.Generator().manual_seed(0)
    for shape in ((3, 3, 32, 32), (2, 3, 40, 24)):   # upsampled, and not square
        x = torch.randint(0, 256, shape, generator=g, dtype=torch.uint8)
        ref_pool, ref_logits = ref(x)
        pool, logits = inception(x)
        assert ref_pool.abs().mean() > 0.1            # the random net does not die out
        assert (pool - ref_pool).abs().max() <= 1e-4
        assert (logits - ref_logits).abs().max() <= 1e-4
    # one wrong weight shows
    bad = _random_inception_state()
    bad["Mixed_7c.branch_pool.bn.running_mean"] += 1.0
    net = InceptionV3()
    net.load_state_dict(bad)
    assert (net.eval()(x)[0] - ref_pool).abs().max() > 1e-3


def test_weights_files_are_checked(inception_file, tmp_path, monkeypatch):
    sd = _random_inception_state()
    with_counter = dict(sd, **{"fc.num_batches_tracked": torch.tensor(0)})
    torch.save(with_counter, tmp_path / "with_counter.pth")
    load_inception(tmp_path / "with_counter.pth")          # num_batches_tracked is ignored
    from safetensors.torch import save_file
    save_file(sd, str(tmp_path / "w.safetensors"))
    assert torch.equal(load_inception(tmp_path / "w.safetensors").fc.weight, sd["fc.weight"])
    missing = {k: v for k, v in sd.items() if k != "Mixed_6b.branch1x1.conv.weight"}
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(ConfigError, match="lacks 'Mixed_6b.branch1x1.conv.weight'"):
        load_inception(tmp_path / "missing.pth")
    torch.save(dict(sd, **{"fc.weight": torch.zeros(1000, 2048)}), tmp_path / "shape.pth")
    with pytest.raises(ConfigError, match=r"fc.weight has shape \(1000, 2048\)"):
        load_inception(tmp_path / "shape.pth")
    torch.save({"net": torch.nn.Linear(2, 2)}, tmp_path / "pickled.pth")   # a module: code
    with pytest.raises(ConfigError, match="cannot read Inception weights"):
        load_inception(tmp_path / "pickled.pth")
    (tmp_path / "cut.pth").write_bytes(inception_file.read_bytes()[:1000])
    with pytest.raises(ConfigError, match="cannot read Inception weights"):
        load_inception(tmp_path / "cut.pth")
    monkeypatch.delenv("DDPMKIT_INCEPTION", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "empty_cache"))
    with pytest.raises(ConfigError, match="pt_inception-2015-12-05-6726825d.pth.*--inception"):
        load_inception()
    monkeypatch.setenv("DDPMKIT_INCEPTION", str(tmp_path / "w.safetensors"))
    assert torch.equal(load_inception().fc.weight, sd["fc.weight"])


# ---- sources and streaming -----------------------------------------------------------------

def _u8(n, h, w, c, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, c), dtype=np.uint8)


def test_npz_images_stream_in_batches_and_grey_becomes_rgb(tmp_path):
    imgs = _u8(7, 5, 4, 1)
    np.savez_compressed(tmp_path / "grey.npz", arr_0=imgs)
    src = open_source(str(tmp_path / "grey.npz"))
    got = list(src.batches(3))
    assert [len(b) for b in got] == [3, 3, 1] and src.count == 7
    assert np.array_equal(np.concatenate(got), np.repeat(imgs, 3, axis=3))
    rgb = _u8(4, 6, 6, 3)
    np.save(tmp_path / "nchw.npy", rgb.transpose(0, 3, 1, 2))          # channels first
    got = np.concatenate(list(open_source(str(tmp_path / "nchw.npy")).batches(2)))
    assert np.array_equal(got, rgb)


def test_stats_files_folders_and_bad_inputs(tmp_path):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3))
    st = open_source(str(tmp_path / "stats.npz"))
    assert isinstance(st, Statistics) and st.sigma.shape == (3, 3)
    # an ADM reference batch holds images and statistics: the images are read
    np.savez(tmp_path / "adm.npz", arr_0=_u8(2, 4, 4, 3), mu=np.zeros(3), sigma=np.eye(3))
    assert open_source(str(tmp_path / "adm.npz")).count == 2
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, size in enumerate([(4, 4), (4, 4), (6, 5)]):
        Image.fromarray(_u8(1, size[1], size[0], 3, seed=i)[0]).save(folder / f"{i}.png")
    batches = list(open_source(str(folder)).batches(8))
    assert [b.shape for b in batches] == [(2, 4, 4, 3), (1, 5, 6, 3)]  # a batch per size
    np.savez(tmp_path / "two.npz", a=np.zeros(2), b=np.zeros(2))
    with pytest.raises(DataError, match="expected images under 'arr_0'"):
        open_source(str(tmp_path / "two.npz"))
    np.savez(tmp_path / "float.npz", arr_0=np.zeros((2, 4, 4, 3), np.float32))
    with pytest.raises(DataError, match="uint8"):
        list(open_source(str(tmp_path / "float.npz")).batches(2))
    np.savez(tmp_path / "cut.npz", arr_0=_u8(50, 8, 8, 3))
    with zipfile.ZipFile(tmp_path / "cut.npz") as z:
        raw = z.read("arr_0.npy")
    with zipfile.ZipFile(tmp_path / "cut2.npz", "w") as z:
        z.writestr("arr_0.npy", raw[:-100])
    with pytest.raises(DataError, match="truncated at image 48"):
        list(open_source(str(tmp_path / "cut2.npz")).batches(16))
    with pytest.raises(DataError, match="no such file"):
        open_source(str(tmp_path / "nope.npz"))


class _PixelNet(torch.nn.Module):
    """A cheap stand-in for the Inception net: the images' pixels, tiled (no matmul, whose
    rounding could depend on the batch size)."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(1, 1)   # where the device is read from

    def forward(self, x):
        flat = x.float().flatten(1)
        return flat.repeat(1, 2048)[:, :2048], flat.repeat(1, 1008)[:, :1008]


def test_sample_features_follow_per_sample_seeds_whatever_the_batch_size():
    from ddpmkit import GaussianDiffusion, make_betas, sample

    diffusion = GaussianDiffusion(make_betas("cosine", 20))
    model = lambda x, t: 0.1 * x                     # noqa: E731 - any deterministic net
    net = _PixelNet()
    common = dict(sampler="ddim", steps=5, seed=3, progress=False)
    a = sample_features(model, diffusion, (1, 4, 4), net, 5, batch_size=2, **common)
    b = sample_features(model, diffusion, (1, 4, 4), net, 5, batch_size=5, **common)
    assert torch.equal(a.pool, b.pool) and len(a) == 5
    x = sample(model, diffusion, (5, 1, 4, 4), method="ddim", steps=5, seeds=range(3, 8))
    direct = extract_features(net, [np.repeat(to_uint8(x), 3, axis=3)])
    assert torch.equal(a.pool, direct.pool)


def test_scores_against_statistics_leave_kid_and_pr_out():
    g = torch.Generator().manual_seed(0)
    feats = Features(torch.randn(40, 2048, generator=g), torch.randn(40, 1008, generator=g))
    mu, sigma = feature_stats(feats.pool)
    res = scores(feats, Statistics(mu, sigma, None))
    assert res["fid"] == pytest.approx(0.0, abs=1e-6)
    assert res["kid"] is None and res["precision"] is None and res["num_ref"] is None
    full = scores(feats, feats)
    assert full["fid"] == pytest.approx(0.0, abs=1e-6) and full["precision"] == 1.0


# ---- the commands --------------------------------------------------------------------------

def test_fid_command_json_and_stats_file_agree(inception_file, tmp_path, capsys):
    np.savez(tmp_path / "a.npz", arr_0=_u8(6, 16, 16, 3, seed=1))
    np.savez(tmp_path / "b.npz", arr_0=_u8(6, 12, 12, 1, seed=2))   # grey, another size
    w = ["--inception", str(inception_file), "--no-progress"]
    assert main(["fid", "--samples", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "b.npz"),
                 "--json", "--batch-size", "4", *w]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("fid", "kid", "kid_se", "is", "is_std", "precision", "recall"):
        assert math.isfinite(res[key]), key
    assert res["num_samples"] == res["num_ref"] == 6 and res["fid"] > 0
    assert main(["fid-stats", str(tmp_path / "b.npz"), "--out", str(tmp_path / "s.npz"),
                 *w]) == 0
    with np.load(tmp_path / "s.npz") as st:
        assert st["mu"].shape == (2048,) and st["sigma"].shape == (2048, 2048)
    assert main(["fid", "--samples", str(tmp_path / "a.npz"), "--ref", str(tmp_path / "s.npz"),
                 *w]) == 0
    out = capsys.readouterr().out
    assert f"FID        {res['fid']:.4f}" in out and "KID        n/a" in out


def test_fid_of_a_checkpoint_scores_the_images_that_sample_writes(inception_file, tmp_path,
                                                                   capsys):
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--max-steps", "1", "--model-channels", "16",
                 "--channel-mult", "1,2", "--num-res-blocks", "1", "--attention-resolutions",
                 "4", "--groups", "8", "--timesteps", "40", "--sample-num", "2",
                 "--sample-steps", "2", "--no-progress"]) == 0
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    flags = ["--num", "3", "--batch-size", "2", "--steps", "3", "--seed", "5"]
    w = ["--inception", str(inception_file), "--no-progress", "--ref", str(tmp_path / "ref.npz"),
         "--json"]
    assert main(["fid", "--checkpoint", str(run), *flags, *w]) == 0
    drawn = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert drawn["num_samples"] == 3 and drawn["kid"] is None
    assert main(["sample", "--checkpoint", str(run), *flags, "--out", str(tmp_path / "s.npz"),
                 "--no-progress"]) == 0
    capsys.readouterr()
    assert main(["fid", "--samples", str(tmp_path / "s.npz"), *w]) == 0
    saved = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert drawn["fid"] == pytest.approx(saved["fid"], rel=1e-6)
    assert drawn["is"] == pytest.approx(saved["is"], rel=1e-6)


@pytest.mark.parametrize("args, message", [
    (["--ref", "R"], "exactly one of --checkpoint RUN and --samples"),
    (["--samples", "A", "--checkpoint", "x", "--ref", "R"], "exactly one of"),
    (["--samples", "A", "--ref", "missing.npz"], "missing.npz: no such file"),
    (["--samples", "S", "--ref", "R"], "holds statistics"),
    (["--samples", "A", "--ref", "R", "--inception", "nope.pth"], "nope.pth: no such file"),
])
def test_fid_command_bad_inputs_are_one_line_errors(args, message, tmp_path, capsys,
                                                    monkeypatch):
    monkeypatch.chdir(tmp_path)
    np.savez("A", arr_0=_u8(4, 8, 8, 3))
    np.savez("R", arr_0=_u8(4, 8, 8, 3))
    np.savez("S", mu=np.zeros(2048), sigma=np.eye(2048))
    args = [a + ".npz" if a in ("A", "R", "S") else a for a in args]
    assert main(["fid", *args]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_frechet_distance_from_few_features_takes_the_small_route_exactly():
    g = np.random.default_rng(3)
    a, b = g.normal(size=(12, 30)), g.normal(size=(50, 30)) * 0.7 + 0.1
    (mu1, s1), (mu2, s2) = feature_stats(a), feature_stats(b)
    # the D x D route clips round-off eigenvalues of the singular S1 (~1e-16 each, whose
    # roots add ~1e-8 apiece): the two agree to that
    assert features_fid(a, mu2, s2) == pytest.approx(frechet_distance(mu1, s1, mu2, s2),
                                                     rel=1e-6)


# ---- FID while training --------------------------------------------------------------------

def test_training_logs_fid_rows_and_plots_them(inception_file, tmp_path):
    import csv

    np.savez(tmp_path / "ref.npz", arr_0=_u8(6, 8, 8, 1, seed=4))
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--max-steps", "3", "--model-channels", "16",
                 "--channel-mult", "1,2", "--num-res-blocks", "1", "--attention-resolutions",
                 "4", "--groups", "8", "--timesteps", "40", "--sample-num", "2",
                 "--sample-steps", "2", "--log-every", "2", "--fid-every", "3", "--fid-num", "3",
                 "--fid-ref", str(tmp_path / "ref.npz"), "--fid-inception", str(inception_file),
                 "--no-progress"]) == 0
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    # a row at the log step 2, and one at the FID step 3 (not a log step) holding the FID
    assert [r["step"] for r in rows] == ["2", "3"]
    assert rows[0]["fid"] == "" and float(rows[1]["fid"]) > 0
    assert (run / "loss.png").stat().st_size > 0
    with pytest.raises(ConfigError, match="fid_every=3 needs fid_ref"):
        from ddpmkit.config import TrainConfig
        TrainConfig(fid_every=3)
    assert main(["train", "--out", str(tmp_path / "r2"), "--max-steps", "1", "--fid-every",
                 "1", "--fid-ref", str(tmp_path / "ref.npz"), "--fid-inception",
                 str(tmp_path / "none.pth"), "--no-progress"]) == 2   # before any step
    assert not (tmp_path / "r2" / "checkpoints").exists()
