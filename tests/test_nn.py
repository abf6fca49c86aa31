"""Tests for the denoising networks (ddpmkit.nn): structure, conditioning, numerics."""

from __future__ import annotations

import ast
import dataclasses
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from ddpmkit.config import ModelConfig
from ddpmkit.errors import ConfigError
from ddpmkit.nn import (
    MLP_PRESETS,
    UNET_PRESETS,
    MLPDenoiser,
    UNet,
    build_model,
    build_unet,
    count_parameters,
    timestep_embedding,
)
from ddpmkit.nn import unet as unet_mod
from ddpmkit.nn.unet import Downsample, Upsample, to_diffusers_name

CIFAR10_PARAMS = 35_746_307  # Ho et al. 2020: "35.7 million"; diffusers google/ddpm-cifar10-32


def _cfg(preset: str, **changes) -> ModelConfig:
    return dataclasses.replace(UNET_PRESETS[preset], **changes)


def _random_unet(preset: str = "tiny", **changes) -> UNet:
    """A U-Net without the zero-initialised output layers, so outputs depend on inputs."""
    torch.manual_seed(0)
    return UNet(_cfg(preset, **changes), zero_init=False)


def _inputs(cfg: ModelConfig, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


# ---- structure ---------------------------------------------------------------------------

def test_cifar10_parameter_count_is_the_published_one():
    model = build_unet("cifar10")
    assert count_parameters(model) == CIFAR10_PARAMS


@pytest.mark.slow
def test_celebahq256_parameter_count():
    # Same count as diffusers' google/ddpm-celebahq-256 (the paper's "114 million").
    assert count_parameters(build_unet("celebahq256")) == 113_673_219


def test_cifar10_state_dict_maps_onto_the_diffusers_layout():
    sd = {to_diffusers_name(k): tuple(v.shape) for k, v in build_unet("cifar10").state_dict().items()}
    # Facts of google/ddpm-cifar10-32's UNet2DModel state dict.
    assert len(sd) == 328
    prefixes = {}
    for k in sd:
        prefixes[k.split(".")[0]] = prefixes.get(k.split(".")[0], 0) + 1
    assert prefixes == {"conv_in": 2, "time_embedding": 4, "down_blocks": 108, "up_blocks": 180,
                        "mid_block": 30, "conv_norm_out": 2, "conv_out": 2}
    expected = {
        "up_blocks.3.resnets.0.conv1.weight": (128, 384, 3, 3),
        "up_blocks.2.resnets.2.conv1.weight": (256, 384, 3, 3),
        "up_blocks.2.attentions.2.to_out.0.weight": (256, 256),
        "down_blocks.1.resnets.0.conv_shortcut.weight": (256, 128, 1, 1),
        "down_blocks.0.downsamplers.0.conv.weight": (128, 128, 3, 3),
        "up_blocks.0.upsamplers.0.conv.weight": (256, 256, 3, 3),
        "time_embedding.linear_1.weight": (512, 128),
        "time_embedding.linear_2.weight": (512, 512),
        "mid_block.attentions.0.to_q.bias": (256,),
        "mid_block.resnets.1.time_emb_proj.weight": (256, 512),
        "conv_norm_out.weight": (128,),
        "conv_out.weight": (3, 128, 3, 3),
        "up_blocks.3.resnets.2.conv_shortcut.weight": (128, 256, 1, 1),
    }
    for name, shape in expected.items():
        assert sd.get(name) == shape, name
    # Attention only at 16x16 (down level 1, up level 2) and in the middle.
    attn_blocks = {k.rsplit(".attentions.", 1)[0] for k in sd if ".attentions." in k}
    assert attn_blocks == {"down_blocks.1", "mid_block", "up_blocks.2"}
    # Same tensor order as diffusers: conv_in first, up_blocks before mid_block.
    names = list(sd)
    assert names[0] == "conv_in.weight" and names[2] == "time_embedding.linear_1.weight"
    assert names.index("up_blocks.3.resnets.0.norm1.weight") < names.index(
        "mid_block.attentions.0.group_norm.weight")


def test_presets_have_the_documented_shape():
    assert UNET_PRESETS["lsun256"] == UNET_PRESETS["celebahq256"]
    big = UNET_PRESETS["celebahq256"]
    assert (big.channel_mult, big.image_size, big.dropout) == ((1, 1, 2, 2, 4, 4), 256, 0.0)
    assert MLP_PRESETS["toy2d"].arch == "mlp"
    tiny = build_unet("tiny")
    assert count_parameters(tiny) < 1_000_000
    assert count_parameters(build_unet("digits")) < count_parameters(build_unet("cifar10"))


def test_build_unet_overrides_and_unknown_names():
    model = build_unet("tiny", out_channels=2)
    assert model.conv_out.out_channels == 2
    with pytest.raises(ConfigError, match="cifar10"):
        build_unet("cifar1")
    with pytest.raises(ConfigError, match="num_res_blocks"):
        build_unet("tiny", num_res_block=3)
    with pytest.raises(ConfigError, match="arch"):
        build_unet(MLP_PRESETS["toy2d"])


def test_build_model_dispatches_on_arch():
    assert isinstance(build_model(UNET_PRESETS["tiny"]), UNet)
    assert isinstance(build_model(MLP_PRESETS["toy2d"]), MLPDenoiser)
    assert isinstance(build_model("toy2d"), MLPDenoiser)


def test_nn_does_not_import_diffusion_math():
    # Static check of nn/'s own imports (importing ddpmkit.nn at run time also runs the
    # package's __init__, which is not nn's business).
    nn_dir = Path(unet_mod.__file__).parent
    files = sorted(nn_dir.glob("*.py"))
    assert {f.name for f in files} >= {"__init__.py", "unet.py", "mlp.py", "embeddings.py"}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            for name in names:
                for forbidden in ("diffusion", "schedules", "sampling", "losses"):
                    assert forbidden not in name, f"{path.name} imports {name}"


# ---- config errors -------------------------------------------------------------------------

@pytest.mark.parametrize("changes, words", [
    (dict(image_size=30), "image_size=30"),                       # 30 % 2**3 != 0
    (dict(attention_resolutions=(12,)), "12"),                    # no 12x12 level
    (dict(channels=48), "48"),                                    # 48 % 32 groups
    (dict(channels=64, num_heads=3), "num_heads=3"),
])
def test_bad_unet_configs_raise_config_error(changes, words):
    with pytest.raises(ConfigError, match=re.escape(words)):
        UNet(_cfg("cifar10", **changes))


def test_valid_unusual_config_builds():
    # Attention at the lowest resolution only, groups that divide every width.
    UNet(_cfg("tiny", attention_resolutions=(4, 8), groups=4, channels=8))


# ---- forward pass --------------------------------------------------------------------------

@pytest.mark.parametrize("preset", ["tiny", "digits"])
@pytest.mark.parametrize("double", [False, True])
@pytest.mark.parametrize("zero_init", [True, False])
def test_unet_output_shape_and_finite(preset, double, zero_init):
    cfg = _cfg(preset)
    if double:
        cfg = dataclasses.replace(cfg, out_channels=2 * cfg.in_channels)
    model = UNet(cfg, zero_init=zero_init)
    x, t = _inputs(cfg, 3)
    out = model(x, t)
    assert out.shape == (3, 2 * cfg.in_channels if double else cfg.in_channels, *x.shape[2:])
    assert out.dtype == x.dtype
    assert torch.isfinite(out).all()
    if zero_init:
        # Published init: conv_out starts at zero, so does the output.
        assert out.abs().max() == 0
    else:
        assert out.abs().max() > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["cifar10", "celebahq256"])
