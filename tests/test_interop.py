"""diffusers interop: ddpmkit.load of diffusers folders, `ddpmkit export`, and the mappings.

diffusers is a test-only dependency (the `dev` extra); ddpmkit itself never imports it. All
weights are random (nothing is downloaded). Full-size networks are marked slow; the fast
tests use the same layouts at small widths.
"""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import ddpmkit
from ddpmkit.cli import main
from ddpmkit.config import MODEL_PRESETS, DiffusionConfig, ModelConfig, RunConfig
from ddpmkit.errors import CheckpointError, ConfigError
from ddpmkit.interop import (
    model_config_from_unet2d,
    settings_from_scheduler,
    unet2d_config_from_model,
)
from ddpmkit.loading import build_diffusion
from ddpmkit.nn import build_model
from ddpmkit.nn.unet import UNet, to_diffusers_name
from ddpmkit.train.checkpoint import save_checkpoint

diffusers = pytest.importorskip("diffusers")
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel  # noqa: E402

# The UNet2DModel configs of the DDPM conversions (google/ddpm-cifar10-32; the 256x256
# celebahq/church/bedroom/cat models share one layout), as their config.json files hold them.
_COMMON = {"_class_name": "UNet2DModel", "_diffusers_version": "0.0.4", "act_fn": "silu",
           "attention_head_dim": None, "center_input_sample": False, "downsample_padding": 0,
           "flip_sin_to_cos": False, "freq_shift": 1, "in_channels": 3, "layers_per_block": 2,
           "mid_block_scale_factor": 1, "norm_eps": 1e-06, "norm_num_groups": 32,
           "out_channels": 3, "time_embedding_type": "positional"}
CIFAR10 = {**_COMMON, "block_out_channels": [128, 256, 256, 256], "sample_size": 32,
           "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
           "up_block_types": ["UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}
LAYOUT_256 = {**_COMMON, "block_out_channels": [128, 128, 256, 256, 512, 512],
              "sample_size": 256,
              "down_block_types": ["DownBlock2D"] * 4 + ["AttnDownBlock2D", "DownBlock2D"],
              "up_block_types": ["UpBlock2D", "AttnUpBlock2D"] + ["UpBlock2D"] * 4}
# The same layouts at a quarter of the width and a smaller size, for the fast tests.
CIFAR10_SMALL = {**CIFAR10, "block_out_channels": [32, 64, 64, 64], "sample_size": 16}
LAYOUT_256_SMALL = {**LAYOUT_256, "block_out_channels": [32, 32, 64, 64, 128, 128],
                    "sample_size": 64}


def _unet_config(d: dict) -> dict:
    return {k: v for k, v in d.items() if not k.startswith("_")}


def _random_diffusers_unet(config: dict, seed: int = 0) -> UNet2DModel:
    torch.manual_seed(seed)
    net = UNet2DModel(**_unet_config(config)).eval()
    with torch.no_grad():  # GroupNorm affines too, so a swapped norm cannot hide
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return net


def _inputs(channels: int, size: int, batch: int = 2, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, channels, size, size, generator=g),
            torch.randint(0, 1000, (batch,), generator=g))


def _save_pipeline(path: Path, unet: UNet2DModel, **scheduler) -> Path:
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler(**scheduler)).save_pretrained(path)
    return path


def _make_run(path: Path, diffusion: DiffusionConfig, model: ModelConfig | None = None,
              seed: int = 0) -> Path:
    """A ddpmkit checkpoint with random weights (EMA and raw differ)."""
    model = model or dataclasses.replace(MODEL_PRESETS["tiny"], out_channels=(
        2 if diffusion.variance == "learned_range" else 1))
    cfg = RunConfig(model=model, diffusion=diffusion)
    torch.manual_seed(seed)
    raw = build_model(cfg.model) if model.arch == "mlp" else UNet(cfg.model, zero_init=False)
    ema = {k: v + 0.01 * torch.randn_like(v) for k, v in raw.state_dict().items()}
    save_checkpoint(path, 7, raw.state_dict(), ema, {}, {}, cfg)
    return path


def _one_error_line(capsys, rc: int, *words: str) -> str:
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err, err
    for w in words:
        assert w in err, (w, err)
    return err


# ---- the published layouts ------------------------------------------------------------------

