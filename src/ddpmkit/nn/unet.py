"""The DDPM U-Net (Ho et al. 2020, appendix B), built from a :class:`ModelConfig`.

Structurally identical to the published networks, so their weights load 1:1. Submodule
names against Hugging Face diffusers' ``UNet2DModel`` (e.g. ``google/ddpm-cifar10-32``);
every parameter keeps its shape, only the prefix changes:

    ours                          diffusers
    conv_in                       conv_in
    time_embed.linear_1/2         time_embedding.linear_1/2
    class_embed.embedding         class_embedding (class-conditional nets only)
    down.i.blocks.j               down_blocks.i.resnets.j
    down.i.attn.j                 down_blocks.i.attentions.j
    down.i.downsample.conv        down_blocks.i.downsamplers.0.conv
    mid.blocks.0 / mid.blocks.1   mid_block.resnets.0 / mid_block.resnets.1
    mid.attn.0                    mid_block.attentions.0
    up.i.blocks.j                 up_blocks.i.resnets.j
    up.i.attn.j                   up_blocks.i.attentions.j
    up.i.upsample.conv            up_blocks.i.upsamplers.0.conv
    norm_out                      conv_norm_out
    conv_out                      conv_out
  inside a residual block (same names): norm1, conv1, time_emb_proj, norm2, conv2,
    conv_shortcut (only where the channel count changes)
  inside an attention block: group_norm, to_q, to_k, to_v (same names), to_out (diffusers:
    to_out.0); all are Linear layers over channels with biases, as in diffusers.

``up.0`` is the lowest-resolution level, as diffusers' ``up_blocks.0``. Modules are
registered in diffusers' order (conv_in before the time embedding, ``up`` before ``mid``,
attentions before resnets inside a level), so both state dicts list their tensors in the
same order.

Initialisation: conv/linear weights are Xavier-uniform (the published "fan_avg, uniform"
variance scaling) with zero biases, and, as in the published DDPM code, the last layer of
every residual branch (``conv2``, attention ``to_out``) and ``conv_out`` start at zero. Each
block is then the identity at init and the net outputs exactly zero (for eps prediction that
is the ideal start: loss = E|eps|^2 = 1, and depth cannot blow up activations through the
unscaled skip sums). Gradients still reach every layer from the second step on. Pass
``zero_init=False`` for a net whose output depends on its inputs at init (tests, probes).
"""

from __future__ import annotations

import dataclasses
import difflib
import re

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint

from ..config import MODEL_PRESETS, ModelConfig
from ..errors import ConfigError
from .dropout import Dropout
from .embeddings import ClassEmbedding, TimeEmbedding

__all__ = [
    "UNet",
    "ResBlock",
    "AttnBlock",
    "Downsample",
    "Upsample",
    "UNET_PRESETS",
    "build_unet",
    "count_parameters",
    "DIFFUSERS_RENAME",
    "to_diffusers_name",
]

# Our state-dict names -> diffusers' UNet2DModel names, applied in order (see the module
# docstring). Used to load published DDPM weights and to compare against diffusers.
DIFFUSERS_RENAME: list[tuple[str, str]] = [
    (r"^time_embed\.", "time_embedding."),
    (r"^class_embed\.embedding\.", "class_embedding."),  # num_class_embeds = num_classes + 1
    (r"^down\.(\d+)\.blocks\.", r"down_blocks.\1.resnets."),
    (r"^down\.(\d+)\.attn\.", r"down_blocks.\1.attentions."),
    (r"^down\.(\d+)\.downsample\.", r"down_blocks.\1.downsamplers.0."),
    (r"^mid\.blocks\.", "mid_block.resnets."),
    (r"^mid\.attn\.", "mid_block.attentions."),
    (r"^up\.(\d+)\.blocks\.", r"up_blocks.\1.resnets."),
    (r"^up\.(\d+)\.attn\.", r"up_blocks.\1.attentions."),
    (r"^up\.(\d+)\.upsample\.", r"up_blocks.\1.upsamplers.0."),
    (r"^norm_out\.", "conv_norm_out."),
    (r"\.to_out\.", ".to_out.0."),
]