def test_published_unets_forward(preset):
    cfg = _cfg(preset)
    model = UNet(cfg, zero_init=False).eval()
    x, t = _inputs(cfg, 1)
    with torch.inference_mode():
        out = model(x, t)
    assert out.shape == x.shape and torch.isfinite(out).all()


def test_unet_is_fully_convolutional_and_rejects_bad_sizes():
    model = _random_unet().eval()
    x = torch.randn(2, 1, 16, 12)
    assert model(x, torch.tensor([5, 9])).shape == x.shape
    with pytest.raises(ValueError, match="divisible"):
        model(torch.randn(1, 1, 9, 8), torch.tensor([1]))
    with pytest.raises(ValueError, match="t of shape"):
        model(torch.randn(2, 1, 8, 8), torch.tensor([1, 2, 3]))


def test_time_conditioning_matters():
    model = _random_unet().eval()
    x, _ = _inputs(model.config, 2)
    with torch.no_grad():
        a = model(x, torch.tensor([10, 10]))
        b = model(x, torch.tensor([900, 900]))
        c = model(x, torch.tensor([10.0, 10.0]))  # float index = same as the int one
        d = model(x, torch.tensor(10))  # a scalar t is broadcast over the batch
    assert (a - b).abs().max() > 1e-2
    torch.testing.assert_close(a, c)
    torch.testing.assert_close(a, d)


