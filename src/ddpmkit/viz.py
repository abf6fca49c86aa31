"""Pictures people look at: image grids, noising strips, GIFs and metric plots.

Images come in as float tensors (or arrays) in ``[-1, 1]`` with shape ``[N, C, H, W]``,
``C`` being 1 (grey) or 3 (RGB). Pixel values are mapped ``[-1, 1] -> [0, 255]`` as
``round((clamp(x, -1, 1) + 1) * 127.5)`` (round half to even; NaN counts as -1).

Every ``save_*``/``plot_*`` function accepts a ``str`` or :class:`~pathlib.Path`, creates the
parent folders, writes atomically (a temporary file in the same folder, then ``os.replace``)
and returns the path as a :class:`~pathlib.Path`. matplotlib is imported only inside the plot
functions and draws through its Agg canvas directly (never ``pyplot``), so importing ddpmkit
stays fast and no global backend state is touched.
"""

from __future__ import annotations

import csv
import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from .errors import ConfigError, DataError
from .outputs import atomic_write

__all__ = [
    "make_grid",
    "plot_loss_curve",
    "plot_points",
    "plot_quality_vs_steps",
    "save_gif",
    "save_image_grid",
    "save_strip",
]

PathLike = str | os.PathLike
ImageBatch = torch.Tensor | np.ndarray

#: Auto-scaling upscales (nearest neighbour, integer factor) until a picture is this wide.
MIN_WIDTH = 256

_QUARTILE_COLUMN = re.compile(r"^loss_q(\d+)$")


# --------------------------------------------------------------------------- validation


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ConfigError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


def _images_to_uint8(x: Any, what: str = "images") -> np.ndarray:
    """Validate a ``[N, C, H, W]`` float batch in [-1, 1]; return uint8 ``[N, H, W, C]``."""
    if isinstance(x, np.ndarray):
        if not np.issubdtype(x.dtype, np.floating):
            raise DataError(f"{what} must be floats in [-1, 1], got a {x.dtype} array")
        t = torch.from_numpy(np.asarray(x, dtype=np.float64))
    elif isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise DataError(f"{what} must be floats in [-1, 1], got a {x.dtype} tensor")
        t = x.detach().to(device="cpu", dtype=torch.float64)
    else:
        raise DataError(f"{what} must be a torch tensor or numpy array, got {type(x).__name__}")
    if t.ndim != 4:
        hint = " (add a batch dimension, e.g. x.unsqueeze(0))" if t.ndim == 3 else ""
        raise DataError(f"{what} must have shape [N, C, H, W], got {list(t.shape)}{hint}")
    n, c, h, w = t.shape
    if c not in (1, 3):
        raise DataError(
            f"{what} must have 1 or 3 channels (shape [N, C, H, W]), got C={c} "
            f"in shape {list(t.shape)}")
    if n == 0 or h == 0 or w == 0:
        raise DataError(f"{what} is empty: shape {list(t.shape)}")
    t = torch.nan_to_num(t, nan=-1.0).clamp(-1.0, 1.0)
    u8 = ((t + 1.0) * 127.5).round().to(torch.uint8)
    return u8.permute(0, 2, 3, 1).contiguous().numpy()


def _pad_to_uint8(pad_value: float) -> int:
    try:
        v = float(pad_value)
    except (TypeError, ValueError):
        raise ConfigError(f"pad_value={pad_value!r} must be a number in [-1, 1]") from None
    if not math.isfinite(v):
        raise ConfigError(f"pad_value={pad_value!r} must be finite")
    v = min(max(v, -1.0), 1.0)
    return int(torch.tensor((v + 1.0) * 127.5, dtype=torch.float64).round().item())


def _grid_uint8(imgs: np.ndarray, nrow: int | None, padding: int, pad_u8: int) -> np.ndarray:
    n, h, w, c = imgs.shape
    ncol = math.ceil(math.sqrt(n)) if nrow is None else _check_int("nrow", nrow, 1)
    ncol = min(ncol, n)
    nrows = math.ceil(n / ncol)
    p = _check_int("padding", padding, 0)
    grid = np.full((nrows * h + (nrows + 1) * p, ncol * w + (ncol + 1) * p, c), pad_u8, np.uint8)
    for i in range(n):
        r, k = divmod(i, ncol)
        y, x = p + r * (h + p), p + k * (w + p)
        grid[y:y + h, x:x + w] = imgs[i]
    return grid


