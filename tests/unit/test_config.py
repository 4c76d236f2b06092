from pathlib import Path

import pytest

from vlp3d.config import (
    ConfigError,
    ExperimentConfig,
    config_hash,
    describe,
    flatten,
    load_config,
    load_stored_config,
    logged_params,
    public_config,
    replace,
    to_toml,
)

ROOT = Path(__file__).resolve().parents[2]


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
        if name.startswith("finetune"):  # fine-tuning takes its encoder from the pretrained model: no method
            assert cfg.finetune.task in ("segmentation", "classification")
            continue
        assert cfg.objective.name == ("clip" if name == "demo" else name.split("_")[0])
    objective = configs["mg3d_ctrate"].objective
    # METHODS.md: align 0.1 at tau 0.1, mim/mlm 1.0, the others 0.1, heads at 5x the encoder lr
    assert (objective.align_weight, objective.temperature, objective.learnable_temperature,
            objective.head_lr_mult) == (0.1, 0.1, False, 5.0)
    mg3d = objective.mg3d
    assert (mg3d.mim_weight, mg3d.mlm_weight, mg3d.sentence_consistency_weight, mg3d.disentangled_weight,
            mg3d.sentence_match_weight, mg3d.mim_mask_ratio, mg3d.mlm_mask_prob) == (1.0, 1.0, 0.1, 0.1, 0.1, 0.5, 0.15)
    assert (mg3d.fusion_dim, mg3d.decoder_dim) == (768, 256)
    assert configs["mg3d_demo_no_interpatient"].objective.mg3d.disentangled_weight == 0.0
    assert configs["mg3d_demo_no_reconstruction"].objective.mg3d.mim_weight == 0.0
    assert configs["t3d_demo"].objective.t3d.crop_shape == (32, 32, 32)
    assert configs["unimedi_ctrate"].objective.unimedi.dino_dim == 8192
    # an explicit key beats the method default
    assert load_config(None, ["objective.name=mg3d", "objective.align_weight=1.0"]).objective.align_weight == 1.0


def test_method_defaults_apply_from_file_override_and_replace_and_are_marked(tmp_path, capsys):
    from vlp3d.cli import main
    from vlp3d.config import METHOD_DEFAULTS, flatten

    # an override or a file choosing the method: its whole set-up, except what the user set
    cfg = load_config(None, ["objective.name=t3d", "model.size=small"])
    assert (cfg.model.image_encoder, cfg.model.size, cfg.data.storage, cfg.data.spacing_mm, cfg.train.weight_decay) == \
        ("swin3d", "small", "highres", (1.0, 1.0, 1.0), 0.05)
    # replace() changing the method applies its defaults too (every key is present in a built config)
    mg3d = replace(ExperimentConfig(), objective={"name": "mg3d"})
    assert mg3d == load_config(None, ["objective.name=mg3d"])
    # ...keeps what the user chose, and takes what this call sets
    custom = replace(ExperimentConfig(), model={"size": "small"}, train={"lr": 0.5})
    switched = replace(custom, objective={"name": "unimedi"}, data={"shape_2d": [32, 32]})
    assert (switched.model.image_encoder, switched.model.size, switched.train.lr, switched.data.shape_2d) == \
        ("unimedi_vit", "small", 0.5, (32, 32))
    assert switched.train.weight_decay == 0.05
    # and switching back restores the plain defaults the method had replaced
    assert replace(mg3d, objective={"name": "clip"}) == ExperimentConfig()
    for method, defaults in METHOD_DEFAULTS.items():  # every key of the table is a real key
        flat = flatten(load_config(None, [f"objective.name={method}"]))
        assert set(defaults) <= set(flat), method

    assert main(["config", "show", "objective.name=mg3d", "model.size=small"]) == 0
    out = capsys.readouterr().out
    assert 'image_encoder = "swin3d"  # mg3d default' in out and 'size = "small"  # override\n' in out
    assert "align_weight = 0.1  # mg3d default" in out
    path = tmp_path / "shown.toml"
    path.write_text(out)
    assert load_config(path) == load_config(None, ["objective.name=mg3d", "model.size=small"])


