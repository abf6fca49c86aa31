"""The TF-Inception v3 (2015-12-05) of every published FID, without torchvision.

The network is the graph that the original TensorFlow FID code (TTUR), the ADM evaluation
suite and torch-fidelity run, with the three quirks of that graph: average pools that leave
the zero padding out of the mean, a max pool (not an average pool) in the last block, and a
1008-way classifier. Module and parameter names follow pytorch-fid's published state dict
(``pt_inception-2015-12-05-6726825d.pth``: ``Conv2d_1a_3x3.conv.weight``,
``Mixed_5b.branch1x1.bn.running_var``, ..., ``fc.weight`` [1008, 2048]), so that file loads as
it is; it is read with ``torch.load(weights_only=True)``, never unpickled. A ``.safetensors``
copy of it (``save_inception_safetensors``) is preferred.

Input: uint8 images ``[N, 3, H, W]`` (values 0..255) of any size. They are resized to
299 x 299 with TensorFlow 1's bilinear resize (``align_corners=False``, no half-pixel
centres: output pixel ``i`` samples input position ``i * H / 299``), which is what the TF
graph of the published FIDs does; then mapped to ``(x - 128) / 128``. pytorch-fid instead
uses torch's half-pixel bilinear and ``2 x / 255 - 1``, and clean-fid resizes with PIL
bicubic; Parmar et al. (2022) show that such differences change FID noticeably, so figures
are comparable only under the same resize.

Outputs: ``pool`` ``[N, 2048]`` (the pool3 features of FID, KID and precision/recall) and
``logits`` ``[N, 1008]`` = ``pool @ fc.weight.T`` without the bias, as the original Inception
Score code computes them.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError

__all__ = [
    "INCEPTION_ENV",
    "INCEPTION_FILE",
    "INCEPTION_URL",
    "InceptionV3",
    "download_inception",
    "find_inception_weights",
    "load_inception",
    "resize_tf1_bilinear",
    "save_inception_safetensors",
]

INCEPTION_FILE = "pt_inception-2015-12-05-6726825d.pth"
INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 + INCEPTION_FILE)
INCEPTION_SHA256_PREFIX = "6726825d"   # torch.hub's convention: the hash prefix in the name
INCEPTION_ENV = "DDPMKIT_INCEPTION"
INPUT_SIZE = 299


# ---- the network ---------------------------------------------------------------------------

class _BatchNorm(nn.Module):
    """Inference-only batch norm (eps 1e-3, as in the TF graph) with the published buffer
    names; no ``num_batches_tracked``, which these weights never use."""

    def __init__(self, channels: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                            training=False, eps=1e-3)


class _Conv(nn.Module):
    """conv (no bias) -> batch norm -> ReLU: every convolution of the network."""

    def __init__(self, c_in: int, c_out: int, kernel, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(c_in, c_out, kernel, stride, padding, bias=False)
        self.bn = _BatchNorm(c_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


def _avg_pool(x: torch.Tensor) -> torch.Tensor:
    # TF's average pool leaves the zero padding out of the mean.
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class _MixedA(nn.Module):
    """35 x 35 block (Mixed_5b..5d): 1x1 | 1x1-5x5 | 1x1-3x3-3x3 | avgpool-1x1."""

    def __init__(self, c_in: int, pool_features: int):
        super().__init__()
        self.branch1x1 = _Conv(c_in, 64, 1)
        self.branch5x5_1 = _Conv(c_in, 48, 1)
        self.branch5x5_2 = _Conv(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = _Conv(c_in, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, padding=1)
        self.branch_pool = _Conv(c_in, pool_features, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch1x1(x),
            self.branch5x5_2(self.branch5x5_1(x)),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            self.branch_pool(_avg_pool(x)),
        ], 1)


class _ReduceB(nn.Module):
    """35 -> 17 reduction (Mixed_6a): 3x3/2 | 1x1-3x3-3x3/2 | maxpool/2."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3 = _Conv(c_in, 384, 3, stride=2)
        self.branch3x3dbl_1 = _Conv(c_in, 64, 1)
        self.branch3x3dbl_2 = _Conv(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = _Conv(96, 96, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([
            self.branch3x3(x),
            self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
            F.max_pool2d(x, 3, stride=2),
        ], 1)


class _MixedC(nn.Module):
    """17 x 17 block (Mixed_6b..6e) with factorised 7x7 convolutions (1x7 and 7x1)."""

    def __init__(self, c_in: int, c7: int):
        super().__init__()
        row = {"kernel": (1, 7), "padding": (0, 3)}
        col = {"kernel": (7, 1), "padding": (3, 0)}
        self.branch1x1 = _Conv(c_in, 192, 1)
        self.branch7x7_1 = _Conv(c_in, c7, 1)
        self.branch7x7_2 = _Conv(c7, c7, **row)
        self.branch7x7_3 = _Conv(c7, 192, **col)
        self.branch7x7dbl_1 = _Conv(c_in, c7, 1)
        self.branch7x7dbl_2 = _Conv(c7, c7, **col)
        self.branch7x7dbl_3 = _Conv(c7, c7, **row)
        self.branch7x7dbl_4 = _Conv(c7, c7, **col)
        self.branch7x7dbl_5 = _Conv(c7, 192, **row)
        self.branch_pool = _Conv(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dbl = x
        for i in range(1, 6):
            dbl = getattr(self, f"branch7x7dbl_{i}")(dbl)
        return torch.cat([
            self.branch1x1(x),
            self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x))),
            dbl,
            self.branch_pool(_avg_pool(x)),
        ], 1)