def _auto_scale(width: int, scale: int | None) -> int:
    if scale is not None:
        return _check_int("scale", scale, 1)
    return max(1, math.ceil(MIN_WIDTH / width))


def _upscale(a: np.ndarray, s: int) -> np.ndarray:
    return a if s == 1 else np.repeat(np.repeat(a, s, axis=0), s, axis=1)


def _to_pil(a: np.ndarray) -> Image.Image:
    """uint8 ``[H, W, C]`` -> PIL image in mode "L" (C=1) or "RGB" (C=3)."""
    return Image.fromarray(np.ascontiguousarray(a[..., 0] if a.shape[2] == 1 else a))


def _frame_list(frames: Any) -> list:
    if isinstance(frames, (torch.Tensor, np.ndarray)) and frames.ndim == 4:
        raise DataError(
            "frames must be a list of [N, C, H, W] batches, got a single 4-D batch "
            f"of shape {list(frames.shape)} (wrap it in a list)")
    try:
        out = list(frames)
    except TypeError:
        raise DataError(
            f"frames must be a list of [N, C, H, W] batches, got {type(frames).__name__}"
        ) from None
    if not out:
        raise DataError("frames is an empty list: need at least one [N, C, H, W] batch")
    return out


def _frames_to_uint8(frames: Any) -> list[np.ndarray]:
    arrays = [_images_to_uint8(f, what=f"frames[{i}]") for i, f in enumerate(_frame_list(frames))]
    first = arrays[0].shape
    for i, a in enumerate(arrays[1:], start=1):
        if a.shape != first:
            n, h, w, c = first
            n2, h2, w2, c2 = a.shape
            raise DataError(
                f"all frames must have the same shape: frames[0] is {[n, c, h, w]} "
                f"but frames[{i}] is {[n2, c2, h2, w2]}")
    return arrays


# --------------------------------------------------------------------------- file writing