@pytest.mark.parametrize("config, preset", [(CIFAR10, "cifar10"), (LAYOUT_256, "celebahq256")])
def test_published_configs_map_onto_the_presets_and_every_key(config, preset):
    ours = model_config_from_unet2d(config)
    # The configs hold no dropout (a training setting): diffusers' default 0.
    assert ours == dataclasses.replace(MODEL_PRESETS[preset], dropout=0.0, out_channels=3)
    with torch.device("meta"):  # full size, but no memory and no time
        theirs = UNet2DModel(**_unet_config(config)).state_dict()
        mine = UNet(ours).state_dict()
    mapped = {to_diffusers_name(k): tuple(v.shape) for k, v in mine.items()}
    assert mapped == {k: tuple(v.shape) for k, v in theirs.items()}
    # ... and back: the exported config is the published one, field for field.
    exported = unet2d_config_from_model(ours)
    assert {k: exported[k] for k in _unet_config(config)} == _unet_config(config)


@pytest.mark.parametrize("config", [CIFAR10_SMALL, LAYOUT_256_SMALL,
                                    {**CIFAR10_SMALL, "attention_head_dim": 16}],
                         ids=["cifar10-layout", "256-layout", "4-heads"])
def test_import_and_export_of_a_unet_give_the_same_outputs(tmp_path, config):
    theirs = _random_diffusers_unet(config)
    theirs.save_pretrained(tmp_path / "unet")  # a bare UNet2DModel folder
    run = ddpmkit.load(tmp_path / "unet", device="cpu")
    x, t = _inputs(3, config["sample_size"])
    with torch.no_grad():
        want = theirs(x, t).sample
        got = run.model(x, t)
    assert want.abs().mean() > 0.1
    assert (got - want).abs().max() <= 1e-4
    # Export what was imported: diffusers loads the same tensors back.
    assert main(["export", "--checkpoint", str(tmp_path / "unet"), "--out",
                 str(tmp_path / "pipe")]) == 0
    back = DDPMPipeline.from_pretrained(tmp_path / "pipe").unet
    for name, value in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[name], value), name


@pytest.mark.slow
@pytest.mark.parametrize("config", [CIFAR10, LAYOUT_256], ids=["cifar10-32", "256"])
def test_full_size_published_layouts_give_the_same_outputs(tmp_path, config):
    theirs = _random_diffusers_unet(config)
    theirs.save_pretrained(tmp_path / "unet")
    run = ddpmkit.load(tmp_path / "unet", device="cpu")
    x, t = _inputs(3, config["sample_size"], batch=1)
    with torch.no_grad():
        assert (run.model(x, t) - theirs(x, t).sample).abs().max() <= 1e-4


def test_old_attention_names_and_bin_weights_are_read_with_notes(tmp_path, capsys):
    """diffusers < 0.14 conversions (the google/ddpm-* repositories) name the attention
    weights query/key/value/proj_attn; older repositories ship a pickle .bin. No scheduler
    config beside a bare UNet folder: the DDPM paper's schedule, said in one line."""
    theirs = _random_diffusers_unet(CIFAR10_SMALL)
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for k, v in theirs.state_dict().items():
        for new, legacy in old.items():
            k = k.replace(f".{new}.", f".{legacy}.")
        state[k] = v
    assert any(".proj_attn." in k for k in state)
    folder = tmp_path / "old"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(CIFAR10_SMALL))
    torch.save(state, folder / "diffusion_pytorch_model.bin")
    run = ddpmkit.load(folder, device="cpu")
    err = capsys.readouterr().err
    assert "weights_only=True" in err and "safetensors" in err
    assert "no scheduler config" in err and "1e-4..0.02" in err
    x, t = _inputs(3, 16)
    with torch.no_grad():
        assert (run.model(x, t) - theirs(x, t).sample).abs().max() <= 1e-4
    d = run.diffusion
    assert d.num_timesteps == 1000 and d.variance == "fixed_large" and d.prediction == "eps"
    assert torch.allclose(d.betas, torch.linspace(1e-4, 0.02, 1000, dtype=torch.float64),
                          rtol=0, atol=1e-15)
    assert run.config.sample.clip_denoised and run.step is None and run.source == "diffusers"


# ---- schedulers -----------------------------------------------------------------------------

SCHEDULERS = [
    (dict(beta_schedule="linear", variance_type="fixed_large", prediction_type="epsilon"),
     ("linear", "fixed_large", "eps")),
    (dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
          variance_type="fixed_small_log", prediction_type="sample", clip_sample=False),
     ("custom", "fixed_small", "x0")),
    (dict(beta_schedule="squaredcos_cap_v2", num_train_timesteps=400,
          variance_type="learned_range", prediction_type="v_prediction"),
     ("cosine", "learned_range", "v")),
    (dict(trained_betas=np.linspace(1e-3, 0.05, 300).tolist(), num_train_timesteps=300,
          variance_type="fixed_large_log"), ("custom", "fixed_large", "eps")),
    (dict(beta_schedule="linear", beta_start=1e-3, beta_end=0.2, num_train_timesteps=100,
          clip_sample_range=3.0, clip_sample=False), ("linear", "fixed_small", "eps")),
]


