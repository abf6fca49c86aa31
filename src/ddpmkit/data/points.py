"""The 2-D point sets (moons, swissroll, 8gaussians, checkerboard, circles).

Each is centred and scaled isotropically to unit RMS per coordinate (``E|x|^2 = 2``), with
constants derived in closed form below, so train, test and :func:`sample_points` share one
fixed transform:

============  ===================================================  =====================
set           shape (after scaling)                                extent (noise included)
============  ===================================================  =====================
moons         two interleaved half circles, noise std 0.07         x +-2.4, y +-1.4
swissroll     spiral over 1.5 turns, noise std 0.07                x -2.0..1.9, y -2.0..2.3
8gaussians    8 modes on a circle of radius 1.41, std 0.1 each     +-1.9
checkerboard  8 filled cells of a 4x4 board, uniform inside        +-1.73 (sqrt 3)
circles       two rings, radii 1.79 and 0.89, noise std 0.07       +-2.1
============  ===================================================  =====================

Three sets come with class labels (:data:`POINT_CLASS_NAMES`), for class-conditional
training: the 8 modes of 8gaussians (class k at angle k * 45 degrees), the two moons (0 the
upper, 1 the lower) and the two circles (0 the outer ring, 1 the inner).
"""

from __future__ import annotations

import difflib
import math

import torch

from ..config import POINT_SETS
from ..errors import DataError