# the methods' own settings: [objective.mg3d], [objective.t3d], [objective.unimedi]

def test_method_tables_from_toml_and_three_part_overrides(tmp_path):
    path = tmp_path / "m.toml"
    path.write_text('[objective]\nname = "mg3d"\nhead_lr_mult = 2\n\n[objective.mg3d]\nmim_weight = 0\n'
                    'match_thresholds = [0.5, 0.8]\n\n[objective.t3d]\ncrop_shape = [16, 16, 16]\n')
    cfg = load_config(path, ["objective.mg3d.mlm_weight=0.5", "objective.unimedi.dino_dim=64"])
    assert cfg.objective.mg3d.mim_weight == 0.0 and isinstance(cfg.objective.mg3d.mim_weight, float)
    assert cfg.objective.mg3d.match_thresholds == (0.5, 0.8)
    assert cfg.objective.mg3d.mlm_weight == 0.5 and cfg.objective.mg3d.fusion_dim == 256  # default kept
    assert cfg.objective.t3d.crop_shape == (16, 16, 16) and cfg.objective.unimedi.dino_dim == 64
    # METHOD_DEFAULTS still apply next to the tables; the file's key wins
    assert (cfg.objective.align_weight, cfg.objective.head_lr_mult) == (0.1, 2.0)
    # the override beats the file inside a table too
    assert load_config(path, ["objective.mg3d.mim_weight=0.25"]).objective.mg3d.mim_weight == 0.25


def test_method_table_keys_are_validated_like_any_key():
    with pytest.raises(ConfigError, match=r"unknown key 'objective\.mg3d\.fusion_dm'.*Did you mean 'objective\.mg3d\.fusion_dim'"):
        load_config(None, ["objective.mg3d.fusion_dm=3"])
    with pytest.raises(ConfigError, match=r"objective\.mg3d\.fusion_dim: expected int"):
        load_config(None, ["objective.mg3d.fusion_dim=wide"])
    with pytest.raises(ConfigError, match=r"objective\.t3d\.mim_weight'.*objective\.mg3d\.mim_weight"):
        load_config(None, ["objective.t3d.mim_weight=0"])
    with pytest.raises(ConfigError, match=r"objective\.mg3d: expected a table"):
        load_config(None, ["objective.mg3d=5"])
    with pytest.raises(ConfigError, match=r"Did you mean 'objective\.mg3d\.mim_weight'"):
        load_config(None, ["objective.mim_wieght=0"])


def test_old_flat_method_key_names_the_new_key(tmp_path):
    message = (r"objective\.mim_weight moved to objective\.mg3d\.mim_weight "
               r"\(a \[objective\.mg3d\] table in a config file\)")
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["objective.mim_weight=0"])
    path = tmp_path / "old.toml"
    path.write_text('[objective]\nname = "t3d"\ncrop_shape = [32, 32, 32]\n')
    with pytest.raises(ConfigError, match=r"old\.toml: objective\.crop_shape moved to objective\.t3d\.crop_shape"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"objective\.decoder_dim moved to objective\.mg3d\.decoder_dim and "
                                          r"objective\.t3d\.decoder_dim"):
        load_config(None, ["objective.decoder_dim=32"])
    with pytest.raises(ConfigError, match=r"objective\.dino_dim moved to objective\.unimedi\.dino_dim"):
        replace(ExperimentConfig(), objective={"dino_dim": 64})