@pytest.mark.parametrize("kwargs, expected", SCHEDULERS,
                         ids=["linear", "scaled_linear", "cosine", "trained", "linear-T100"])
def test_scheduler_configs_map_to_our_diffusion(kwargs, expected):
    sched = DDPMScheduler(**kwargs)
    settings = settings_from_scheduler(dict(sched.config))
    d = settings.diffusion
    assert (d.schedule, d.variance, d.prediction) == expected
    diffusion = build_diffusion(RunConfig(diffusion=d))
    assert diffusion.num_timesteps == sched.config.num_train_timesteps
    # diffusers holds float32 betas; ours are float64 from the same formula.
    assert (diffusion.betas - sched.betas.double()).abs().max() <= 1e-6
    assert settings.clip_sample == sched.config.clip_sample


@pytest.mark.parametrize("field, value", [
    ("beta_schedule", "sigmoid"), ("variance_type", "learned"), ("prediction_type", "x0"),
    ("clip_sample_range", 2.0), ("thresholding", True), ("rescale_betas_zero_snr", True),
    ("num_train_timesteps", 0), ("karras_sigmas", True)])
def test_unsupported_scheduler_settings_are_named(field, value):
    with pytest.raises(ConfigError, match=field) as e:
        settings_from_scheduler({"_class_name": "DDPMScheduler", field: value})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("field, value", [
    ("flip_sin_to_cos", True), ("freq_shift", 0), ("downsample_padding", 1),
    ("norm_eps", 1e-5), ("attention_head_dim", 48), ("act_fn", "gelu"),
    ("class_embed_type", "timestep"), ("down_block_types",
                                       ["DownBlock2D", "CrossAttnDownBlock2D"] + ["DownBlock2D"] * 2),
    ("up_block_types", ["UpBlock2D"] * 4), ("block_out_channels", [128, 192, 256, 256]),
    ("resnet_time_scale_shift", "scale_shift"), ("sample_size", [32, 16]),
    ("cross_attention_dim", 768)])
def test_unsupported_unet_settings_are_named(field, value):
    with pytest.raises(ConfigError, match=field) as e:
        model_config_from_unet2d({**CIFAR10, field: value})
    assert "\n" not in str(e.value)


def test_a_missing_field_means_the_diffusers_default():
    # UNet2DModel's default attention_head_dim is 8 (diffusers 0.42), not "one head".
    cfg = {k: v for k, v in CIFAR10.items() if k != "attention_head_dim"}
    assert model_config_from_unet2d(cfg).num_heads == 256 // 8
    # Head dim 8 over widths 256 (16x16) and 512 (middle): 32 and 64 heads, which our one
    # num_heads cannot hold.
    with pytest.raises(ConfigError, match="attention_head_dim"):
        model_config_from_unet2d({**cfg, "block_out_channels": [128, 256, 256, 512]})


def test_cli_errors_for_an_unsupported_folder_and_a_hub_id(tmp_path, capsys):
    folder = tmp_path / "m"
    _random_diffusers_unet(CIFAR10_SMALL).save_pretrained(folder)
    cfg = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**cfg, "flip_sin_to_cos": True}))
    rc = main(["sample", "--checkpoint", str(folder), "--out", str(tmp_path / "s.png")])
    _one_error_line(capsys, rc, "flip_sin_to_cos", str(folder))
    rc = main(["sample", "--checkpoint", "google/ddpm-cifar10-32", "--out",
               str(tmp_path / "s.png")])
    _one_error_line(capsys, rc, "huggingface-cli download google/ddpm-cifar10-32 "
                    "--local-dir ddpm-cifar10-32")


# ---- export ---------------------------------------------------------------------------------

EXPORTS = [
    (DiffusionConfig(schedule="cosine", timesteps=1000), "squaredcos_cap_v2", "fixed_small",
     "epsilon"),
    (DiffusionConfig(schedule="linear", timesteps=200, prediction="x0", variance="fixed_large"),
     "linear", "fixed_large", "sample"),
    (DiffusionConfig(schedule="sigmoid", timesteps=100, prediction="v",
                     variance="learned_range", loss="hybrid"), "trained", "learned_range",
     "v_prediction"),
]