def to_diffusers_name(name: str) -> str:
    """One of our state-dict keys -> the matching diffusers ``UNet2DModel`` key."""
    for pattern, repl in DIFFUSERS_RENAME:
        name = re.sub(pattern, repl, name)
    return name


GROUPNORM_EPS = 1e-6  # the published networks (TF default 1e-6), not PyTorch's 1e-5


def _silu(x: Tensor) -> Tensor:
    # In place when no graph is recorded (sampling): saves one activation-sized allocation
    # per call. With autograd on, SiLU needs its input for backward, so never in place.
    return F.silu(x, inplace=not torch.is_grad_enabled())


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, + time projection, GroupNorm-SiLU-dropout-conv, + shortcut.

    ``x`` [B, in_ch, H, W], ``temb`` [B, temb_ch] (already through SiLU) -> [B, out_ch, H, W].
    """

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int, groups: int,
                 dropout: float) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=GROUPNORM_EPS)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=GROUPNORM_EPS)
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # Registered last, as in diffusers; a 1x1 conv only where the width changes.
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor, temb: Tensor) -> Tensor:
        h = self.conv1(_silu(self.norm1(x)))
        # In place is safe under autograd: conv backward needs its input, not its output.
        h += self.time_emb_proj(temb)[:, :, None, None]
        h = self.conv2(self.dropout(_silu(self.norm2(h))))
        skip = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(skip)  # conv2's output is not needed for backward either


class AttnBlock(nn.Module):
    """Self-attention over the H*W positions, with a residual add.

    ``x`` [B, C, H, W] -> [B, C, H, W]. q/k/v/out are Linear layers over the channel dim (the
    same map as the published 1x1 convs; diffusers' layout). With a channels_last input the
    [B, H*W, C] token view is free (no copy).
    """

    def __init__(self, channels: int, groups: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.group_norm = nn.GroupNorm(groups, channels, eps=GROUPNORM_EPS)
        self.to_q = nn.Linear(channels, channels)
        self.to_k = nn.Linear(channels, channels)
        self.to_v = nn.Linear(channels, channels)
        self.to_out = nn.Linear(channels, channels)

    def forward(self, x: Tensor) -> Tensor:
        b, c, hh, ww = x.shape
        tokens = self.group_norm(x).flatten(2).transpose(1, 2)  # [B, L, C]
        # One GEMM for q, k and v instead of three: the weights are concatenated on the fly
        # (3*C*C floats, small next to the activations), keeping three separate parameters
        # so checkpoints map 1:1 to the published ones.
        weight = torch.cat([self.to_q.weight, self.to_k.weight, self.to_v.weight])
        bias = torch.cat([self.to_q.bias, self.to_k.bias, self.to_v.bias])
        qkv = F.linear(tokens, weight, bias)  # [B, L, 3C]
        heads = self.num_heads
        # [B, L, 3, heads, d] -> 3 x [B, heads, L, d]; SDPA scales by 1/sqrt(d) (published).
        q, k, v = qkv.view(b, -1, 3, heads, c // heads).permute(2, 0, 3, 1, 4).unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        out = self.to_out(out.transpose(1, 2).reshape(b, -1, c))  # [B, L, C]
        # Back to [B, C, H, W] as a view (channels_last strides); the add follows x's layout.
        return x + out.transpose(1, 2).view(b, c, hh, ww)


class Downsample(nn.Module):
    """Pad right/bottom by one (TF "SAME" for even sizes), then a stride-2 3x3 conv.

    [B, C, H, W] -> [B, C, H // 2, W // 2].
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


# Upsample's folded path from this many input pixels (H * W) on: below, oneDNN's transposed
# conv was slower than interpolate + conv on the CPU measured (docs/speed.md).
FOLDED_UPSAMPLE_MIN_PIXELS = 64


def _fold_upsample_kernel(weight: Tensor) -> Tensor:
    """[O, I, 3, 3] conv weight -> [I, O, 4, 4] weight of the equivalent stride-2 transposed conv.

    Nearest x2 then a 3x3 conv (padding 1) puts, along each axis, output 2i + a on inputs
    (i-1, i) with taps (w0, w1 + w2) for a = 0 and on (i, i+1) with (w0 + w1, w2) for a = 1.
    A transposed conv with stride 2, padding 1 and kernel [w2, w1 + w2, w0 + w1, w0] does
    exactly that. Folded in float32 at least (bf16 weights lose nothing to the sums).
    """
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    rows = torch.stack([w[:, :, 2], w[:, :, 1] + w[:, :, 2], w[:, :, 0] + w[:, :, 1],
                        w[:, :, 0]], dim=2)  # [O, I, 4, 3]
    k = torch.stack([rows[..., 2], rows[..., 1] + rows[..., 2], rows[..., 0] + rows[..., 1],
                     rows[..., 0]], dim=3)  # [O, I, 4, 4]
    return k.transpose(0, 1).to(weight.dtype)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 conv. [B, C, H, W] -> [B, C, 2H, 2W].

    On the CPU, from 8x8 inputs up, the same map is computed as one stride-2 transposed conv
    with a 4x4 kernel folded from the 3x3 one (:func:`_fold_upsample_kernel`): each output
    pixel then costs 4 taps instead of 9, and the 4x larger upsampled tensor is never built.
    Equal to the plain path up to float rounding (summation order); gradients reach
    ``conv.weight`` through the fold, so training and checkpoints are unchanged.
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        if x.device.type == "cpu" and x.shape[-2] * x.shape[-1] >= FOLDED_UPSAMPLE_MIN_PIXELS:
            return F.conv_transpose2d(x, _fold_upsample_kernel(self.conv.weight),
                                      self.conv.bias, stride=2, padding=1)
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


# On the CPU, feature maps with at least this many pixels (H * W) run in channels_last, smaller
# ones in the default NCHW layout. oneDNN's convolutions (forward and backward) were faster in
# channels_last at 32x32 and 16x16 and slower at 8x8 and 4x4 on the CPU measured
# (docs/speed.md). Parameters stay NCHW either way: only activations change layout.
CPU_CHANNELS_LAST_MIN_PIXELS = 256


def _cpu_layout(h: Tensor) -> Tensor:
    """``h`` [B, C, H, W] in the memory format chosen for its size (CPU only; a no-op elsewhere)."""
    if h.device.type != "cpu":
        return h
    big = h.shape[-2] * h.shape[-1] >= CPU_CHANNELS_LAST_MIN_PIXELS
    return h.contiguous(memory_format=torch.channels_last if big else torch.contiguous_format)


class _Level(nn.Module):
    """One resolution of the down or up path: res blocks, optional attention, resampler.

    ``attn`` is registered before ``blocks`` (diffusers' order) and is either empty or one
    attention block per res block.
    """

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.ModuleList()
        self.blocks = nn.ModuleList()


class UNet(nn.Module):
    """The DDPM U-Net: ``model(x_t, t, y=None) -> output``.

    ``x_t`` [B, in_channels, H, W] in any float dtype (H, W divisible by
    2**(len(channel_mult)-1); normally ``image_size``), ``t`` [B] (or scalar) timestep
    indices, int or float. ``y`` [B] class labels in [0, num_classes] for a class-conditional
    network (``num_classes`` = the null class; None = the null class for all); ignored by an
    unconditional one. Returns [B, out_channels, H, W] in ``x_t``'s dtype.
    """

    def __init__(self, cfg: ModelConfig, *, zero_init: bool = True) -> None:
        super().__init__()
        _validate(cfg)
        self.config = cfg
        ch = cfg.channels
        temb_ch = 4 * ch
        out_channels = cfg.out_channels or cfg.in_channels
        self.out_channels = out_channels
        self.grad_checkpointing = cfg.grad_checkpointing
        self._size_factor = 2 ** (len(cfg.channel_mult) - 1)
        block = dict(temb_ch=temb_ch, groups=cfg.groups, dropout=cfg.dropout)
        attn = dict(groups=cfg.groups, num_heads=cfg.num_heads)

        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        self.time_embed = TimeEmbedding(ch, temb_ch)
        # Unconditional networks have no such module, so their state dicts are unchanged.
        self.num_classes = cfg.num_classes
        if cfg.num_classes:
            self.class_embed = ClassEmbedding(cfg.num_classes, temb_ch)

        # Down path; skip_chs tracks the width of every tensor pushed on the skip stack.
        skip_chs = [ch]
        cur, res = ch, cfg.image_size
        self.down = nn.ModuleList()
        # Registered now (filled below) so that, as in diffusers, ``up`` precedes ``mid``
        # in state_dict order.
        self.up = nn.ModuleList()
        for i, mult in enumerate(cfg.channel_mult):
            level = _Level()
            for _ in range(cfg.num_res_blocks):
                level.blocks.append(ResBlock(cur, ch * mult, **block))
                cur = ch * mult
                if res in cfg.attention_resolutions:
                    level.attn.append(AttnBlock(cur, **attn))
                skip_chs.append(cur)
            if i != len(cfg.channel_mult) - 1:
                level.downsample = Downsample(cur)
                skip_chs.append(cur)
                res //= 2
            self.down.append(level)

        self.mid = _Level()
        self.mid.attn.append(AttnBlock(cur, **attn))
        self.mid.blocks.append(ResBlock(cur, cur, **block))
        self.mid.blocks.append(ResBlock(cur, cur, **block))

        # Up path, lowest resolution first (up[0] = diffusers' up_blocks.0).
        for i, mult in reversed(list(enumerate(cfg.channel_mult))):
            level = _Level()
            for _ in range(cfg.num_res_blocks + 1):
                level.blocks.append(ResBlock(cur + skip_chs.pop(), ch * mult, **block))
                cur = ch * mult
                if res in cfg.attention_resolutions:
                    level.attn.append(AttnBlock(cur, **attn))
            if i != 0:
                level.upsample = Upsample(cur)
                res *= 2
            self.up.append(level)
        assert not skip_chs, "every skip connection must be consumed"

        self.norm_out = nn.GroupNorm(cfg.groups, cur, eps=GROUPNORM_EPS)
        self.conv_out = nn.Conv2d(cur, out_channels, 3, padding=1)
        self.reset_parameters(zero_init=zero_init)

    @torch.no_grad()
    def reset_parameters(self, zero_init: bool = True) -> None:
        """Xavier-uniform weights, zero biases, unit GroupNorm affine; see the module doc."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init:
            for m in self.modules():
                last = (m.conv2 if isinstance(m, ResBlock)
                        else m.to_out if isinstance(m, AttnBlock) else None)
                if last is not None:
                    nn.init.zeros_(last.weight)
            nn.init.zeros_(self.conv_out.weight)

    def _call(self, module: nn.Module, *args: Tensor) -> Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            # Non-reentrant: works with inputs that do not require grad and keeps the RNG
            # state, so dropout masks agree between the forward and the recomputation.
            return checkpoint(module, *args, use_reentrant=False)
        return module(*args)

    def _level(self, level: _Level, h: Tensor, temb: Tensor, skips: list[Tensor] | None,
               pop: list[Tensor] | None) -> Tensor:
        for j, block in enumerate(level.blocks):
            if pop is not None:
                h = torch.cat([h, pop.pop()], dim=1)
            h = self._call(block, h, temb)
            if len(level.attn):
                h = self._call(level.attn[j], h)
            if skips is not None:
                skips.append(h)
        return h

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.ndim != 4 or x.shape[1] != self.conv_in.in_channels:
            raise ValueError(f"expected x of shape [B, {self.conv_in.in_channels}, H, W], "
                             f"got {list(x.shape)}")
        if x.shape[2] % self._size_factor or x.shape[3] % self._size_factor:
            raise ValueError(f"x's height and width {tuple(x.shape[2:])} must be divisible by "
                             f"{self._size_factor} (2**(len(channel_mult)-1))")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        elif t.shape != (x.shape[0],):
            raise ValueError(f"expected t of shape [{x.shape[0]}], got {list(t.shape)}")
        in_dtype = x.dtype
        # Computed once per forward and shared by every block (diffusers applies the same
        # SiLU inside each block).
        temb = self.time_embed(t)
        if self.num_classes:
            temb = temb + self.class_embed(y, x.shape[0], x.device).to(temb.dtype)
        temb = F.silu(temb)

        h = self.conv_in(_cpu_layout(x.to(self.conv_in.weight.dtype)))
        skips = [h]
        for level in self.down:
            h = self._level(level, h, temb, skips, None)
            if hasattr(level, "downsample"):
                h = _cpu_layout(level.downsample(h))
                skips.append(h)

        h = self._call(self.mid.blocks[0], h, temb)
        h = self._call(self.mid.attn[0], h)
        h = self._call(self.mid.blocks[1], h, temb)

        for level in self.up:
            h = self._level(level, h, temb, None, skips)
            if hasattr(level, "upsample"):
                h = _cpu_layout(level.upsample(h))

        h = self.conv_out(F.silu(self.norm_out(h)))
        return h.to(in_dtype).contiguous()


def count_parameters(model: nn.Module) -> int:
    """Total number of parameter elements (trainable or not)."""
    return sum(p.numel() for p in model.parameters())


def _validate(cfg: ModelConfig) -> None:
    if cfg.arch != "unet":
        raise ConfigError(f"arch={cfg.arch!r}: UNet needs arch='unet'")
    levels = len(cfg.channel_mult)
    factor = 2 ** (levels - 1)
    if cfg.image_size % factor:
        raise ConfigError(f"image_size={cfg.image_size} is not divisible by "
                          f"2**(len(channel_mult)-1)={factor} for channel_mult="
                          f"{cfg.channel_mult}")
    sizes = [cfg.image_size // 2**i for i in range(levels)]
    for r in cfg.attention_resolutions:
        if r not in sizes:
            raise ConfigError(f"attention_resolutions has {r}, but the U-Net's feature maps are "
                              f"{', '.join(map(str, sizes))} for image_size={cfg.image_size}")
    for m in sorted(set(cfg.channel_mult)):
        width = cfg.channels * m
        if width % cfg.groups:
            raise ConfigError(f"groups={cfg.groups} does not divide the level width {width} "
                              f"(channels={cfg.channels} x channel_mult {m})")
    attn_widths = {cfg.channels * cfg.channel_mult[-1]}  # the middle block always attends
    attn_widths |= {cfg.channels * m for m, s in zip(cfg.channel_mult, sizes, strict=True)
                    if s in cfg.attention_resolutions}
    for width in sorted(attn_widths):
        if width % cfg.num_heads:
            raise ConfigError(f"num_heads={cfg.num_heads} does not divide the attention width "
                              f"{width}")
    if cfg.channels < 4:
        raise ConfigError(f"channels={cfg.channels} must be at least 4 (timestep embedding)")


# The presets are defined once, torch-free, in config.py (the run presets use them too).
UNET_PRESETS: dict[str, ModelConfig] = {
    name: cfg for name, cfg in MODEL_PRESETS.items() if cfg.arch == "unet"}


def apply_overrides(cfg: ModelConfig, overrides: dict) -> ModelConfig:
    """``cfg`` with some fields replaced; unknown field names are a ConfigError."""
    names = [f.name for f in dataclasses.fields(ModelConfig)]
    for key in overrides:
        if key not in names:
            hint = difflib.get_close_matches(key, names, n=1)
            more = f" (did you mean {hint[0]!r}?)" if hint else ""
            raise ConfigError(f"unknown model setting {key!r}{more}")
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


def resolve_preset(preset: str | ModelConfig, presets: dict[str, ModelConfig],
                   kind: str) -> ModelConfig:
    """A preset name (or a config, returned as is) -> its ModelConfig."""
    if isinstance(preset, ModelConfig):
        return preset
    if preset not in presets:
        hint = difflib.get_close_matches(str(preset), list(presets), n=1)
        more = f" (did you mean {hint[0]!r}?)" if hint else ""
        raise ConfigError(f"unknown {kind} preset {preset!r}{more}; "
                          f"choose from {', '.join(presets)}")
    return presets[preset]


def build_unet(preset: str | ModelConfig, **overrides) -> UNet:
    """A U-Net from a preset name (``cifar10``, ``celebahq256``/``lsun256``, ``digits``,
    ``tiny``) or a :class:`ModelConfig`, with ``ModelConfig`` fields overridden by keyword."""
    cfg = apply_overrides(resolve_preset(preset, UNET_PRESETS, "U-Net"), overrides)
    return UNet(cfg)
