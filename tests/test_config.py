from pathlib import Path

import pytest

from vlp3d.config import ConfigError, ExperimentConfig, config_hash, flatten, load_config, to_toml

ROOT = Path(__file__).resolve().parents[1]


def test_precedence_defaults_file_overrides(tmp_path):
    path = tmp_path / "exp.toml"
    path.write_text('[train]\nlr = 0.5\nmax_steps = 7\n[model]\nembed_dim = 64\n')
    cfg = load_config(path, ["train.lr=0.25"])
    assert cfg.train.lr == 0.25  # override beats file
    assert cfg.train.max_steps == 7  # file beats default
    assert cfg.model.embed_dim == 64
    assert cfg.train.global_batch == ExperimentConfig().train.global_batch  # default
    assert cfg.name == "exp"  # the file stem names the experiment


def test_override_values_use_toml_syntax():
    cfg = load_config(None, ["data.shape=[32, 32, 16]", "train.augment=false", "model.text_encoder=minilm"])
    assert cfg.data.shape == (32, 32, 16)
    assert cfg.train.augment is False
    assert cfg.model.text_encoder == "minilm"


def test_unknown_key_names_key_and_suggests_closest(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'train\.lrr'.*Did you mean 'train\.lr'"):
        load_config(None, ["train.lrr=1e-3"])
    path = tmp_path / "bad.toml"
    path.write_text("[trian]\nlr = 1.0\n")
    with pytest.raises(ConfigError, match=r"bad\.toml.*unknown section 'trian'.*Did you mean 'train'"):
        load_config(path)


def test_type_and_choice_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"train\.max_steps: expected int"):
        load_config(None, ["train.max_steps=ten"])
    with pytest.raises(ConfigError, match=r"train\.precision: 'fp8' is not one of"):
        load_config(None, ["train.precision=fp8"])
    with pytest.raises(ConfigError, match=r"data\.shape: expected 3 values"):
        load_config(None, ["data.shape=[32, 32]"])
    with pytest.raises(ConfigError, match="section.key=value"):
        load_config(None, ["train.lr"])


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.toml")
    bad = tmp_path / "broken.toml"
    bad.write_text("[train\nlr=1")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config(bad)


def test_round_trip_and_hash(tmp_path):
    cfg = load_config(None, ["train.lr=0.01", "data.report_sections=['Findings_EN']"])
    path = tmp_path / "round.toml"
    path.write_text(to_toml(cfg))
    again = load_config(path)
    assert again == cfg
    assert config_hash(again) == config_hash(cfg)
    assert config_hash(load_config(None, ["train.lr=0.02"])) != config_hash(cfg)
    assert flatten(cfg)["train.lr"] == "0.01"


def test_demo_config_equals_builtin_defaults():
    assert load_config(ROOT / "configs" / "demo.toml") == ExperimentConfig()


def test_config_show_cli(capsys):
    from vlp3d.cli import main

    assert main(["config", "show", str(ROOT / "configs" / "demo.toml"), "train.max_steps=5"]) == 0
    out = capsys.readouterr().out
    assert "max_steps = 5" in out and "[cluster]" in out
    assert main(["config", "show", "trian.max_steps=5"]) == 2
    assert "Did you mean 'train'" in capsys.readouterr().err


def test_every_shipped_config_loads_and_method_defaults_apply():
    from pathlib import Path

    configs = {p.stem: load_config(p) for p in sorted(Path("configs").glob("*.toml"))}
    assert {"mg3d_demo", "t3d_demo", "unimedi_demo", "mg3d_ctrate", "t3d_ctrate", "unimedi_ctrate",
            "mg3d_demo_no_interpatient", "mg3d_demo_no_reconstruction"} <= set(configs)
    for name, cfg in configs.items():
        assert cfg.objective.name == ("clip" if name == "demo" else name.split("_")[0])
    mg3d = configs["mg3d_ctrate"].objective
    # METHODS.md: align 0.1 at tau 0.1, mim/mlm 1.0, the others 0.1, heads at 5x the encoder lr
    assert (mg3d.align_weight, mg3d.temperature, mg3d.learnable_temperature, mg3d.head_lr_mult) == (0.1, 0.1, False, 5.0)
    assert (mg3d.mim_weight, mg3d.mlm_weight, mg3d.sentence_consistency_weight, mg3d.disentangled_weight,
            mg3d.sentence_match_weight, mg3d.mim_mask_ratio, mg3d.mlm_mask_prob) == (1.0, 1.0, 0.1, 0.1, 0.1, 0.5, 0.15)
    assert configs["mg3d_demo_no_interpatient"].objective.disentangled_weight == 0.0
    assert configs["mg3d_demo_no_reconstruction"].objective.mim_weight == 0.0
    # an explicit key beats the method default
    assert load_config(None, ["objective.name=mg3d", "objective.align_weight=1.0"]).objective.align_weight == 1.0
