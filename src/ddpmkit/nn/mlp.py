"""A residual MLP denoiser for low-dimensional points (the 2-D toy data sets)."""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ..config import MODEL_PRESETS, ModelConfig
from ..errors import ConfigError
from .dropout import Dropout
from .embeddings import ClassEmbedding, TimeEmbedding

__all__ = ["MLPDenoiser", "MLPBlock", "MLP_PRESETS"]


class MLPBlock(nn.Module):
    """Pre-norm residual block: h + fc2(dropout(SiLU(fc1(SiLU(LN(h))) + time_proj(temb)))).

    ``h`` [B, W], ``temb`` [B, W] (already through SiLU) -> [B, W].
    """

    def __init__(self, width: int, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, width)
        self.time_proj = nn.Linear(width, width)
        self.dropout = Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(width, width)

    def forward(self, h: Tensor, temb: Tensor) -> Tensor:
        z = self.fc1(F.silu(self.norm(h))) + self.time_proj(temb)
        return h + self.fc2(self.dropout(F.silu(z)))


class MLPDenoiser(nn.Module):
    """``model(x_t, t, y=None)``: ``x_t`` [B, in_channels] points, ``t`` [B] (or scalar)
    timestep indices, ``y`` [B] class labels for a class-conditional net (as the U-Net)
    -> [B, out_channels] in ``x_t``'s dtype.

    in_proj -> ``num_res_blocks`` x :class:`MLPBlock` of width ``channels`` (each gets its own
    projection of the time embedding) -> LayerNorm -> SiLU -> out_proj. Initialised like the
    U-Net: the last layer of each residual branch and ``out_proj`` start at zero
    (``zero_init=False`` keeps them random).
    """

    def __init__(self, cfg: ModelConfig, *, zero_init: bool = True) -> None:
        super().__init__()
        if cfg.arch != "mlp":
            raise ConfigError(f"arch={cfg.arch!r}: MLPDenoiser needs arch='mlp'")
        if cfg.channels < 4:
            raise ConfigError(f"channels={cfg.channels} must be at least 4 for an MLP denoiser")
        width = cfg.channels
        self.config = cfg
        self.out_channels = cfg.out_channels or cfg.in_channels
        self.in_proj = nn.Linear(cfg.in_channels, width)
        self.time_embed = TimeEmbedding(width, width)
        self.num_classes = cfg.num_classes
        if cfg.num_classes:
            self.class_embed = ClassEmbedding(cfg.num_classes, width)
        self.blocks = nn.ModuleList(MLPBlock(width, cfg.dropout)
                                    for _ in range(cfg.num_res_blocks))
        self.norm_out = nn.LayerNorm(width)
        self.out_proj = nn.Linear(width, self.out_channels)
        self.reset_parameters(zero_init=zero_init)

    @torch.no_grad()
    def reset_parameters(self, zero_init: bool = True) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        if zero_init:
            for block in self.blocks:
                nn.init.zeros_(block.fc2.weight)
            nn.init.zeros_(self.out_proj.weight)

    def forward(self, x: Tensor, t: Tensor, y: Tensor | None = None) -> Tensor:
        if x.ndim != 2 or x.shape[1] != self.in_proj.in_features:
            raise ValueError(f"expected x of shape [B, {self.in_proj.in_features}], "
                             f"got {list(x.shape)}")
        t = torch.as_tensor(t, device=x.device)
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        elif t.shape != (x.shape[0],):
            raise ValueError(f"expected t of shape [{x.shape[0]}], got {list(t.shape)}")
        in_dtype = x.dtype
        temb = self.time_embed(t)
        if self.num_classes:
            temb = temb + self.class_embed(y, x.shape[0], x.device).to(temb.dtype)
        temb = F.silu(temb)
        h = self.in_proj(x.to(self.in_proj.weight.dtype))
        for block in self.blocks:
            h = block(h, temb)
        return self.out_proj(F.silu(self.norm_out(h))).to(in_dtype)


MLP_PRESETS: dict[str, ModelConfig] = {
    name: cfg for name, cfg in MODEL_PRESETS.items() if cfg.arch == "mlp"}