def test_batch_independence():
    model = _random_unet(dropout=0.1).eval()
    x, t = _inputs(model.config, 4)
    with torch.no_grad():
        full = model(x, t)
        for i in range(4):
            torch.testing.assert_close(model(x[i:i + 1], t[i:i + 1]), full[i:i + 1],
                                       rtol=1e-4, atol=1e-5)
        # Changing another sample leaves sample 0 alone.
        x2 = x.clone()
        x2[1:] = torch.randn_like(x2[1:])
        torch.testing.assert_close(model(x2, t)[0], full[0], rtol=1e-4, atol=1e-5)


def test_channels_last_gives_the_same_output():
    model = _random_unet("digits").eval()
    x, t = _inputs(model.config, 2)
    with torch.no_grad():
        ref = model(x, t)
        model = model.to(memory_format=torch.channels_last)
        out = model(x.contiguous(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_cpu_layouts_per_resolution_give_the_same_outputs_and_gradients(monkeypatch):
    # On the CPU, maps of >= 16x16 run channels_last and smaller ones NCHW (a speed choice,
    # docs/speed.md). All-NCHW must give the same function and, in float64, the same
    # gradients; the output comes back in the default layout either way.
    shape = dict(image_size=32, channel_mult=(1, 2, 2), attention_resolutions=(16,),
                 in_channels=3, out_channels=3)  # 1 channel would be both layouts at once
    x, t = _inputs(_cfg("tiny", **shape), 3)
    seen = []
    real = unet_mod._cpu_layout
    monkeypatch.setattr(unet_mod, "_cpu_layout", lambda h: seen.append(
        real(h).is_contiguous(memory_format=torch.channels_last)) or real(h))
    outs, grads, layouts = [], [], []
    for threshold in (unet_mod.CPU_CHANNELS_LAST_MIN_PIXELS, 10**9):
        seen.clear()
        monkeypatch.setattr(unet_mod, "CPU_CHANNELS_LAST_MIN_PIXELS", threshold)
        net = _random_unet("tiny", **shape).double()
        torch.manual_seed(5)
        out = net(x.double(), t)
        assert out.is_contiguous()
        out.square().mean().backward()
        outs.append(out.detach())
        grads.append([p.grad for p in net.parameters()])
        layouts.append(list(seen))
    # The default threshold used both layouts (32x32 and 16x16 maps channels_last, 8x8 and
    # 4x4 not); the second pass used NCHW only.
    assert any(layouts[0]) and not all(layouts[0]) and not any(layouts[1])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-10, atol=1e-12)
    for g1, g2 in zip(*grads, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


def test_low_precision_inputs():
    model = _random_unet().eval()
    x, t = _inputs(model.config, 2)
    with torch.no_grad():
        ref = model(x, t)
        # A bf16 input to an fp32 model (no autocast) is cast in and the output cast back.
        assert model(x.bfloat16(), t).dtype == torch.bfloat16
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x, t)
    assert out.dtype == torch.float32
    assert ((out - ref).norm() / ref.norm()) < 0.05


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grad_checkpointing_gives_the_same_gradients(monkeypatch, dtype):
    # float64 takes F.dropout, float32 ddpmkit's own CPU mask: the recomputation must replay
    # both (checkpoint restores the RNG state).
    cfg = _cfg("tiny", dropout=0.1)
    plain = UNet(cfg, zero_init=False).to(dtype).train()
    ckpt = UNet(dataclasses.replace(cfg, grad_checkpointing=True)).to(dtype).train()
    ckpt.load_state_dict(plain.state_dict())
    calls = []
    real = unet_mod.checkpoint
    monkeypatch.setattr(unet_mod, "checkpoint",
                        lambda *a, **k: calls.append(1) or real(*a, **k))
    x, t = _inputs(cfg, 3)
    x = x.to(dtype)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(123)  # same dropout masks in both
        model(x, t).square().mean().backward()
        grads.append([p.grad for p in model.parameters()])
    # Every res/attn block went through checkpoint: 2 down + 1 attn, 3 mid, 4 up + 2 attn.
    assert len(calls) == 12
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-6)
    for g1, g2 in zip(*grads, strict=True):
        torch.testing.assert_close(g1, g2, **tol)
    # No checkpointing in eval mode or without grad.
    calls.clear()
    with torch.no_grad():
        ckpt(x, t)
    assert not calls


