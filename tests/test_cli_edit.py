"""Class-conditional training and the conditioning/editing commands end to end, on tiny runs."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ddpmkit.cli import main
from ddpmkit.train.trainer import drop_labels, label_uniforms

TINY_FLAGS = ["--model-channels", "16", "--channel-mult", "1,2", "--num-res-blocks", "1",
              "--attention-resolutions", "4", "--groups", "8", "--timesteps", "40",
              "--batch-size", "16", "--warmup-steps", "2", "--log-every", "2",
              "--sample-num", "4", "--sample-steps", "4", "--no-progress"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    cond, uncond = root / "cond", root / "uncond"
    assert main(["train", "--out", str(cond), "--class-cond", "--class-dropout", "0.2",
                 "--max-steps", "5", "--max-minutes", "0", "--lr", "1e-2", *TINY_FLAGS,
                 "--batch-size", "64"]) == 0
    assert main(["train", "--out", str(uncond), "--max-steps", "1", "--max-minutes", "0",
                 *TINY_FLAGS]) == 0
    return cond, uncond


def test_class_cond_training_finds_classes_and_trains_every_label(runs):
    cond, _ = runs
    cfg = json.loads((cond / "config.json").read_text())
    assert cfg["model"]["num_classes"] == 10 and cfg["model"]["class_cond"]
    assert cfg["train"]["class_dropout"] == 0.2
    ckpt = sorted((cond / "checkpoints").iterdir())[-1]
    emb = load_file(ckpt / "model.safetensors")["class_embed.embedding.weight"]
    from ddpmkit.config import RunConfig
    from ddpmkit.nn import build_model
    torch.manual_seed(RunConfig.from_dict(cfg).train.seed)  # the trainer's initial weights
    init = build_model(RunConfig.from_dict(cfg).model).state_dict()["class_embed.embedding."
                                                                    "weight"]
    moved = (emb - init).abs().sum(dim=1) > 0
    # digits labels reached the network (rows 0..9 trained), and so did the null class (row 10)
    # (steps 3-5 see ~150 labelled examples: every digit; with labels lost, only row 10 moves)
    assert moved.all(), moved
    assert (cond / "samples.png").exists()


def test_drop_labels_rate_and_null_index():
    y = torch.randint(0, 10, (20000,))
    u = label_uniforms(0, list(range(20000)))
    out = drop_labels(y, 0.1, 10, u)
    share = float((out == 10).float().mean())
    assert abs(share - 0.1) < 5 * (0.1 * 0.9 / 20000) ** 0.5
    assert torch.equal(out[out != 10], y[out != 10])
    assert torch.equal(drop_labels(y, 0.0, 10, u), y)
    # an example's draw depends on its stream index only (any rank split), not on the batch
    assert torch.equal(label_uniforms(0, [5, 7]), u[[5, 7]])
    assert not torch.equal(label_uniforms(1, [5, 7]), u[[5, 7]])


def test_sample_class_and_guidance(runs, tmp_path, capsys):
    cond, uncond = runs
    out = tmp_path / "k.npz"
    assert main(["sample", "--checkpoint", str(cond), "--class", "3", "--guidance", "2",
                 "--num", "4", "--steps", "3", "--out", str(out), "--no-progress"]) == 0
    assert np.load(out)["arr_0"].shape == (4, 8, 8, 1)
    assert main(["sample", "--checkpoint", str(cond), "--class", "all", "--num", "2",
                 "--steps", "3", "--out", str(tmp_path / "all.npz"), "--no-progress"]) == 0
    assert np.load(tmp_path / "all.npz")["arr_0"].shape == (20, 8, 8, 1)
    # S = 0 is the null class: the same images as sampling without --class
    common = ["--num", "3", "--steps", "3", "--no-progress", "--checkpoint", str(cond)]
    assert main(["sample", *common, "--class", "5", "--guidance", "0", "--out",
                 str(tmp_path / "g0.npz")]) == 0
    assert main(["sample", *common, "--out", str(tmp_path / "null.npz")]) == 0
    assert np.array_equal(np.load(tmp_path / "g0.npz")["arr_0"],
                          np.load(tmp_path / "null.npz")["arr_0"])
    capsys.readouterr()
    assert main(["sample", *common, "--guidance", "2", "--out", str(out)]) == 2
    assert "--guidance needs --class" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(cond), "--class", "10", "--num", "2",
                 "--out", str(out), "--no-progress"]) == 2
    assert "out of range" in capsys.readouterr().err
    assert main(["sample", "--checkpoint", str(uncond), "--class", "1", "--num", "2",
                 "--out", str(out), "--no-progress"]) == 2
    assert "class-conditional" in capsys.readouterr().err


def test_eval_reports_conditional_and_unconditional_bounds(runs, capsys):
    cond, _ = runs
    capsys.readouterr()
    assert main(["eval", "--checkpoint", str(cond), "--max-examples", "2", "--json",
                 "--no-progress"]) == 0
    lines = [json.loads(s) for s in capsys.readouterr().out.strip().splitlines()[-2:]]
    assert [r["bound"] for r in lines] == ["conditional", "unconditional"]
    assert lines[0]["bits_per_dim"] != lines[1]["bits_per_dim"]


def _digits_u8(n):
    from sklearn.datasets import load_digits
    imgs = load_digits().images[-n:]  # test digits, 0..16
    return np.round(imgs / 16 * 255).astype(np.uint8)[..., None]


def _bottom_half_task(tmp_path, n):
    """n test digits in tmp_path/in.npz and a mask PNG marking their bottom half (rows 4-7)."""
    imgs = _digits_u8(n)
    np.savez(tmp_path / "in.npz", arr_0=imgs)
    mask = np.zeros((8, 8), np.uint8)
    mask[4:] = 255
    Image.fromarray(mask).save(tmp_path / "mask.png")
    return imgs


def test_inpaint_npz_keeps_pixels_bit_for_bit(runs, tmp_path, capsys):
    _, uncond = runs
    imgs = _bottom_half_task(tmp_path, 3)
    out = tmp_path / "out.npz"
    assert main(["inpaint", "--checkpoint", str(uncond), "--image", str(tmp_path / "in.npz"),
                 "--mask", str(tmp_path / "mask.png"), "--out", str(out), "--steps", "3",
                 "--jump", "2", "--resample", "2", "--no-progress"]) == 0
    res = np.load(out)["arr_0"]
    assert res.shape == imgs.shape and res.dtype == np.uint8
    assert np.array_equal(res[:, :4], imgs[:, :4])
    # bad masks: grey values, all black, wrong size -> one error line, exit 2
    for name, m in (("grey", np.full((8, 8), 128, np.uint8)), ("black", np.zeros((8, 8),
                    np.uint8)), ("size", np.zeros((4, 4), np.uint8) + 255)):
        Image.fromarray(m).save(tmp_path / f"{name}.png")
        capsys.readouterr()
        assert main(["inpaint", "--checkpoint", str(uncond), "--image",
                     str(tmp_path / "in.npz"), "--mask", str(tmp_path / f"{name}.png"),
                     "--out", str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err, err


def test_inpaint_reconstruction_method(runs, tmp_path, capsys):
    cond, uncond = runs
    imgs = _bottom_half_task(tmp_path, 2)
    common = ["--image", str(tmp_path / "in.npz"), "--mask", str(tmp_path / "mask.png"),
              "--steps", "3", "--resample", "1", "--no-progress", "--method", "reconstruction"]
    for run, extra in ((uncond, []), (cond, ["--class", "4", "--guidance", "2"])):
        out = tmp_path / f"{run.name}.npz"
        capsys.readouterr()
        assert main(["inpaint", "--checkpoint", str(run), *common, "--recon-weight", "8",
                     *extra, "--out", str(out)]) == 0
        assert "reconstruction, 3 steps, jump 2, resample 1, w_r 8" in capsys.readouterr().out
        res = np.load(out)["arr_0"]
        assert res.shape == imgs.shape and np.array_equal(res[:, :4], imgs[:, :4])
    # the guidance changes the generated pixels; weight 0 is plain replacement
    for args, name in ((["--recon-weight", "0"], "w0"), (["--method", "replace"], "rep")):
        assert main(["inpaint", "--checkpoint", str(uncond), *common, *args,
                     "--out", str(tmp_path / f"{name}.npz")]) == 0
    w0, rep = (np.load(tmp_path / f"{n}.npz")["arr_0"] for n in ("w0", "rep"))
    assert np.array_equal(w0, rep)
    assert not np.array_equal(np.load(tmp_path / "uncond.npz")["arr_0"], rep)
    from ddpmkit.cli_edit import INPAINT_DEFAULTS
    from ddpmkit.editing import RECONSTRUCTION_WEIGHT
    assert INPAINT_DEFAULTS["recon_weight"] == RECONSTRUCTION_WEIGHT  # CLI and API agree
    for bad in ("-1", "nan", "x"):
        capsys.readouterr()
        with pytest.raises(SystemExit) as e:
            main(["inpaint", "--checkpoint", str(uncond), *common, "--recon-weight", bad,
                  "--out", str(tmp_path / "bad.npz")])
        assert e.value.code == 2 and "--recon-weight" in capsys.readouterr().err
    capsys.readouterr()
    assert main(["inpaint", "--checkpoint", str(uncond), *common, "--method", "repaint",
                 "--recon-weight", "2", "--out", str(tmp_path / "bad.npz")]) == 2
    assert "--recon-weight applies to --method reconstruction" in capsys.readouterr().err


def test_inpaint_png_with_class_edit_and_interpolate(runs, tmp_path):
    cond, _ = runs
    img = _digits_u8(2)
    Image.fromarray(img[0, ..., 0]).save(tmp_path / "a.png")
    Image.fromarray(img[1, ..., 0]).save(tmp_path / "b.png")
    mask = np.zeros((8, 8), np.uint8)
    mask[:, 4:] = 255
    Image.fromarray(mask).save(tmp_path / "m.png")
    assert main(["inpaint", "--checkpoint", str(cond), "--image", str(tmp_path / "a.png"),
                 "--mask", str(tmp_path / "m.png"), "--out", str(tmp_path / "o.png"),
                 "--method", "replace", "--steps", "3", "--class", "4", "--guidance", "2",
                 "--no-progress"]) == 0
    out = np.asarray(Image.open(tmp_path / "o.png"))
    assert out.shape == (8, 8) and np.array_equal(out[:, :4], img[0, :, :4, 0])
    assert main(["edit", "--checkpoint", str(cond), "--image", str(tmp_path / "a.png"),
                 "--strength", "0.5", "--steps", "3", "--class", "7",
                 "--out", str(tmp_path / "e.png")]) == 0
    # explicit --guidance 0 is the null class (not the default scale): as without --class
    for extra, name in ((["--class", "7", "--guidance", "0"], "e0.png"), ([], "en.png")):
        assert main(["edit", "--checkpoint", str(cond), "--image", str(tmp_path / "a.png"),
                     "--steps", "3", *extra, "--out", str(tmp_path / name)]) == 0
    assert np.array_equal(np.asarray(Image.open(tmp_path / "e0.png")),
                          np.asarray(Image.open(tmp_path / "en.png")))
    assert np.asarray(Image.open(tmp_path / "e.png")).shape == (8, 8)
    assert main(["interpolate", "--checkpoint", str(cond), "--image", str(tmp_path / "a.png"),
                 "--image", str(tmp_path / "b.png"), "--num", "4", "--steps", "3",
                 "--out", str(tmp_path / "i.png")]) == 0
    assert (tmp_path / "i.png").exists()
