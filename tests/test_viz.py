"""Tests for ddpmkit.viz: grid arithmetic, exact pixels, PNG/GIF files, plots, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit import viz
from ddpmkit.errors import ConfigError, DataError, DdpmkitError


def _const_batch(values, c=1, h=2, w=3) -> torch.Tensor:
    """Batch [N, C, H, W] whose image i is filled with values[i]."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1, 1, 1).expand(-1, c, h, w).clone()


def _u8(v: float) -> int:
    """Expected pixel for image value v, computed independently of viz (half-to-even rounding)."""
    return int(round((min(max(v, -1.0), 1.0) + 1.0) * 127.5))


def _read(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im)


def _rand(*shape, seed=0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------- make_grid


@pytest.mark.parametrize(
    ("n", "c", "h", "w", "nrow", "padding", "expected"),
    [
        (5, 1, 4, 6, None, 1, (2 * 4 + 3, 3 * 6 + 4, 1)),  # ceil(sqrt(5)) = 3 per row -> 2 rows
        (5, 1, 4, 6, 2, 1, (3 * 4 + 4, 2 * 6 + 3, 1)),  # 2 per row -> 3 rows
        (3, 3, 5, 5, 10, 2, (5 + 2 * 2, 3 * 5 + 4 * 2, 3)),  # nrow > N: one row of 3
        (16, 1, 8, 8, None, 0, (32, 32, 1)),
        (1, 3, 7, 2, None, 1, (9, 4, 3)),
        (10, 1, 1, 1, 4, 1, (3 + 4, 4 + 5, 1)),  # 4 per row -> 3 rows
    ],
)
def test_make_grid_shape_arithmetic(n, c, h, w, nrow, padding, expected):
    grid = viz.make_grid(_rand(n, c, h, w), nrow=nrow, padding=padding)
    assert grid.dtype == np.uint8
    assert grid.shape == expected


def test_make_grid_exact_pixel_values_and_padding():
    img0 = [[-1.0, -0.5], [0.0, 0.5]]
    img1 = [[1.0, 2.0], [-3.0, 0.25]]
    x = torch.tensor([[img0], [img1]])  # [2, 1, 2, 2]
    grid = viz.make_grid(x, nrow=2, padding=1, pad_value=0.75)
    p = 223  # round(1.75 * 127.5) = round(223.125)
    expected = np.array(
        [
            [p, p, p, p, p, p, p],
            [p, 0, 64, p, 255, 255, p],
            [p, 128, 191, p, 0, 159, p],
            [p, p, p, p, p, p, p],
        ],
        dtype=np.uint8,
    )
    assert grid.shape == (4, 7, 1)
    np.testing.assert_array_equal(grid[..., 0], expected)


def test_make_grid_default_padding_is_mid_grey_and_fills_empty_cells():
    x = _const_batch([-1.0, 1.0, -1.0], h=2, w=2)  # 3 images, 2 per row: last cell empty
    grid = viz.make_grid(x, nrow=2)[..., 0]
    assert grid.shape == (7, 7)
    assert grid[0, 0] == 128 and grid[3, 3] == 128 and grid[6, 6] == 128
    np.testing.assert_array_equal(grid[4:6, 4:6], np.full((2, 2), 128))  # empty 4th cell
    np.testing.assert_array_equal(grid[1:3, 1:3], np.zeros((2, 2)))
    np.testing.assert_array_equal(grid[1:3, 4:6], np.full((2, 2), 255))
    np.testing.assert_array_equal(grid[4:6, 1:3], np.zeros((2, 2)))


def test_make_grid_places_images_row_major():
    values = [-1.0, -0.6, -0.2, 0.2, 0.6]
    grid = viz.make_grid(_const_batch(values, h=2, w=3), nrow=3, padding=1)[..., 0]
    for i, v in enumerate(values):
        r, k = divmod(i, 3)
        cell = grid[1 + 3 * r: 3 + 3 * r, 1 + 4 * k: 4 + 4 * k]
        np.testing.assert_array_equal(cell, np.full((2, 3), _u8(v)), err_msg=f"image {i}")


def test_make_grid_rgb_keeps_channel_order():
    x = torch.full((1, 3, 2, 2), -1.0)
    x[:, 0] = 1.0  # red
    x[:, 2] = 0.0  # half blue
    grid = viz.make_grid(x, padding=1, pad_value=-1.0)
    assert grid.shape == (4, 4, 3)
    np.testing.assert_array_equal(grid[1, 1], [255, 0, 128])
    np.testing.assert_array_equal(grid[0, 0], [0, 0, 0])


def test_make_grid_accepts_numpy_half_precision_and_grad_tensors():
    x = _rand(2, 1, 3, 3)
    ref = viz.make_grid(x)
    np.testing.assert_array_equal(viz.make_grid(x.numpy()), ref)
    np.testing.assert_array_equal(viz.make_grid(x.clone().requires_grad_(True)), ref)
    half = viz.make_grid(x.half())
    assert np.abs(half.astype(int) - ref.astype(int)).max() <= 1


def test_make_grid_nan_is_black_and_inf_is_clamped():
    x = torch.tensor([[[[float("nan"), float("inf"), -float("inf")]]]])
    grid = viz.make_grid(x, padding=0)
    np.testing.assert_array_equal(grid[0, :, 0], [0, 255, 0])


# --------------------------------------------------------------------------- save_image_grid


def test_save_image_grid_upscales_8x8_digits_and_png_matches_grid(tmp_path):
    x = _rand(16, 1, 8, 8, seed=1)
    grid = viz.make_grid(x)  # 4 per row: 4*8 + 5 = 37 px
    assert grid.shape == (37, 37, 1)
    out = viz.save_image_grid(x, tmp_path / "deep" / "er" / "digits.png")
    assert out == tmp_path / "deep" / "er" / "digits.png"
    png = _read(out)
    s = 7  # smallest integer with 37 * s >= 256
    assert png.shape == (37 * s, 37 * s)
    assert png.shape[1] >= 256
    np.testing.assert_array_equal(png, np.repeat(np.repeat(grid[..., 0], s, 0), s, 1))
    # each source pixel is a uniform s x s block (nearest neighbour, no blur)
    block = png[s * 5: s * 6, s * 9: s * 10]
    assert (block == grid[5, 9, 0]).all()


def test_save_image_grid_explicit_scale_and_rgb_roundtrip(tmp_path):
    x = _rand(5, 3, 6, 4, seed=2)
    grid = viz.make_grid(x, nrow=2)
    png = _read(viz.save_image_grid(x, str(tmp_path / "rgb.png"), nrow=2, scale=1))
    assert png.shape == grid.shape
    np.testing.assert_array_equal(png, grid)
    png3 = _read(viz.save_image_grid(x, tmp_path / "rgb3.png", nrow=2, scale=3))
    assert png3.shape == (grid.shape[0] * 3, grid.shape[1] * 3, 3)
    np.testing.assert_array_equal(png3[::3, ::3], grid)


def test_save_image_grid_does_not_upscale_large_images(tmp_path):
    x = _rand(2, 1, 8, 200)
    png = _read(viz.save_image_grid(x, tmp_path / "big.png"))
    assert png.shape == viz.make_grid(x).shape[:2]


def test_atomic_write_overwrites_leaves_no_temp_files_and_normal_permissions(tmp_path):
    path = tmp_path / "g.png"
    path.write_bytes(b"old junk")
    viz.save_image_grid(_rand(1, 1, 4, 4), path, scale=1)
    assert _read(path).shape == (6, 6)
    assert os.listdir(tmp_path) == ["g.png"]
    umask = os.umask(0)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_failed_write_keeps_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "keep.png"
    path.write_bytes(b"previous")

    def boom(self, fp, format=None, **kw):  # noqa: A002 - mirrors PIL's signature
        fp.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        viz.save_image_grid(_rand(1, 1, 4, 4), path)
    assert path.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["keep.png"]


# --------------------------------------------------------------------------- save_strip


def test_strip_size_is_rows_by_cols_and_cells_hold_the_right_frame(tmp_path):
    n, f, h, w, s = 3, 4, 8, 8, 2
    # frame j of example i is a constant image with value vals[i][j]
    vals = np.linspace(-1, 1, n * f).reshape(n, f)
    frames = [_const_batch(list(vals[:, j]), h=h, w=w) for j in range(f)]
    png = _read(viz.save_strip(frames, tmp_path / "strip.png", scale=s))
    assert png.shape == ((n * h + n + 1) * s, (f * w + f + 1) * s)
    for i in range(n):
        for j in range(f):
            y, x = (1 + i * (h + 1)) * s, (1 + j * (w + 1)) * s
            cell = png[y: y + h * s, x: x + w * s]
            assert (cell == _u8(vals[i, j])).all(), (i, j)


def test_strip_labels_add_a_text_band_above_the_same_picture(tmp_path):
    frames = [_rand(2, 1, 8, 8, seed=k) for k in range(3)]
    plain = _read(viz.save_strip(frames, tmp_path / "plain.png", scale=4))
    labelled = _read(viz.save_strip(frames, tmp_path / "lab.png", labels=["t=0", "t=5", "t=9"],
                                    scale=4))
    band = labelled.shape[0] - plain.shape[0]
    assert labelled.shape[1] == plain.shape[1]
    assert 5 < band < 40
    np.testing.assert_array_equal(labelled[band:], plain)
    top = labelled[:band]
    assert (top == 255).mean() > 0.5  # white background
    assert (top < 128).any()  # dark text was drawn
    # each column got its own label: dark pixels over every column's span
    col_w = (8 + 1) * 4
    for j in range(3):
        assert (top[:, j * col_w: (j + 1) * col_w] < 128).any(), j


def test_strip_auto_scale_makes_columns_wide_enough_for_labels(tmp_path):
    frames = [_rand(1, 1, 8, 8, seed=k) for k in range(20)]  # 181 px wide at scale 1
    plain = _read(viz.save_strip(frames, tmp_path / "a.png"))
    assert plain.shape[1] == 181 * 2  # smallest scale reaching 256 px
    labelled = _read(viz.save_strip(frames, tmp_path / "b.png", labels=["t=1000"] * 20))
    assert labelled.shape[1] > plain.shape[1]
    assert labelled.shape[1] % 181 == 0


def test_strip_rgb(tmp_path):
    frames = [_rand(2, 3, 5, 5, seed=k) for k in range(2)]
    png = _read(viz.save_strip(frames, tmp_path / "rgb.png", labels=["a", "b"], scale=1))
    assert png.ndim == 3 and png.shape[2] == 3
    assert png.shape[1] == 2 * 5 + 3


# --------------------------------------------------------------------------- save_gif


def test_gif_has_one_frame_per_step_with_exact_grey_pixels_and_long_last_frame(tmp_path):
    frames = [_rand(4, 1, 8, 8, seed=k) for k in range(6)]
    out = viz.save_gif(frames, tmp_path / "anim" / "rev.gif", duration_ms=60, scale=2,
                       hold_last_ms=900)
    with Image.open(out) as im:
        assert im.format == "GIF"
        assert im.n_frames == 6
        assert im.size == ((2 * 8 + 3) * 2, (2 * 8 + 3) * 2)
        durations = []
        for k in range(im.n_frames):
            im.seek(k)
            durations.append(im.info["duration"])
            grid = viz.make_grid(frames[k])[..., 0]
            got = np.asarray(im.convert("L"))
            np.testing.assert_array_equal(got, np.repeat(np.repeat(grid, 2, 0), 2, 1))
    assert durations == [60] * 5 + [900]


def test_gif_rgb_and_default_scale(tmp_path):
    frames = [_rand(9, 3, 8, 8, seed=k) for k in range(3)]
    with Image.open(viz.save_gif(frames, tmp_path / "c.gif", nrow=9)) as im:
        assert im.n_frames == 3
        assert im.size[0] >= 256
        assert im.size[0] == (9 * 8 + 10) * 4


# --------------------------------------------------------------------------- plots


def _assert_png(path: Path) -> tuple[int, int]:
    assert path.is_file() and path.stat().st_size > 1000
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
        return im.size


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n")
    return path


def test_loss_curve_with_missing_cells(tmp_path):
    rows = ["step,loss,lr,grad_norm"]
    for s in range(0, 400, 10):
        lr = "" if s % 30 else "0.001"
        rows.append(f"{s},{1.0 / (1 + s / 40):.5f},{lr},")
    rows.append("400,,,")
    rows.append(",0.5,,")  # no step: skipped
    csv_path = _write_csv(tmp_path / "metrics.csv", "\n".join(rows))
    out = viz.plot_loss_curve(csv_path, tmp_path / "plots" / "loss.png", keys=("loss", "lr"))
    assert out == tmp_path / "plots" / "loss.png"
    _assert_png(out)


def test_loss_curve_quartile_panel_makes_a_taller_figure(tmp_path):
    plain = _write_csv(tmp_path / "a.csv", "step,loss\n" + "\n".join(
        f"{s},{2.0 - s / 100}" for s in range(100)))
    quart = _write_csv(tmp_path / "b.csv", "step,loss,loss_q0,loss_q1,loss_q2,loss_q3\n" +
                       "\n".join(f"{s},{2 - s / 100},{s % 7 + 1},,{s % 5 + 1},{0.1}"
                                 for s in range(100)))
    w1, h1 = _assert_png(viz.plot_loss_curve(plain, tmp_path / "a.png", smooth=0.0))
    w2, h2 = _assert_png(viz.plot_loss_curve(quart, tmp_path / "b.png"))
    assert w1 == w2
    assert h2 > h1 * 1.4


def test_loss_curve_single_point_and_string_key(tmp_path):
    csv_path = _write_csv(tmp_path / "m.csv", "step, loss \n0, 0.7\n")
    _assert_png(viz.plot_loss_curve(csv_path, tmp_path / "one.png", keys="loss"))


@pytest.mark.parametrize(
    ("text", "keys", "match"),
    [
        ("step,loss\n0,1\n", ("nope",), "nope"),
        ("iteration,loss\n0,1\n", ("loss",), "'step'"),
        ("step,loss\n0,1\n10,abc\n", ("loss",), ":3: column 'loss'"),
        ("step,loss\n0,\n10,\n", ("loss",), "no numeric values"),
        ("", ("loss",), "empty"),
    ],
)
def test_loss_curve_bad_csv_raises(tmp_path, text, keys, match):
    csv_path = tmp_path / "m.csv"
    csv_path.write_text(text)
    with pytest.raises(DataError, match=match):
        viz.plot_loss_curve(csv_path, tmp_path / "x.png", keys=keys)
    assert not (tmp_path / "x.png").exists()


def test_loss_curve_missing_file_and_bad_smooth(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        viz.plot_loss_curve(tmp_path / "missing.csv", tmp_path / "x.png")
    csv_path = _write_csv(tmp_path / "m.csv", "step,loss\n0,1\n")
    with pytest.raises(ConfigError, match="smooth"):
        viz.plot_loss_curve(csv_path, tmp_path / "x.png", smooth=1.0)


def test_smoothing_keeps_constants_and_has_no_lag():
    np.testing.assert_allclose(viz._smooth([3.0] * 20, 0.9), 3.0)
    np.testing.assert_array_equal(viz._smooth([1.0, 5.0, 2.0], 0.0), [1.0, 5.0, 2.0])
    ramp = np.arange(101, dtype=float)
    sm = viz._smooth(list(ramp), 0.8)
    assert abs(sm[50] - 50.0) < 1e-6  # symmetric kernel: a straight line is not delayed
    assert viz._ema(list(ramp), 0.8)[50] < 47  # whereas a one-sided EMA lags


def test_plot_points_with_and_without_data(tmp_path):
    g = torch.Generator().manual_seed(0)
    samples = torch.randn(300, 2, generator=g)
    samples[0, 0] = float("nan")
    _assert_png(viz.plot_points(samples, tmp_path / "s.png"))
    data = np.random.default_rng(0).normal(size=(1000, 2))
    w, h = _assert_png(viz.plot_points(samples.numpy(), tmp_path / "sd.png", data=data,
                                       title="moons"))
    assert w > 100 and h > 100


def test_plot_quality_vs_steps(tmp_path):
    results = {
        "ddim": [(50, 1.3), (10, 3.1), (20, 2.0)],
        "ancestral": [(1000, 1.0), (100, 2.5)],
        "heun": [(19, float("nan")), (39, 1.2)],
    }
    _assert_png(viz.plot_quality_vs_steps(results, tmp_path / "q" / "q.png", ylabel="FID"))


@pytest.mark.parametrize(
    "results",
    [{}, {"ddim": []}, {"ddim": [(0, 1.0)]}, {"ddim": [(10, "bad")]}, {"ddim": [10, 20]}],
)
def test_plot_quality_vs_steps_bad_input(tmp_path, results):
    with pytest.raises(DataError):
        viz.plot_quality_vs_steps(results, tmp_path / "q.png")


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("x", "match"),
    [
        (torch.zeros(1, 8, 8), r"\[N, C, H, W\].*unsqueeze"),
        (torch.zeros(2, 2, 8, 8), "C=2"),
        (torch.zeros(2, 4, 8, 8), "C=4"),
        (torch.zeros(1, 1, 1, 8, 8), r"\[N, C, H, W\]"),
        (torch.zeros(0, 1, 8, 8), "empty"),
        (torch.zeros(1, 1, 8, 8, dtype=torch.uint8), "floats"),
        (np.zeros((1, 1, 8, 8), dtype=np.int64), "floats"),
        ([[[[0.0]]]], "tensor or numpy"),
    ],
)
def test_bad_image_shapes_raise(x, match):
    with pytest.raises(DataError, match=match) as info:
        viz.make_grid(x)
    assert isinstance(info.value, DdpmkitError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("save", [viz.save_strip, viz.save_gif])
def test_bad_frames_raise(tmp_path, save):
    out = tmp_path / "x.out"
    with pytest.raises(DataError, match="empty"):
        save([], out)
    with pytest.raises(DataError, match=r"frames\[0\] is \[2, 1, 8, 8\] but frames\[1\] is \[3, 1, 8, 8\]"):
        save([torch.zeros(2, 1, 8, 8), torch.zeros(3, 1, 8, 8)], out)
    with pytest.raises(DataError, match="same shape"):
        save([torch.zeros(2, 1, 8, 8), torch.zeros(2, 3, 8, 8)], out)
    with pytest.raises(DataError, match=r"frames\[0\]"):
        save([torch.zeros(1, 8, 8)], out)
    with pytest.raises(DataError, match="wrap it in a list"):
        save(torch.zeros(2, 1, 8, 8), out)
    assert not out.exists()


def test_bad_options_raise(tmp_path):
    x = torch.zeros(2, 1, 4, 4)
    with pytest.raises(ConfigError, match="nrow"):
        viz.make_grid(x, nrow=0)
    with pytest.raises(ConfigError, match="padding"):
        viz.make_grid(x, padding=-1)
    with pytest.raises(ConfigError, match="scale"):
        viz.save_image_grid(x, tmp_path / "a.png", scale=0)
    with pytest.raises(ConfigError, match="scale"):
        viz.save_image_grid(x, tmp_path / "a.png", scale=1.5)
    with pytest.raises(DataError, match="2 labels for 1 frames"):
        viz.save_strip([x], tmp_path / "s.png", labels=["a", "b"])
    with pytest.raises(DataError, match=r"\[N, 2\]"):
        viz.plot_points(torch.zeros(5, 3), tmp_path / "p.png")
    with pytest.raises(DataError, match=r"\[N, 2\]"):
        viz.plot_points(torch.zeros(5), tmp_path / "p.png")
    with pytest.raises(DataError, match="data"):
        viz.plot_points(torch.zeros(5, 2), tmp_path / "p.png", data=np.zeros((0, 2)))
    assert list(tmp_path.iterdir()) == []


def test_importing_viz_does_not_import_matplotlib():
    code = "import sys, ddpmkit.viz; sys.exit('matplotlib' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], timeout=60).returncode == 0