def _atomic_write(path: PathLike, write: Callable[[IO[bytes]], None]) -> Path:
    """Through a fresh temporary file and a rename: a link at ``path`` is replaced, never
    followed (:func:`ddpmkit.outputs.atomic_write`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return atomic_write(path, write)


def _save_png(img: Image.Image, path: PathLike) -> Path:
    return _atomic_write(path, lambda f: img.save(f, format="PNG"))


def _save_figure(fig: Any, path: PathLike) -> Path:
    return _atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=100))


def _new_figure(figsize: tuple[float, float]) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


# --------------------------------------------------------------------------- image grids


def make_grid(
    x: ImageBatch, nrow: int | None = None, padding: int = 1, pad_value: float = 0.0
) -> np.ndarray:
    """Tile a batch into one picture.

    Args:
        x: images ``[N, C, H, W]``, floats in [-1, 1], C = 1 or 3.
        nrow: images per row (the number of grid columns); default ``ceil(sqrt(N))``.
        padding: pixels of ``pad_value`` between images and around the border.
        pad_value: padding colour in image units ([-1, 1]); the default 0.0 is mid grey (128).

    Returns:
        uint8 array ``[H', W', C]`` with ``rows = ceil(N / cols)``, ``cols = min(nrow, N)``,
        ``H' = rows*H + (rows+1)*padding`` and ``W' = cols*W + (cols+1)*padding``. Cells
        after the last image are filled with ``pad_value``.
    """
    return _grid_uint8(_images_to_uint8(x), nrow, padding, _pad_to_uint8(pad_value))


def save_image_grid(
    x: ImageBatch, path: PathLike, nrow: int | None = None, scale: int | None = None
) -> Path:
    """Save ``make_grid(x, nrow)`` (``x``: ``[N, C, H, W]``) as a PNG.

    Each grid pixel becomes a ``scale x scale`` block (nearest neighbour). By default ``scale``
    is the smallest integer making the PNG at least ``MIN_WIDTH`` (256) pixels wide, so 8x8
    digits are big enough to see; pass ``scale=1`` for the raw grid.
    """
    grid = make_grid(x, nrow=nrow)
    s = _auto_scale(grid.shape[1], scale)
    return _save_png(_to_pil(_upscale(grid, s)), path)


def save_strip(
    frames: Sequence[ImageBatch],
    path: PathLike,
    labels: Sequence[str] | None = None,
    scale: int | None = None,
) -> Path:
    """Save a table of images as a PNG: one row per example, one column per frame.

    Args:
        frames: F batches, each ``[N, C, H, W]`` with the same shape (e.g. x_0 and x_t at
            several t). The picture is ``make_grid`` of the N*F images with F per row, so it is
            ``(N*H + (N+1)) * scale`` pixels high (plus the label band) and
            ``(F*W + (F+1)) * scale`` wide.
        labels: optional F strings (e.g. ``"t=250"``) drawn in a white band above the columns.
        scale: integer upscale factor; default: at least ``MIN_WIDTH`` pixels wide, and each
            column at least as wide as its label.
    """
    arrays = _frames_to_uint8(frames)
    f = len(arrays)
    n, h, w, c = arrays[0].shape
    if labels is not None:
        labels = [labels] if isinstance(labels, str) else list(labels)
        if len(labels) != f:
            raise DataError(f"got {len(labels)} labels for {f} frames: need one label per frame")
        labels = [str(s) for s in labels]
    # [F, N, H, W, C] -> [N, F, H, W, C]: example-major so each row is one example.
    tiles = np.stack(arrays, axis=1).reshape(n * f, h, w, c)
    padding = 1
    grid = _grid_uint8(tiles, f, padding, _pad_to_uint8(0.0))

    font = ImageFont.load_default() if labels else None
    boxes = [font.getbbox(s) for s in labels] if labels else []
    s = _auto_scale(grid.shape[1], scale)
    if scale is None and boxes:
        widest = max(b[2] - b[0] for b in boxes)
        s = max(s, math.ceil((widest + 4) / w))
    body = _to_pil(_upscale(grid, s))
    if not labels:
        return _save_png(body, path)

    margin = 3
    text_h = max(b[3] - b[1] for b in boxes)
    band = text_h + 2 * margin
    white, black = (255, 0) if c == 1 else ((255, 255, 255), (0, 0, 0))
    out = Image.new(body.mode, (body.width, band + body.height), white)
    out.paste(body, (0, band))
    draw = ImageDraw.Draw(out)
    for j, (text, (left, top, right, _)) in enumerate(zip(labels, boxes, strict=True)):
        centre = (padding + j * (w + padding) + w / 2) * s
        draw.text((round(centre - (right - left) / 2 - left), margin - top), text,
                  fill=black, font=font)
    return _save_png(out, path)


def save_gif(
    frames: Sequence[ImageBatch],
    path: PathLike,
    duration_ms: int = 80,
    nrow: int | None = None,
    scale: int | None = None,
    hold_last_ms: int = 1500,
) -> Path:
    """Save an animated, looping GIF whose frame k is the grid of ``frames[k]``.

    Args:
        frames: batches ``[N, C, H, W]`` of the same shape, one per animation step (e.g. x_t
            along the forward noising or the reverse denoising chain).
        duration_ms: display time of each frame (GIF stores hundredths of a second).
        nrow, scale: as in :func:`save_image_grid` (same grid and scale for every frame).
        hold_last_ms: display time of the last frame (at least ``duration_ms``).

    Note: the GIF encoder merges consecutive frames that are pixel-identical after 8-bit
    rounding (adding up their durations), so the file can hold fewer frames than given.
    """
    arrays = _frames_to_uint8(frames)
    duration_ms = _check_int("duration_ms", duration_ms, 1)
    hold_last_ms = _check_int("hold_last_ms", hold_last_ms, 0)
    pad = _pad_to_uint8(0.0)
    grids = [_grid_uint8(a, nrow, 1, pad) for a in arrays]
    s = _auto_scale(grids[0].shape[1], scale)
    images = [_to_pil(_upscale(g, s)) for g in grids]
    durations = [duration_ms] * (len(images) - 1) + [max(duration_ms, hold_last_ms)]

    def write(f: IO[bytes]) -> None:
        images[0].save(f, format="GIF", save_all=True, append_images=images[1:],
                       duration=durations, loop=0, optimize=False)

    return _atomic_write(path, write)


# --------------------------------------------------------------------------- plots


def _load_metrics_csv(csv_path: Path) -> tuple[list[str], list[list[str]]]:
    """Read a metrics CSV: (header, data rows); the header must include ``step``."""
    try:
        with open(csv_path, newline="", encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader, None)
            rows = list(reader)
    except FileNotFoundError:
        raise DataError(f"metrics file {str(csv_path)!r} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DataError(f"cannot read metrics file {str(csv_path)!r}: {e}") from None
    if not header:
        raise DataError(f"metrics file {str(csv_path)!r} is empty (no header row)")
    header = [h.strip() for h in header]
    if "step" not in header:
        raise DataError(f"metrics file {str(csv_path)!r} has no 'step' column "
                        f"(columns: {', '.join(header)})")
    return header, rows


def _metric_columns(
    csv_path: Path, header: list[str], rows: list[list[str]], wanted: Sequence[str]
) -> dict[str, tuple[list[float], list[float]]]:
    """Return ``{column: (steps, values)}`` for each wanted column, skipping empty cells."""
    missing = [k for k in wanted if k not in header]
    if missing:
        raise DataError(f"metrics file {str(csv_path)!r} has no column(s) {', '.join(missing)} "
                        f"(columns: {', '.join(header)})")

    def number(row: list[str], lineno: int, col: str) -> float | None:
        i = header.index(col)
        cell = row[i].strip() if i < len(row) else ""
        if not cell:
            return None
        try:
            v = float(cell)
        except ValueError:
            raise DataError(f"{csv_path}:{lineno}: column {col!r}: {cell!r} is not a number"
                            ) from None
        return v if math.isfinite(v) else None

    out: dict[str, tuple[list[float], list[float]]] = {k: ([], []) for k in wanted}
    for lineno, row in enumerate(rows, start=2):
        if not any(cell.strip() for cell in row):
            continue
        step = number(row, lineno, "step")
        if step is None:
            continue
        for k in wanted:
            v = number(row, lineno, k)
            if v is not None:
                out[k][0].append(step)
                out[k][1].append(v)
    return out


def _ema(values: Sequence[float], smooth: float) -> np.ndarray:
    """Exponential moving average with bias correction (TensorBoard-style smoothing)."""
    out = np.empty(len(values))
    acc, weight = 0.0, 0.0
    for i, v in enumerate(values):
        acc = smooth * acc + (1.0 - smooth) * v
        weight = smooth * weight + (1.0 - smooth)
        out[i] = acc / weight
    return out


def _smooth(values: Sequence[float], smooth: float) -> np.ndarray:
    """Two-sided exponential smoothing (mean of a forward and a backward EMA): no lag."""
    if smooth == 0.0:
        return np.asarray(values, dtype=np.float64)
    # `smooth` is tuned for long logs; on a short one (a few dozen rows, each already a
    # window mean) the same weight would bend a decaying curve off its points.
    smooth = smooth ** max(1.0, 200 / max(len(values), 1))
    return 0.5 * (_ema(values, smooth) + _ema(values[::-1], smooth)[::-1])


def _plot_series(ax: Any, series: dict[str, tuple[list, list]], smooth: float) -> None:
    values: list[float] = []
    for name, (steps, vals) in series.items():
        if not steps:
            continue
        marker = "o" if len(steps) == 1 else None
        if smooth == 0.0:
            ax.plot(steps, vals, linewidth=1.5, marker=marker, label=name)
        else:
            raw = ax.plot(steps, vals, alpha=0.3, linewidth=1, marker=marker)
            ax.plot(steps, _smooth(vals, smooth), color=raw[0].get_color(), linewidth=1.8,
                    label=name)
        values.extend(vals)
    if values and min(values) > 0:
        ax.set_yscale("log")
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(loc="best", fontsize="small")


def plot_loss_curve(
    csv_path: PathLike,
    png_path: PathLike,
    keys: Sequence[str] = ("loss",),
    smooth: float = 0.9,
    panels: Sequence[str] = (),
) -> Path:
    """Plot training metrics from a CSV file against ``step``, saved as a PNG.

    The CSV needs a header row with a ``step`` column; empty cells are skipped. Each column in
    ``keys`` is drawn raw (faint) and smoothed (solid) by two-sided exponential smoothing with
    weight ``smooth`` in [0, 1) (0: none; higher: smoother; the curve does not lag the data).
    The y axis is logarithmic when every plotted value is positive. If columns ``loss_q0``,
    ``loss_q1``, ... (loss by timestep quartile, q0 = smallest t) exist, a second panel shows
    them. Each column of ``panels`` (such as ``fid``) gets a panel of its own below, drawn
    unsmoothed with markers (a few points, on a scale of their own); columns that are absent
    or empty are left out.
    """
    keys = [keys] if isinstance(keys, str) else list(keys)
    if not keys:
        raise ConfigError("keys is empty: name at least one CSV column to plot")
    try:
        smooth = float(smooth)
    except (TypeError, ValueError):
        raise ConfigError(f"smooth={smooth!r} must be a number in [0, 1)") from None
    if not 0.0 <= smooth < 1.0:
        raise ConfigError(f"smooth={smooth!r} must be in [0, 1)")
    csv_path = Path(csv_path)
    header, rows = _load_metrics_csv(csv_path)
    quartiles = sorted((c for c in header if _QUARTILE_COLUMN.match(c)),
                       key=lambda c: int(_QUARTILE_COLUMN.match(c).group(1)))
    data = _metric_columns(csv_path, header, rows, list(dict.fromkeys(keys + quartiles)))
    main = {k: data[k] for k in keys}
    if not any(steps for steps, _ in main.values()):
        raise DataError(f"metrics file {str(csv_path)!r} has no numeric values in column(s) "
                        f"{', '.join(keys)}")
    quart = {q: data[q] for q in quartiles if data[q][0]}
    present = [p for p in panels if p in header and p not in keys]
    extra = {p: v for p, v in _metric_columns(csv_path, header, rows, present).items() if v[0]}

    n_axes = 1 + bool(quart) + len(extra)
    fig = _new_figure((7.5, 4.2 + 2.8 * (n_axes - 1)))
    axes = list(fig.subplots(n_axes, 1, sharex=True)) if n_axes > 1 else [fig.subplots()]
    _plot_series(axes[0], main, smooth)
    axes[0].set_ylabel(keys[0] if len(keys) == 1 else "value")
    axes[0].set_title(f"{', '.join(keys)} vs step ({csv_path.name}"
                      + (f", smoothing {smooth:g})" if smooth else ")"))
    if quart:
        _plot_series(axes[1], quart, smooth)
        axes[1].set_ylabel("loss")
        axes[1].set_title("loss by timestep quartile (q0 = smallest t)")
    for ax, (name, (steps, vals)) in zip(axes[1 + bool(quart):], extra.items(), strict=True):
        ax.plot(steps, vals, marker="o", linewidth=1.5, label=name)
        ax.set_ylabel(name)
        ax.set_title(f"{name} vs step")
        ax.grid(True, which="major", alpha=0.3)
    axes[-1].set_xlabel("step")
    return _save_figure(fig, png_path)


def _points(a: Any, what: str) -> np.ndarray:
    if isinstance(a, torch.Tensor):
        a = a.detach().to(device="cpu", dtype=torch.float64).numpy()
    try:
        arr = np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError):
        raise DataError(f"{what} must be numbers of shape [N, 2]") from None
    if arr.ndim != 2 or arr.shape[1] != 2:
        raise DataError(f"{what} must have shape [N, 2], got {list(arr.shape)}")
    if arr.shape[0] == 0:
        raise DataError(f"{what} is empty: shape {list(arr.shape)}")
    return arr


def plot_points(
    samples: ImageBatch,
    path: PathLike,
    data: ImageBatch | None = None,
    title: str | None = None,
    labels: ImageBatch | None = None,
) -> Path:
    """Scatter plot of 2-D ``samples`` ``[N, 2]`` over optional faint ``data`` ``[M, 2]``.

    Equal aspect; non-finite samples are dropped and counted in the title. ``labels`` [N]
    (class of each sample, e.g. from ``sample --class all``) colour the points by class.
    """
    pts = _points(samples, "samples")
    ref = None if data is None else _points(data, "data")
    finite = np.isfinite(pts).all(axis=1)
    dropped = int((~finite).sum())
    pts = pts[finite]
    colour = "tab:blue"
    if labels is not None:
        classes = np.asarray(labels).reshape(-1)
        if classes.shape[0] != finite.shape[0]:
            raise DataError(f"got {classes.shape[0]} labels for {finite.shape[0]} points")
        colour = [f"C{int(k) % 10}" for k in classes[finite]]

    fig = _new_figure((5.5, 5.5))
    ax = fig.subplots()
    size = 4.0 if len(pts) > 2000 else 8.0
    if ref is not None:
        ref = ref[np.isfinite(ref).all(axis=1)]
        ax.scatter(ref[:, 0], ref[:, 1], s=size, c="0.6", alpha=0.25, linewidths=0, label="data")
    ax.scatter(pts[:, 0], pts[:, 1], s=size, c=colour, alpha=0.7, linewidths=0,
               label="samples")
    ax.set_aspect("equal", adjustable="datalim")
    ax.grid(True, alpha=0.3)
    if ref is not None:
        ax.legend(loc="upper right", fontsize="small", markerscale=2)
    text = title if title is not None else f"{len(pts)} samples"
    if dropped:
        text += f" ({dropped} non-finite dropped)"
    ax.set_title(text)
    return _save_figure(fig, path)


def plot_quality_vs_steps(
    results: Mapping[str, Sequence[tuple[int, float]]],
    path: PathLike,
    xlabel: str = "network calls",
    ylabel: str = "metric",
) -> Path:
    """Plot a quality metric against the number of steps, one line per sampler (log x).

    ``results`` maps a sampler name to ``(steps, metric)`` pairs, e.g.
    ``{"ddim": [(10, 3.1), (50, 1.2)], "ancestral": [(1000, 1.0)]}``; steps must be positive.
    Non-finite metrics (a diverged run) leave a gap.
    """
    if not isinstance(results, Mapping) or not results:
        raise DataError("results must be a non-empty dict: sampler name -> [(steps, metric)]")
    curves: dict[str, tuple[list[int], list[float]]] = {}
    for name, pairs in results.items():
        try:
            parsed = [(s, float(m)) for s, m in pairs]
        except (TypeError, ValueError):
            raise DataError(f"results[{name!r}] must be a list of (steps, metric) pairs") from None
        if not parsed:
            raise DataError(f"results[{name!r}] is empty: need at least one (steps, metric)")
        for s, _ in parsed:
            if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s <= 0:
                raise DataError(f"results[{name!r}]: steps={s!r} must be a positive integer")
        parsed.sort(key=lambda p: p[0])
        curves[str(name)] = ([int(s) for s, _ in parsed],
                             [m if math.isfinite(m) else math.nan for _, m in parsed])

    from matplotlib.ticker import NullFormatter

    fig = _new_figure((6.5, 4.2))
    ax = fig.subplots()
    for name, (steps, metric) in curves.items():
        ax.plot(steps, metric, marker="o", linewidth=1.5, markersize=5, label=name)
    ax.set_xscale("log")
    ticks = sorted({s for steps, _ in curves.values() for s in steps})
    if len(ticks) <= 12:
        ax.set_xticks(ticks, labels=[str(t) for t in ticks])
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(f"{ylabel} vs {xlabel}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize="small")
    return _save_figure(fig, path)