@pytest.mark.parametrize("diffusion, schedule, variance, prediction", EXPORTS,
                         ids=["cosine", "linear-T200", "sigmoid-learned"])
def test_export_gives_a_pipeline_with_our_outputs_and_betas(tmp_path, diffusion, schedule,
                                                            variance, prediction):
    run = _make_run(tmp_path / "run", diffusion)
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "pipe")]) == 0
    pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    ours = ddpmkit.load(run, device="cpu")
    x, t = _inputs(1, 8)
    t = t % diffusion.timesteps
    with torch.no_grad():
        assert (pipe.unet(x, t).sample - ours.model(x, t)).abs().max() <= 1e-4
    sc = pipe.scheduler.config
    if schedule == "trained":
        assert sc.trained_betas is not None
    else:
        assert sc.trained_betas is None and sc.beta_schedule == schedule
    assert (pipe.scheduler.betas.double() - ours.diffusion.betas).abs().max() <= 1e-6
    assert (sc.variance_type, sc.prediction_type, sc.clip_sample) == (variance, prediction, True)
    # ... and ddpmkit reads its own export back to the same model and diffusion.
    back = ddpmkit.load(tmp_path / "pipe", device="cpu")
    assert back.config.diffusion.schedule == (
        diffusion.schedule if schedule != "trained" else "custom")
    assert (back.diffusion.betas - ours.diffusion.betas).abs().max() <= 1e-15
    with torch.no_grad():
        assert torch.equal(back.model(x, t), ours.model(x, t))


def test_export_takes_ema_weights_unless_no_ema(tmp_path):
    run = _make_run(tmp_path / "run", DiffusionConfig(timesteps=100))
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "ema")]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "raw"),
                 "--no-ema"]) == 0
    for name, use_ema in (("ema", True), ("raw", False)):
        ours = ddpmkit.load(run, device="cpu", use_ema=use_ema).model.state_dict()
        theirs = UNet2DModel.from_pretrained(tmp_path / name / "unet").state_dict()
        assert all(torch.equal(theirs[to_diffusers_name(k)], v) for k, v in ours.items())


def test_export_refuses_what_diffusers_cannot_hold_and_unsafe_outs(tmp_path, capsys):
    points = _make_run(tmp_path / "points", DiffusionConfig(timesteps=100),
                       model=dataclasses.replace(MODEL_PRESETS["toy2d"], out_channels=2))
    rc = main(["export", "--checkpoint", str(points), "--out", str(tmp_path / "p")])
    _one_error_line(capsys, rc, "2-D")
    assert not (tmp_path / "p").exists()
    heads = _make_run(tmp_path / "heads", DiffusionConfig(timesteps=100), model=dataclasses.replace(
        MODEL_PRESETS["tiny"], num_heads=2, attention_resolutions=(8,), out_channels=1))
    rc = main(["export", "--checkpoint", str(heads), "--out", str(tmp_path / "h")])
    _one_error_line(capsys, rc, "num_heads=2", "attention_head_dim")
    run = _make_run(tmp_path / "run", DiffusionConfig(timesteps=100))
    rc = main(["export", "--checkpoint", str(run), "--out", str(run / "checkpoints" / "x")])
    _one_error_line(capsys, rc, "overlaps")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    rc = main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "busy")])
    _one_error_line(capsys, rc, "not empty", "--force")
    rc = main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "busy"), "--force"])
    _one_error_line(capsys, rc, "not a diffusers pipeline folder")
    assert (tmp_path / "busy" / "notes.txt").read_text() == "mine"
    out = str(tmp_path / "pipe")
    assert main(["export", "--checkpoint", str(run), "--out", out]) == 0
    assert main(["export", "--checkpoint", str(run), "--out", out, "--no-ema", "--force"]) == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


# ---- sampling and bits/dim through the other library ------------------------------------