class _ReduceD(nn.Module):
    """17 -> 8 reduction (Mixed_7a)."""

    def __init__(self, c_in: int):
        super().__init__()
        self.branch3x3_1 = _Conv(c_in, 192, 1)
        self.branch3x3_2 = _Conv(192, 320, 3, stride=2)
        self.branch7x7x3_1 = _Conv(c_in, 192, 1)
        self.branch7x7x3_2 = _Conv(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = _Conv(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = _Conv(192, 192, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7,
                          F.max_pool2d(x, 3, stride=2)], 1)


class _MixedE(nn.Module):
    """8 x 8 block (Mixed_7b, 7c) with split 1x3 / 3x1 heads. The TF graph pools with an
    average in Mixed_7b and with a *max* in Mixed_7c (``max_pool=True``)."""

    def __init__(self, c_in: int, max_pool: bool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = _Conv(c_in, 320, 1)
        self.branch3x3_1 = _Conv(c_in, 384, 1)
        self.branch3x3_2a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = _Conv(c_in, 448, 1)
        self.branch3x3dbl_2 = _Conv(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = _Conv(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = _Conv(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = _Conv(c_in, 192, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b3 = self.branch3x3_1(x)
        dbl = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pooled = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else _avg_pool(x)
        return torch.cat([
            self.branch1x1(x),
            self.branch3x3_2a(b3), self.branch3x3_2b(b3),
            self.branch3x3dbl_3a(dbl), self.branch3x3dbl_3b(dbl),
            self.branch_pool(pooled),
        ], 1)


class InceptionV3(nn.Module):
    """TF-Inception v3 2015-12-05: uint8 ``[N, 3, H, W]`` -> (pool ``[N, 2048]``,
    logits ``[N, 1008]``), both float32. Build it with :func:`load_inception`."""

    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = _Conv(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = _Conv(32, 32, 3)
        self.Conv2d_2b_3x3 = _Conv(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = _Conv(64, 80, 1)
        self.Conv2d_4a_3x3 = _Conv(80, 192, 3)
        self.Mixed_5b = _MixedA(192, 32)
        self.Mixed_5c = _MixedA(256, 64)
        self.Mixed_5d = _MixedA(288, 64)
        self.Mixed_6a = _ReduceB(288)
        self.Mixed_6b = _MixedC(768, 128)
        self.Mixed_6c = _MixedC(768, 160)
        self.Mixed_6d = _MixedC(768, 160)
        self.Mixed_6e = _MixedC(768, 192)
        self.Mixed_7a = _ReduceD(768)
        self.Mixed_7b = _MixedE(1280, max_pool=False)
        self.Mixed_7c = _MixedE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"InceptionV3 takes uint8 [N, 3, H, W] images, got "
                             f"{images.dtype} {tuple(images.shape)}")
        dtype = self.fc.weight.dtype
        x = resize_tf1_bilinear(images.to(dtype), INPUT_SIZE)
        x = (x - 128.0) / 128.0
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)
        x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
        x = F.max_pool2d(x, 3, stride=2)
        for name in ("5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"):
            x = getattr(self, f"Mixed_{name}")(x)
        pool = x.mean((2, 3))
        logits = pool @ self.fc.weight.T   # no bias: the Inception Score's logits
        return pool.float(), logits.float()


def _tf1_weights(n_in: int, n_out: int, dtype, device) -> torch.Tensor:
    """``[n_out, n_in]`` interpolation matrix of TF1 ``resize_bilinear`` (align_corners=False,
    half_pixel_centers=False): output ``i`` reads input position ``i * n_in / n_out``."""
    pos = torch.arange(n_out, dtype=torch.float64) * (n_in / n_out)
    lo = pos.floor().long()
    frac = pos - lo
    hi = (lo + 1).clamp_max(n_in - 1)
    w = torch.zeros(n_out, n_in, dtype=torch.float64)
    rows = torch.arange(n_out)
    w.index_put_((rows, lo), 1.0 - frac, accumulate=True)
    w.index_put_((rows, hi), frac, accumulate=True)
    return w.to(dtype=dtype, device=device)


def resize_tf1_bilinear(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 bilinear resize of float ``[N, C, H, W]`` to ``[N, C, size, size]``.

    Separable, so it is two small matrix products (rows, then columns).
    """
    wh = _tf1_weights(x.shape[2], size, x.dtype, x.device)
    ww = _tf1_weights(x.shape[3], size, x.dtype, x.device)
    return torch.einsum("oh,nchw,pw->ncop", wh, x, ww)


# ---- weights -------------------------------------------------------------------------------

def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ddpmkit"


def _how_to_get() -> str:
    return (f"download {INCEPTION_FILE} (pytorch-fid's TF-Inception 2015-12-05, "
            f"{INCEPTION_URL}) and pass --inception FILE, set {INCEPTION_ENV}=FILE, or put it "
            f"in {_cache_dir()}/")


def find_inception_weights(path: str | os.PathLike | None = None) -> Path:
    """The weights file: ``path``, else ``$DDPMKIT_INCEPTION``, else the user cache
    (``~/.cache/ddpmkit/``: ``inception-2015-12-05.safetensors`` or ``INCEPTION_FILE``).
    Nothing is downloaded here; a missing file is a :class:`ConfigError` that says where to
    get it."""
    if path is None:
        path = os.environ.get(INCEPTION_ENV) or None
    if path is not None:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ConfigError(f"Inception weights {p}: no such file; {_how_to_get()}")
        return p
    for name in ("inception-2015-12-05.safetensors", INCEPTION_FILE):
        if (_cache_dir() / name).is_file():
            return _cache_dir() / name
    raise ConfigError(f"no Inception weights found: {_how_to_get()}")


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file
            return load_file(str(path))
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, not a tensor file, or a pickle with code in it
        raise ConfigError(f"cannot read Inception weights {path}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ConfigError(f"Inception weights {path} are not a state dict of tensors")
    return sd


def load_inception(path: str | os.PathLike | None = None,
                   device: torch.device | str = "cpu") -> InceptionV3:
    """:class:`InceptionV3` in eval mode with the weights of :func:`find_inception_weights`.

    Every published key must be present with its shape (``num_batches_tracked`` is ignored);
    anything else is a one-line :class:`ConfigError` naming the first offending key.
    """
    file = find_inception_weights(path)
    sd = {k: v for k, v in _read_state_dict(file).items()
          if not k.endswith("num_batches_tracked")}
    net = InceptionV3()
    want = net.state_dict()
    missing = [k for k in want if k not in sd]
    extra = [k for k in sd if k not in want]
    if missing or extra:
        what = f"lacks {missing[0]!r}" if missing else f"has an unknown key {extra[0]!r}"
        raise ConfigError(f"Inception weights {file} {what} ({len(missing)} missing, "
                          f"{len(extra)} unknown): not pytorch-fid's {INCEPTION_FILE} layout")
    for k, v in want.items():
        if tuple(sd[k].shape) != tuple(v.shape):
            raise ConfigError(f"Inception weights {file}: {k} has shape {tuple(sd[k].shape)}, "
                              f"expected {tuple(v.shape)}")
        if not torch.isfinite(sd[k]).all():
            raise ConfigError(f"Inception weights {file}: {k} holds NaN or infinite values")
    net.load_state_dict({k: sd[k].float() for k in want})
    return net.eval().requires_grad_(False).to(device)


def save_inception_safetensors(src: str | os.PathLike, dst: str | os.PathLike) -> Path:
    """Convert a ``.pth`` weights file (read with ``weights_only=True``) to safetensors."""
    from safetensors.torch import save_file
    net = load_inception(src)
    dst = Path(dst)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(dst))
    return dst


def download_inception(dest: str | os.PathLike | None = None) -> Path:  # pragma: no cover
    """Fetch ``INCEPTION_URL`` once into the user cache (or ``dest``), checking the SHA-256
    prefix in its name, and write it atomically. Needs a network; the tests never call it."""
    import urllib.request

    dest = Path(dest) if dest else _cache_dir() / INCEPTION_FILE
    if dest.is_file():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    h = hashlib.sha256()
    with tempfile.NamedTemporaryFile(dir=dest.parent, delete=False) as tmp:
        try:
            with urllib.request.urlopen(INCEPTION_URL, timeout=60) as r:
                while chunk := r.read(1 << 20):
                    h.update(chunk)
                    tmp.write(chunk)
        except OSError as e:
            os.unlink(tmp.name)
            raise ConfigError(f"cannot download {INCEPTION_URL}: {e}; {_how_to_get()}") \
                from None
    if not h.hexdigest().startswith(INCEPTION_SHA256_PREFIX):
        os.unlink(tmp.name)
        raise ConfigError(f"downloaded {INCEPTION_FILE} has SHA-256 {h.hexdigest()[:16]}..., "
                          f"expected {INCEPTION_SHA256_PREFIX}...: not the published file")
    shutil.move(tmp.name, dest)
    return dest
