import pytest

from ddpmkit import config as C
from ddpmkit.cli import main
from ddpmkit.errors import ConfigError


def test_toml_roundtrip_of_every_preset(tmp_path):
    for name, cfg in C.RUN_PRESETS.items():
        path = tmp_path / f"{name}.toml"
        path.write_text(C.to_toml(cfg))
        assert C.RunConfig.load(path) == cfg


def test_json_roundtrip():
    cfg = C.RUN_PRESETS["digits"]
    assert C.RunConfig.from_json(cfg.to_json()) == cfg


@pytest.mark.parametrize("d,match", [
    ({"train": {"batchsize": 3}}, "did you mean 'batch_size'"),
    ({"trian": {}}, "did you mean 'train'"),
    ({"train": {"lr": "fast"}}, "lr='fast' must be a number"),
    ({"train": {"batch_size": 2.5}}, "must be an integer"),
    ({"train": {"batch_size": -1}}, "batch_size=-1 must be > 0"),
    ({"diffusion": {"timesteps": 0}}, "timesteps=0"),
    ({"diffusion": {"schedule": "cosin"}}, "did you mean 'cosine'"),
    ({"diffusion": {"loss": "hybrid"}}, "learned_range"),
    ({"sample": {"spacing": "10,x"}}, "spacing"),
    ({"model": {"dropout": 1.5}}, "dropout"),
    ({"train": {"lr": float("nan")}}, "finite"),
    ({"version": 99}, "newer"),
])
def test_bad_values_name_the_problem(d, match):
    with pytest.raises(ConfigError, match=match):
        C.RunConfig.from_dict(d)


def test_cli_error_is_one_line(capsys):
    assert main(["train", "--lr", "abc", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "lr" in err and "Traceback" not in err


def test_cli_unknown_preset(capsys):
    assert main(["train", "--config", "digit"]) == 2
    assert "did you mean 'digits'" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["train", "sample", "eval", "show", "config"])
def test_every_command_has_help(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    assert e.value.code == 0
    assert "usage: ddpmkit " + cmd in capsys.readouterr().out


def test_eval_prints_tiny_bound_terms_with_significant_digits():
    from ddpmkit.cli import _term
    assert _term(3.34612) == "3.3461"
    assert _term(1.2e-19) == "1.2e-19"  # L_0 of 17-level digits: small, not zero
    assert _term(0.0) == "0.0000"
    assert _term(0.0012) == "0.0012"


def test_custom_schedule_roundtrips_and_is_checked(tmp_path):
    betas = (1e-4, 0.25, 0.999)
    cfg = C.RunConfig.from_dict({"diffusion": {"schedule": "custom", "timesteps": 3,
                                               "betas": list(betas)}})
    assert cfg.diffusion.betas == betas
    path = tmp_path / "c.toml"
    path.write_text(C.to_toml(cfg))
    assert C.RunConfig.load(path) == cfg == C.RunConfig.from_json(cfg.to_json())
    for d, match in [({"schedule": "custom", "timesteps": 2, "betas": list(betas)}, "3"),
                     ({"schedule": "custom", "timesteps": 3, "betas": [0.1, 1.0, 0.2]},
                      r"betas\[1\]=1.0"),
                     ({"schedule": "linear", "betas": [0.1]}, "schedule='custom'"),
                     ({"schedule": "custom", "timesteps": 1, "betas": ["x"]}, "number")]:
        with pytest.raises(ConfigError, match=match):
            C.RunConfig.from_dict({"diffusion": d})
