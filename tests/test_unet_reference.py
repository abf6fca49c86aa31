"""The U-Net against two references: diffusers' ``UNet2DModel`` with the same weights, and a
stored output for fixed weights and inputs (tests/data/unet_golden.safetensors).

Shape tests cannot see a wrong wiring: concatenating a skip as [skip, h] instead of [h, skip],
dropping the attention block's residual, or a SiLU missing before the time projection all keep
every shape. An independent implementation of the published layout (diffusers), and a golden
output that does not depend on diffusers being installed, do.

Weights are random everywhere (also GroupNorm affines and biases, which the default init sets
to 1 and 0 and would hide), scaled by 1/sqrt(fan_in) so that activations stay O(1) through the
network; outputs are then O(1) and any of the wiring mutants above moves them by O(0.1-1),
while float32 reassociation differences stay below 1e-5 of the output scale.

tests/test_interop.py compares the published layouts at full size (CIFAR-10 and 256x256, slow)
and checks that our configs map onto the published config.json files field by field.

Regenerate the golden file (only after a deliberate change of the network's function):
    PYTHONPATH=src python tests/test_unet_reference.py
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ddpmkit.config import ModelConfig
from ddpmkit.interop.unet import diffusers_twin
from ddpmkit.nn.unet import UNet

GOLDEN = Path(__file__).parent / "data" / "unet_golden.safetensors"

# Small, but with every kind of part: three levels (so two downsamplers and two upsamplers),
# width changes (1x1 shortcuts), two res blocks per level (three skips per up level),
# attention on the down and the up path at 8x8 and in the middle, learned-range output
# channels (out != in).
SMALL = ModelConfig(channels=16, channel_mult=(1, 2, 2), num_res_blocks=2,
                    attention_resolutions=(8,), groups=4, dropout=0.1, in_channels=3,
                    out_channels=6, image_size=16)

# Float32 agreement bound, relative to the output scale: both libraries sum the same products
# in different orders (fused qkv, folded upsample, SDPA vs diffusers' attention), ~1e-7 each.
REL_TOL = 1e-5


def random_unet(cfg: ModelConfig, seed: int) -> UNet:
    """A U-Net in eval mode whose every tensor is drawn from ``seed``, in sorted-name order
    (independent of the init code, so the golden file survives a change of init)."""
    model = UNet(cfg, zero_init=False).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.state_dict().items()):
            if p.ndim > 1:  # conv / linear weight
                p.copy_(torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel()))
            elif name.endswith(".weight"):  # GroupNorm scale
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=g))
            else:  # biases
                p.copy_(0.2 * torch.randn(p.shape, generator=g))
    return model


def inputs(cfg: ModelConfig, batch: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    return x, t


def max_rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp(min=1.0))


def golden_tensors() -> dict[str, torch.Tensor]:
    model = random_unet(SMALL, seed=1234)
    x, t = inputs(SMALL, batch=2, seed=5678)
    with torch.no_grad():
        out = model(x, t)
    return {"x": x, "t": t, "out": out}


# ---- diffusers ------------------------------------------------------------------------------

def _compare_with_diffusers(cfg: ModelConfig, batch: int, seed: int) -> float:
    pytest.importorskip("diffusers")
    ours = random_unet(cfg, seed)
    theirs = diffusers_twin(ours).eval()
    x, t = inputs(cfg, batch, seed + 1)
    with torch.no_grad():
        a = ours(x, t)
        b = theirs(x, t).sample
        # fractional timesteps too (the continuous-time samplers call the net with them)
        tf = t.float() + 0.37
        c, d = ours(x, tf), theirs(x, tf).sample
    assert a.shape == b.shape == (batch, cfg.out_channels or cfg.in_channels, *x.shape[2:])
    assert b.abs().max() > 0.1  # a real output, not a collapsed one
    return max(max_rel_diff(a, b), max_rel_diff(c, d))


def test_small_unet_equals_diffusers_with_mapped_weights():
    assert _compare_with_diffusers(SMALL, batch=3, seed=0) < REL_TOL


def test_small_unet_with_heads_equals_diffusers():
    cfg = ModelConfig(channels=16, channel_mult=(1, 1), num_res_blocks=1,
                      attention_resolutions=(8,), groups=4, num_heads=4, dropout=0.0,
                      in_channels=1, image_size=8)
    assert _compare_with_diffusers(cfg, batch=2, seed=3) < REL_TOL


# ---- golden output --------------------------------------------------------------------------

def test_unet_matches_the_stored_golden_output():
    stored = load_file(GOLDEN)
    now = golden_tensors()
    # The inputs are regenerated from their seeds: equal inputs mean equal RNG streams, so a
    # mismatch below is the network's, not the generator's.
    assert torch.equal(now["x"], stored["x"]) and torch.equal(now["t"], stored["t"])
    assert stored["out"].abs().max() > 0.1
    assert max_rel_diff(now["out"], stored["out"]) < REL_TOL


if __name__ == "__main__":
    GOLDEN.parent.mkdir(exist_ok=True)
    save_file(golden_tensors(), GOLDEN, metadata={
        "what": "ddpmkit UNet output for tests/test_unet_reference.py::"
                "test_unet_matches_the_stored_golden_output",
        "how": "PYTHONPATH=src python tests/test_unet_reference.py (SMALL config, weights "
               "random_unet(seed=1234), inputs(seed=5678))",
        "torch": torch.__version__,
    })
    print(f"wrote {GOLDEN}")