def test_ddpm_pipeline_and_our_ancestral_sampler_draw_the_same_images(tmp_path):
    """Linear schedule, T = 50 (beta 2e-3 .. 0.4: ddpmkit's linear schedule rescaled to T, which
    exports as diffusers' "linear" with those endpoints), eps prediction, fixed_large
    variance, x0 clipped; DDPMPipeline with num_inference_steps = T visits every step. Both
    draw x_T and then one noise tensor per step t > 0 from one seeded CPU generator, so the
    chains see the same noise; they differ only in schedule arithmetic (diffusers float32,
    ddpmkit float64 cast to float32), measured at ~6e-6 after 100 steps."""
    run = _make_run(tmp_path / "run", DiffusionConfig(schedule="linear", timesteps=50,
                                                      variance="fixed_large"))
    assert main(["export", "--checkpoint", str(run), "--out", str(tmp_path / "pipe")]) == 0
    pipe = DDPMPipeline.from_pretrained(tmp_path / "pipe")
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(batch_size=3, generator=torch.Generator().manual_seed(5),
                  num_inference_steps=50, output_type="pt").images  # [B, C, H, W] in [0, 1]
    ours = ddpmkit.load(run, device="cpu")
    x = ddpmkit.sample(ours.model, ours.diffusion, (3, 1, 8, 8), method="ancestral",
                       generator=torch.Generator().manual_seed(5))
    ours_01 = (x / 2 + 0.5).clamp(0, 1)
    assert theirs.std() > 0.1
    assert (theirs - ours_01).abs().max() <= 1e-4
    # A different seed is a different image: the comparison can fail.
    other = ddpmkit.sample(ours.model, ours.diffusion, (3, 1, 8, 8), method="ancestral",
                           generator=torch.Generator().manual_seed(6))
    assert (theirs - (other / 2 + 0.5).clamp(0, 1)).abs().max() > 0.1


@pytest.fixture
def tiny_npy(tmp_path) -> Path:
    """40 random 8x8 grey uint8 images: 38 train, 2 test."""
    path = tmp_path / "tiny.npy"
    np.save(path, np.random.default_rng(0).integers(0, 256, (40, 8, 8), dtype=np.uint8))
    return path


def test_eval_and_sample_of_an_imported_model(tmp_path, capsys, tiny_npy):
    """`ddpmkit eval` on a diffusers folder: the bits/dim of the same weights and schedule
    as a ddpmkit checkpoint, to the last digit; a diffusers model names no data set."""
    run = _make_run(tmp_path / "run", DiffusionConfig(schedule="linear", timesteps=30))
    pipe = tmp_path / "pipe"
    assert main(["export", "--checkpoint", str(run), "--out", str(pipe)]) == 0
    capsys.readouterr()
    figures = []
    for source in (run, pipe):
        assert main(["eval", "--checkpoint", str(source), "--data", str(tiny_npy), "--json",
                     "--no-progress"]) == 0
        figures.append(json.loads(capsys.readouterr().out))
    ours, theirs = figures
    assert theirs["n"] == 2 and theirs["levels"] == 256 and theirs["timesteps"] == 30
    assert 0 < theirs["bits_per_dim"] < 30 and theirs["bits_per_dim"] == ours["bits_per_dim"]
    rc = main(["eval", "--checkpoint", str(pipe), "--no-progress"])
    _one_error_line(capsys, rc, "--data", "names no data set")
    out = tmp_path / "s.npz"
    assert main(["sample", "--checkpoint", str(pipe), "--num", "3", "--steps", "5", "--out",
                 str(out), "--no-progress"]) == 0
    assert np.load(out)["arr_0"].shape == (3, 8, 8, 1)
    # show: the reverse process only, unless --data gives images for the forward one
    assert main(["show", "--checkpoint", str(pipe), "--num", "2", "--frames", "3", "--out",
                 str(tmp_path / "show")]) == 0
    assert "pass --data" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "show").iterdir()) == ["reverse.gif",
                                                                     "reverse.png"]
    assert main(["encode", "--checkpoint", str(pipe), "--data", str(tiny_npy), "--num", "2",
                 "--steps", "5", "--out", str(tmp_path / "codes.npz")]) == 0
    assert np.load(tmp_path / "codes.npz")["x_T"].shape == (2, 1, 8, 8)


def test_inference_commands_never_import_the_trainer(tmp_path):
    run = _make_run(tmp_path / "run", DiffusionConfig(timesteps=30))
    code = ("import sys; from ddpmkit.cli import main; "
            f"rc = main(['sample', '--checkpoint', {str(run)!r}, '--num', '2', '--steps', '2', "
            f"'--out', {str(tmp_path / 's.png')!r}, '--no-progress']); "
            "print(rc, 'ddpmkit.train.trainer' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout.split()
    assert out[-2:] == ["0", "False"]


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        ddpmkit.load(tmp_path / "nothing")
    folder = tmp_path / "m"
    _random_diffusers_unet(CIFAR10_SMALL).save_pretrained(folder)
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="diffusion_pytorch_model"):
        ddpmkit.load(folder)