def sample_points(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` fresh points ``[n, 2]`` (float32) of 2-D set ``name``, on ``generator``'s device."""
    return sample_labelled_points(name, n, generator)[0]


def sample_labelled_points(name: str, n: int, generator: torch.Generator | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`sample_points` with each point's class: (points ``[n, 2]`` float32, labels
    ``[n]`` int64 or None for a set without classes). The same generator draws give the
    same points as :func:`sample_points`; the label is the mode/moon/ring a point was drawn
    from (see :data:`POINT_CLASS_NAMES`)."""
    if name not in _POINT_FNS:
        hint = difflib.get_close_matches(name, POINT_SETS, n=1)
        more = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise DataError(f"unknown 2-D point set {name!r}; choose one of "
                        f"{', '.join(POINT_SETS)}{more}")
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise DataError(f"number of points n={n!r} must be an integer >= 0")
    device = generator.device if generator is not None else torch.device("cpu")
    x, y = _POINT_FNS[name](n, generator, device)
    return x.to(torch.float32), (None if y is None else y.to(torch.int64))


POINT_CLASS_NAMES: dict[str, tuple[str, ...]] = {
    "8gaussians": tuple(f"{45 * k}deg" for k in range(8)),
    "moons": ("upper", "lower"),
    "circles": ("outer", "inner"),
}
"""Class names of the labelled 2-D sets, indexed by label; the other sets have none."""


# ---- 2-D point sets ----------------------------------------------------------------------
# Each generator works on raw coordinates, then applies a fixed centre and scale chosen so
# that E[x] = 0 and E|x|^2 = 2 (unit RMS per coordinate); the constants are exact
# expectations, not estimates from a sample, so they never depend on the seed.

_MOONS_NOISE = 0.05
# Upper moon (cos t, sin t), lower (1 - cos t, 1/2 - sin t), t ~ U(0, pi): mean (1/2, 1/4),
# Var x = 3/4, Var y = 9/16 - 1/pi.
_MOONS_CENTRE = (0.5, 0.25)
_MOONS_SCALE = 1.0 / math.sqrt((0.75 + 0.5625 - 1 / math.pi) / 2 + _MOONS_NOISE**2)

_SWISS_NOISE = 0.5
# t ~ U(1.5 pi, 4.5 pi), point t (cos t, sin t): E|p|^2 = E t^2 = 9.75 pi^2,
# E p = (2, 2 / (3 pi)) by integrating t cos t and t sin t.
_SWISS_CENTRE = (2.0, 2.0 / (3.0 * math.pi))
_SWISS_SCALE = 1.0 / math.sqrt(
    (9.75 * math.pi**2 - 4.0 - (2.0 / (3.0 * math.pi)) ** 2) / 2 + _SWISS_NOISE**2)

_GAUSS_STD = 0.1
# cos^2 averages to 1/2 over the 8 angles, so E|x|^2 = radius^2 + 2 std^2 = 2.
_GAUSS_RADIUS = math.sqrt(2.0 - 2.0 * _GAUSS_STD**2)

_CHECKER_SCALE = math.sqrt(3.0) / 2.0   # U(-2, 2) has variance 4/3

_CIRCLES_NOISE = 0.04
_CIRCLES_INNER = 0.5
_CIRCLES_SCALE = 1.0 / math.sqrt((1.0 + _CIRCLES_INNER**2) / 4 + _CIRCLES_NOISE**2)


# Each generator returns (points [n, 2], labels [n] or None).
Points = tuple[torch.Tensor, torch.Tensor | None]


def _uniform(n: int, g: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.rand(n, generator=g, device=device)


def _normal(shape: tuple[int, ...], g: torch.Generator | None,
            device: torch.device) -> torch.Tensor:
    return torch.randn(shape, generator=g, device=device)


def _coin(n: int, g: torch.Generator | None, device: torch.device) -> torch.Tensor:
    return torch.randint(0, 2, (n,), generator=g, device=device)


def _moons(n: int, g: torch.Generator | None, device: torch.device) -> Points:
    t = _uniform(n, g, device) * math.pi
    lower = _coin(n, g, device).bool()
    x = torch.where(lower, 1.0 - torch.cos(t), torch.cos(t))
    y = torch.where(lower, 0.5 - torch.sin(t), torch.sin(t))
    p = torch.stack([x, y], 1) + _MOONS_NOISE * _normal((n, 2), g, device)
    return (p - torch.tensor(_MOONS_CENTRE, device=device)) * _MOONS_SCALE, lower.long()


def _swissroll(n: int, g: torch.Generator | None, device: torch.device) -> Points:
    t = 1.5 * math.pi * (1.0 + 2.0 * _uniform(n, g, device))
    p = torch.stack([t * torch.cos(t), t * torch.sin(t)], 1)
    p = p + _SWISS_NOISE * _normal((n, 2), g, device)
    return (p - torch.tensor(_SWISS_CENTRE, device=device)) * _SWISS_SCALE, None


def _eight_gaussians(n: int, g: torch.Generator | None, device: torch.device) -> Points:
    k = torch.randint(0, 8, (n,), generator=g, device=device)
    angle = k.float() * (math.pi / 4)
    centres = _GAUSS_RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return centres + _GAUSS_STD * _normal((n, 2), g, device), k


def _checkerboard(n: int, g: torch.Generator | None, device: torch.device) -> Points:
    # 4x4 board of unit cells on [-2, 2]^2; cell (col, row) is filled when col + row is even.
    x = 4.0 * _uniform(n, g, device) - 2.0
    col = torch.floor(x)
    row = 2.0 * _coin(n, g, device).float() - 2.0 + torch.remainder(col, 2.0)
    y = row + _uniform(n, g, device)
    return torch.stack([x, y], 1) * _CHECKER_SCALE, None


def _circles(n: int, g: torch.Generator | None, device: torch.device) -> Points:
    angle = 2.0 * math.pi * _uniform(n, g, device)
    inner = _coin(n, g, device).bool()
    radius = torch.where(inner, _CIRCLES_INNER, 1.0)
    p = radius[:, None] * torch.stack([torch.cos(angle), torch.sin(angle)], 1)
    return (p + _CIRCLES_NOISE * _normal((n, 2), g, device)) * _CIRCLES_SCALE, inner.long()


_POINT_FNS = {
    "moons": _moons,
    "swissroll": _swissroll,
    "8gaussians": _eight_gaussians,
    "checkerboard": _checkerboard,
    "circles": _circles,
}
assert set(_POINT_FNS) == set(POINT_SETS), "config.POINT_SETS and data generators disagree"