def test_round_trip_with_method_tables(tmp_path):
    cfg = load_config(None, ["objective.name=t3d", "objective.t3d.crop_shape=[16,16,16]",
                             "objective.mg3d.mim_weight=0", "objective.unimedi.ema_momentum=[0.99, 1.0]"])
    text = to_toml(cfg)
    assert "\n[objective.mg3d]\n" in text and "\n[objective.t3d]\n" in text and "\n[objective.unimedi]\n" in text
    assert "crop_shape = [16, 16, 16]" in text.split("[objective.t3d]")[1].split("[objective.unimedi]")[0]
    path = tmp_path / "round.toml"
    path.write_text(text)
    again = load_config(path)
    assert again == cfg and config_hash(again) == config_hash(cfg)
    assert config_hash(replace(cfg, objective={"mg3d": {"mim_weight": 1.0}})) != config_hash(cfg)
    # replace() merges a method's table key by key
    changed = replace(cfg, objective={"t3d": {"num_crops": 3}})
    assert (changed.objective.t3d.num_crops, changed.objective.t3d.crop_shape) == (3, (16, 16, 16))


def test_flatten_describe_and_logged_params_walk_the_method_tables():
    cfg = load_config(None, ["objective.mg3d.mim_weight=0.5"])
    flat = flatten(cfg)
    assert flat["objective.mg3d.mim_weight"] == "0.5"
    assert flat["objective.t3d.crop_shape"] == "[96, 96, 96]" and flat["objective.align_weight"] == "1.0"
    assert not any(key in flat for key in ("objective.mim_weight", "objective.mg3d", "objective.crop_shape"))
    assert logged_params(cfg)["objective.mg3d.mim_weight"] == "0.5"
    rows = {key: (default, text) for key, default, text in describe()}
    assert rows["objective.mg3d.mim_weight"][0] == "1.0" and "mim" in rows["objective.mg3d.mim_weight"][1]
    assert rows["objective.t3d.decoder_dim"][0] == rows["objective.mg3d.decoder_dim"][0] == "128"
    assert "objective.mim_weight" not in rows and "objective.mg3d" not in rows
    assert public_config(cfg).objective == cfg.objective


def test_stored_configs_with_flat_method_keys_still_load(tmp_path):
    from vlp3d.train import checkpoint

    old = tmp_path / "config.toml"  # as checkpoints and models stored it before the method tables
    old.write_text('name = "old"\n[objective]\nname = "t3d"\ntemperature = 0.07\ncrop_shape = [32, 32, 32]\n'
                   'decoder_dim = 32\nmim_weight = 0.0\n[tune.variants.a]\n"objective.num_crops" = 3\n')
    cfg = checkpoint.read_config(tmp_path)
    assert cfg.objective.t3d.crop_shape == (32, 32, 32)
    assert cfg.objective.t3d.decoder_dim == cfg.objective.mg3d.decoder_dim == 32
    assert cfg.objective.mg3d.mim_weight == 0.0
    assert cfg.tune.variants == {"a": {"objective.t3d.num_crops": 3}}
    new = tmp_path / "new" / "config.toml"
    new.parent.mkdir()
    new.write_text(to_toml(cfg))
    assert load_stored_config(new) == cfg == load_config(new)
    with pytest.raises(ConfigError, match="moved to"):  # a file a person passes gets the error
        load_config(old)


def test_sweep_keys_with_the_old_flat_name_error():
    from vlp3d.search_space import parse_space

    with pytest.raises(ConfigError, match=r"objective\.mim_weight moved to objective\.mg3d\.mim_weight"):
        parse_space({"objective.mim_weight": [0.0, 1.0]}, {})
    with pytest.raises(ConfigError, match=r"objective\.top_k_slices moved to objective\.unimedi\.top_k_slices"):
        parse_space({"train.seed": [0]}, {"k2": {"objective.top_k_slices": 2}})
    space = parse_space({"objective.mg3d.mim_weight": [0.0, 1.0]}, {"k2": {"objective.unimedi.top_k_slices": 2}})
    assert space.keys == ["objective.mg3d.mim_weight", "objective.unimedi.top_k_slices"]