# ---- building blocks -----------------------------------------------------------------------

def test_downsample_pads_right_and_bottom_only():
    down = Downsample(1)
    x = torch.arange(1.0, 37.0).view(1, 1, 6, 6)
    with torch.no_grad():
        down.conv.bias.zero_()
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 0, 0] = 1.0  # top-left tap: sees x[2i, 2j], never padding
        torch.testing.assert_close(down(x), x[:, :, ::2, ::2])
        down.conv.weight.zero_()
        down.conv.weight[0, 0, 2, 2] = 1.0  # bottom-right tap: x[2i+2, 2j+2], pad at the end
        out = down(x)
    torch.testing.assert_close(out[:, :, :2, :2], x[:, :, 2::2, 2::2])
    assert out[0, 0, 2, :].abs().max() == 0 and out[0, 0, :, 2].abs().max() == 0
    # Odd sizes round down (only even sizes occur: image_size is checked).
    assert down(torch.randn(1, 1, 7, 5)).shape[2:] == (3, 2)


@pytest.mark.parametrize("size", [(8, 8), (16, 12), (9, 7), (4, 4)])
def test_upsample_folded_conv_equals_nearest_then_conv(size):
    # The CPU path folds nearest x2 + 3x3 conv into one stride-2 transposed conv (from 8x8
    # inputs on; 4x4 takes the plain path): same values and gradients, float64 to rounding.
    torch.manual_seed(0)
    up = Upsample(5).double()
    with torch.no_grad():
        up.conv.bias.normal_()
    x = torch.randn(2, 5, *size, dtype=torch.float64, requires_grad=True)
    out = up(x)
    ref = up.conv(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"))
    assert out.shape == (2, 5, 2 * size[0], 2 * size[1])
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (x, up.conv.weight, up.conv.bias), g)
    grads_ref = torch.autograd.grad(ref, (x, up.conv.weight, up.conv.bias), g)
    for a, b in zip(grads, grads_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_folded_upsample_matches_the_plain_path_in_a_whole_net(monkeypatch):
    # tiny at 16x16: its upsample sees 8x8, so the folded path runs. Forcing the plain path
    # (threshold out of reach) must give the same outputs (float32: 1e-5) and gradients.
    cfg = _cfg("tiny", image_size=16, attention_resolutions=(8,))
    model = _random_unet("tiny", image_size=16, attention_resolutions=(8,)).eval()
    x, t = _inputs(cfg, 3)
    with torch.no_grad():
        folded = model(x, t)
        folded_cl = model.to(memory_format=torch.channels_last)(
            x.contiguous(memory_format=torch.channels_last), t)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = model(x, t)
        model = model.to(memory_format=torch.contiguous_format)
        monkeypatch.setattr(unet_mod, "FOLDED_UPSAMPLE_MIN_PIXELS", 10**9)
        plain = model(x, t)
    torch.testing.assert_close(folded, plain, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(folded_cl, plain, rtol=1e-4, atol=1e-5)
    assert ((low.float() - plain).norm() / plain.norm()) < 0.05

    grads = []
    for threshold in (64, 10**9):
        monkeypatch.setattr(unet_mod, "FOLDED_UPSAMPLE_MIN_PIXELS", threshold)
        net = _random_unet("tiny", image_size=16, attention_resolutions=(8,)).double().train()
        net(x.double(), t).square().mean().backward()
        grads.append([p.grad for p in net.parameters()])
    for g1, g2 in zip(*grads, strict=True):
        torch.testing.assert_close(g1, g2, rtol=1e-9, atol=1e-12)


def test_timestep_embedding_values():
    t = torch.tensor([0, 1, 17, 999])
    emb = timestep_embedding(t, 128)
    assert emb.shape == (4, 128) and emb.dtype == torch.float32
    assert emb[0, :64].abs().max() == 0 and (emb[0, 64:] == 1).all()  # sin 0, cos 0
    # Independent computation: f_i = 10000 ** (-i / (half - 1)), float64 numpy.
    half = 64
    freqs = 10000.0 ** (-np.arange(half) / (half - 1))
    args = t.numpy()[:, None].astype(np.float64) * freqs[None, :]
    expected = np.concatenate([np.sin(args), np.cos(args)], axis=1)
    np.testing.assert_allclose(emb.numpy(), expected, atol=2e-4)
    assert math.isclose(freqs[-1], 1e-4)
    # Continuous index, odd width, and float32 under autocast.
    assert torch.allclose(timestep_embedding(torch.tensor([0.5]), 8)[0, 0],
                          torch.tensor(math.sin(0.5)))
    assert timestep_embedding(t, 9).shape == (4, 9)
    assert (timestep_embedding(t, 9)[:, -1] == 0).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = timestep_embedding(t, 128)
    assert low.dtype == torch.float32
    torch.testing.assert_close(low, emb, rtol=0, atol=0)


# ---- MLP -----------------------------------------------------------------------------------

@pytest.mark.parametrize("out_channels", [2, 4])
def test_mlp_shape_finite_and_conditioned(out_channels):
    cfg = dataclasses.replace(MLP_PRESETS["toy2d"], out_channels=out_channels)
    torch.manual_seed(0)
    model = MLPDenoiser(cfg, zero_init=False).eval()
    x = torch.randn(16, 2)
    t = torch.randint(0, 1000, (16,))
    with torch.no_grad():
        out = model(x, t)
        assert out.shape == (16, out_channels) and torch.isfinite(out).all()
        assert (model(x, t + 300) - out).abs().max() > 1e-3
        torch.testing.assert_close(model(x[:1], t[:1]), out[:1], rtol=1e-4, atol=1e-5)
    zero = build_model(cfg)
    assert zero(x, t).abs().max() == 0  # zero-initialised output layer
    assert count_parameters(zero) == count_parameters(model)
    with pytest.raises(ValueError, match="shape"):
        model(torch.randn(4, 3), t[:4])


def test_mlp_block_is_its_documented_formula():
    # h + fc2(dropout(SiLU(fc1(SiLU(LN(h))) + time_proj(temb)))), recomputed from its own
    # layers (eval mode: no dropout); with fc2 zeroed the block is exactly the identity.
    from torch.nn import functional as F

    from ddpmkit.nn.mlp import MLPBlock

    torch.manual_seed(3)
    block = MLPBlock(8, dropout=0.1).eval()
    h, temb = torch.randn(5, 8), torch.randn(5, 8)
    with torch.no_grad():
        want = h + block.fc2(F.silu(block.fc1(F.silu(block.norm(h))) + block.time_proj(temb)))
        torch.testing.assert_close(block(h, temb), want, rtol=1e-6, atol=1e-6)
        torch.nn.init.zeros_(block.fc2.weight)
        torch.nn.init.zeros_(block.fc2.bias)
        assert torch.equal(block(h, temb), h)
