"""diffusers ``UNet2DModel`` <-> ddpmkit's U-Net: config mapping and weight names, both ways.

Our network is the DDPM layout (nn/unet.py), so a ``UNet2DModel`` config maps onto a
:class:`~ddpmkit.config.ModelConfig` exactly when it describes that layout: positional
[sin, cos] timestep embedding with ``freq_shift`` 1, ``DownBlock2D``/``AttnDownBlock2D``
levels mirrored by ``UpBlock2D``/``AttnUpBlock2D``, pad-then-stride-2 downsampling
(``downsample_padding`` 0), GroupNorm eps 1e-6, SiLU. Every field of the config is checked:
one we do not know, or a value our network cannot reproduce, is a one-line
:class:`~ddpmkit.errors.ConfigError` naming it. A field missing from a config.json means
diffusers' default for it (which is what diffusers itself would build), not ours.

Weight names go through the one rename table of nn/unet.py (``to_diffusers_name``); the
inverse is taken from our network's own key list. Older conversions (diffusers < 0.14,
e.g. the google/ddpm-* repositories) name attention weights ``query``/``key``/``value``/
``proj_attn``; they are read as ``to_q``/``to_k``/``to_v``/``to_out.0``.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..nn.unet import GROUPNORM_EPS, to_diffusers_name

__all__ = ["UNET2D_DEFAULTS", "model_config_from_unet2d", "unet2d_config_from_model",
           "to_diffusers_state_dict", "from_diffusers_state_dict", "diffusers_twin"]

# UNet2DModel.__init__'s defaults (diffusers 0.42): what a field left out of config.json means.
UNET2D_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 3, "out_channels": 3, "center_input_sample": False,
    "time_embedding_type": "positional", "time_embedding_dim": None, "freq_shift": 0,
    "flip_sin_to_cos": True,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"],
    "mid_block_type": "UNetMidBlock2D",
    "up_block_types": ["AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"],
    "block_out_channels": [224, 448, 672, 896], "layers_per_block": 2,
    "mid_block_scale_factor": 1, "downsample_padding": 1, "downsample_type": "conv",
    "upsample_type": "conv", "dropout": 0.0, "act_fn": "silu", "attention_head_dim": 8,
    "norm_num_groups": 32, "attn_norm_num_groups": None, "norm_eps": 1e-5,
    "resnet_time_scale_shift": "default", "add_attention": True, "class_embed_type": None,
    "num_class_embeds": None, "num_train_timesteps": None,
}

# Fields whose value must be exactly this for our network to compute the same function.
_REQUIRED: dict[str, Any] = {
    "center_input_sample": False, "time_embedding_type": "positional", "freq_shift": 1,
    "flip_sin_to_cos": False, "mid_block_type": "UNetMidBlock2D", "mid_block_scale_factor": 1,
    "downsample_padding": 0, "downsample_type": "conv", "upsample_type": "conv",
    "act_fn": "silu", "norm_eps": GROUPNORM_EPS, "resnet_time_scale_shift": "default",
    "add_attention": True, "class_embed_type": None, "num_class_embeds": None,
}
_WHY = {
    "freq_shift": "the DDPM timestep embedding divides by half - 1",
    "flip_sin_to_cos": "the DDPM timestep embedding is [sin, cos]",
    "downsample_padding": "the DDPM network pads right/bottom by one, then convolves",
    "norm_eps": "the DDPM network's GroupNorm eps is 1e-6",
}
_DOWN = {"DownBlock2D": False, "AttnDownBlock2D": True}
_UP = {"UpBlock2D": False, "AttnUpBlock2D": True}
def _bad(field: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"UNet2DModel {field}={value!r} is not supported: {why}")


def _block_attention(kinds: list, table: dict[str, bool], field: str) -> list[bool]:
    for kind in kinds:
        if kind not in table:
            raise _bad(field, kind, f"ddpmkit builds {' / '.join(table)} levels only")
    return [table[k] for k in kinds]


def _num_heads(head_dim: Any, widths: list[int]) -> int:
    """diffusers' per-level heads (width / attention_head_dim) as our one num_heads."""
    if head_dim is None:
        return 1  # diffusers: head dim = the block's width, so one head everywhere
    if not isinstance(head_dim, int) or head_dim < 1:
        raise _bad("attention_head_dim", head_dim, "expected a positive integer or null")
    heads = {w // head_dim for w in widths if w % head_dim == 0}
    if len(heads) != 1 or any(w % head_dim for w in widths):
        raise _bad("attention_head_dim", head_dim, f"attention widths {sorted(set(widths))} "
                   "would need different head counts; ddpmkit has one num_heads")
    return heads.pop()


def _square_size(size: Any) -> int:
    if isinstance(size, (list, tuple)) and len(size) == 2 and size[0] == size[1]:
        size = size[0]
    if not isinstance(size, int) or isinstance(size, bool) or size < 1:
        raise _bad("sample_size", size, "ddpmkit needs one positive size (square images)")
    return size


def model_config_from_unet2d(config: dict) -> ModelConfig:
    """A ``UNet2DModel`` config (the dict of its config.json) -> our :class:`ModelConfig`."""
    unknown = [k for k in config if not k.startswith("_") and k not in UNET2D_DEFAULTS]
    if unknown:
        raise ConfigError(f"UNet2DModel config field {unknown[0]!r} is unknown to ddpmkit "
                          "(from a newer diffusers, or not a UNet2DModel config)")
    c = {**UNET2D_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    for field, want in _REQUIRED.items():
        value = c[field]
        same = value is want if isinstance(want, bool) or want is None else value == want
        if not same:
            raise _bad(field, value, _WHY.get(field, f"ddpmkit's network has {want!r}"))
    boc = c["block_out_channels"]
    if not isinstance(boc, (list, tuple)) or not boc or not all(
            isinstance(w, int) and w > 0 for w in boc):
        raise _bad("block_out_channels", boc, "expected a list of positive integers")
    ch = boc[0]
    if any(w % ch for w in boc):
        raise _bad("block_out_channels", boc, f"every width must be a multiple of the first "
                   f"({ch}): ddpmkit's levels are channels x channel_mult")
    n = len(boc)
    down = _block_attention(list(c["down_block_types"]), _DOWN, "down_block_types")
    up = _block_attention(list(c["up_block_types"]), _UP, "up_block_types")
    if len(down) != n or len(up) != n:
        raise _bad("down_block_types", c["down_block_types"], f"need {n} down and {n} up "
                   "block types, one per block_out_channels entry")
    if down != up[::-1]:
        raise _bad("up_block_types", c["up_block_types"], "attention must sit at the same "
                   "resolutions on the way down and up (the mirror of down_block_types)")
    if c["time_embedding_dim"] not in (None, 4 * ch):
        raise _bad("time_embedding_dim", c["time_embedding_dim"], f"ddpmkit uses 4 x {ch}")
    groups = c["norm_num_groups"]
    if not isinstance(groups, int) or groups < 1:
        raise _bad("norm_num_groups", groups, "expected a positive integer")
    if c["attn_norm_num_groups"] not in (None, groups):
        raise _bad("attn_norm_num_groups", c["attn_norm_num_groups"],
                   f"ddpmkit's attention uses norm_num_groups ({groups})")
    layers = c["layers_per_block"]
    if not isinstance(layers, int) or layers < 1:
        raise _bad("layers_per_block", layers, "expected one positive integer")
    size = _square_size(c["sample_size"])
    attended = [boc[i] for i in range(n) if down[i]] + [boc[-1]]  # + the middle block
    try:
        return ModelConfig(
            arch="unet", channels=ch, channel_mult=tuple(w // ch for w in boc),
            num_res_blocks=layers,
            attention_resolutions=tuple(size // 2**i for i in range(n) if down[i]),
            num_heads=_num_heads(c["attention_head_dim"], attended),
            dropout=float(c["dropout"]), groups=groups, in_channels=int(c["in_channels"]),
            out_channels=int(c["out_channels"]), image_size=size)
    except (ConfigError, TypeError) as e:
        raise ConfigError(f"UNet2DModel config does not make a ddpmkit U-Net: {e}") from None


def unet2d_config_from_model(cfg: ModelConfig) -> dict:
    """Our U-Net's :class:`ModelConfig` -> a complete ``UNet2DModel`` config dict."""
    if cfg.arch != "unet":
        raise ConfigError(f"a model with arch={cfg.arch!r} (the 2-D point MLP) has no diffusers "
                          "equivalent: UNet2DModel is an image network")
    if cfg.num_classes:
        # UNet2DModel has num_class_embeds, but DDPMPipeline passes no labels and the null
        # class has no diffusers meaning: not exported until a pipeline can use it.
        raise ConfigError(f"a class-conditional model ({cfg.num_classes} classes) cannot be "
                          "exported to diffusers yet; DDPMPipeline samples unconditionally")
    sizes = [cfg.image_size // 2**i for i in range(len(cfg.channel_mult))]
    attn = [s in cfg.attention_resolutions for s in sizes]
    widths = [cfg.channels * m for m in cfg.channel_mult]
    attended = sorted({w for w, a in zip(widths, attn, strict=True) if a} | {widths[-1]})
    head_dim = None
    if cfg.num_heads > 1:
        head_dims = {w // cfg.num_heads for w in attended}
        if len(head_dims) != 1:
            raise ConfigError(f"num_heads={cfg.num_heads} over attention widths {attended} has "
                              "no diffusers equivalent: UNet2DModel has one attention_head_dim "
                              "for every level")
        head_dim = head_dims.pop()
    out = dict(UNET2D_DEFAULTS, **_REQUIRED)
    out.update(
        sample_size=cfg.image_size, in_channels=cfg.in_channels,
        out_channels=cfg.out_channels or cfg.in_channels,
        down_block_types=["AttnDownBlock2D" if a else "DownBlock2D" for a in attn],
        up_block_types=["AttnUpBlock2D" if a else "UpBlock2D" for a in reversed(attn)],
        block_out_channels=widths, layers_per_block=cfg.num_res_blocks, dropout=cfg.dropout,
        attention_head_dim=head_dim, norm_num_groups=cfg.groups)
    return out


def to_diffusers_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our U-Net's state dict -> ``UNet2DModel`` names (same tensors, contiguous)."""
    return {to_diffusers_name(k): v.detach().contiguous() for k, v in state.items()}


def diffusers_twin(model: torch.nn.Module) -> torch.nn.Module:
    """diffusers' ``UNet2DModel`` holding our U-Net ``model``'s weights: the same function.

    For tests and benchmarks that compare the two (the one place that builds the twin). The
    only function here that imports diffusers (``pip install diffusers``, in the dev extra).
    """
    from diffusers import UNet2DModel

    twin = UNet2DModel(**unet2d_config_from_model(model.config))
    twin.load_state_dict(to_diffusers_state_dict(model.state_dict()), strict=True)
    return twin


_LEGACY_ATTN = [(r"\.query\.", ".to_q."), (r"\.key\.", ".to_k."), (r"\.value\.", ".to_v."),
                (r"\.proj_attn\.", ".to_out.0.")]


def _modern_name(name: str) -> str:
    if ".attentions." in name:
        for pattern, repl in _LEGACY_ATTN:
            name = re.sub(pattern, repl, name)
    return name


def from_diffusers_state_dict(state: dict[str, torch.Tensor],
                              ours: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A ``UNet2DModel`` state dict -> our names, checked against our network's ``ours``.

    Missing or extra tensors, and shape mismatches, are one-line CheckpointErrors.
    """
    by_theirs = {to_diffusers_name(k): k for k in ours}
    renamed = {}
    for name, value in state.items():
        modern = _modern_name(name)
        if modern not in by_theirs:
            raise CheckpointError(f"weights have tensor {name!r}, which the network in "
                                  "config.json does not have")
        key = by_theirs[modern]
        if tuple(value.shape) != tuple(ours[key].shape):
            raise CheckpointError(f"weights tensor {name!r} has shape {tuple(value.shape)}, the "
                                  f"network in config.json needs {tuple(ours[key].shape)}")
        renamed[key] = value
    missing = [to_diffusers_name(k) for k in ours if k not in renamed]
    if missing:
        raise CheckpointError(f"weights lack {len(missing)} tensor(s) of the network in "
                              f"config.json, e.g. {missing[0]!r}")
    return renamed
