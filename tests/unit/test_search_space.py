"""Sweep search spaces: parsing, the errors a user gets before any trial starts, trial configs."""

import pytest

from vlp3d.config import ConfigError, ExperimentConfig, load_config, replace
from vlp3d.search_space import VARIANT, apply_params, parse_space, trial_label


def _space(space=None, variants=None):
    return parse_space(space or {}, variants or {})


def test_lists_are_grids_and_tables_are_distributions():
    space = _space({"data.fraction": [0.25, 0.5, 1.0], "model.size": ["tiny", "small"],
                    "train.lr": {"loguniform": [1e-4, 1e-2]}, "train.seed": {"randint": [0, 3]},
                    "objective.mg3d.mim_weight": {"choice": [0, 1]}})
    kinds = {d.key: (d.kind, d.values) for d in space.dimensions}
    assert kinds["data.fraction"] == ("grid", (0.25, 0.5, 1.0))
    assert kinds["train.lr"] == ("loguniform", (1e-4, 1e-2))
    assert kinds["objective.mg3d.mim_weight"] == ("choice", (0.0, 1.0))  # ints become floats, as in the config
    assert space.grid_size() == 6
    combos = list(space.representative_params())
    assert len(combos) == 3 * 2 * 2 * 2 * 2  # grid values x sampled bounds (randint: 0 and 2)
    assert {c["train.seed"] for c in combos} == {0, 2}


@pytest.mark.parametrize(("space", "message"), [
    ({"data.fracton": [0.5]}, "unknown key 'data.fracton'. Did you mean 'data.fraction'?"),
    ({"modle.size": ["tiny"]}, "unknown section 'modle'. Did you mean 'model'?"),
    ({"lr": [1e-3]}, "'lr' is not a config key; use section.key"),
    ({"objective.mim_weight": [0.0, 1.0]},
     "'objective.mim_weight': objective.mim_weight moved to objective.mg3d.mim_weight (a [objective.mg3d] table"),
    ({"objective.mg3d.mim_wieght": [0.0]}, "Did you mean 'objective.mg3d.mim_weight'?"),
    ({"objective.mg3d": [0.0]}, "'objective.mg3d' is a table; name one of its keys"),
    ({"tracking.workdir": ["a", "b"]}, "[tracking] settings are the sweep's own"),
    ({"data.fraction": [0.5, 1.5]}, "data.fraction = 1.5 is out of range: must be in (0, 1]"),
    ({"data.fraction": [0.0, 0.5]}, "data.fraction = 0.0 is out of range: must be in (0, 1]"),
    ({"data.fraction": {"uniform": [0.1, 2.0]}}, "data.fraction = 2.0 is out of range: must be in (0, 1]"),
    ({"model.size": ["tiny", "huge"]}, "'huge' is not one of 'tiny', 'small', 'base', 'large'"),
    ({"train.max_steps": {"uniform": [10, 20]}}, "uniform samples floats but the key holds int"),
    ({"objective.align_weight": {"loguniform": [0, 1]}}, "loguniform needs 0 < lo < hi"),
    ({"train.lr": {"loguniform": [0, 1e-2]}}, "train.lr = 0.0 is out of range: must be > 0"),
    ({"train.lr": {"normal": [0, 1]}}, "give a list of values"),
    ({"train.lr": []}, "grid needs a non-empty list"),
])
def test_bad_space_names_the_key_and_the_valid_values(space, message):
    with pytest.raises(ConfigError) as err:
        _space(space)
    assert message in str(err.value)


def test_empty_space_says_how_to_fill_it():
    with pytest.raises(ConfigError, match="tune.space and tune.variants are empty: nothing to sweep"):
        _space()


def test_variants_are_one_more_grid_axis_and_may_not_clash_with_the_space():
    variants = {"full": {}, "no_mim": {"objective.mg3d.mim_weight": 0.0, "objective.mg3d.mlm_weight": 0}}
    space = _space({"train.seed": [0, 1]}, variants)
    assert space.grid_size() == 4
    assert space.keys == ["train.seed", "objective.mg3d.mim_weight", "objective.mg3d.mlm_weight"]
    cfg = replace(ExperimentConfig(), objective={"name": "mg3d", "mg3d": {"fusion_dim": 64}})
    trial = apply_params(cfg, {"train.seed": 1, VARIANT: "no_mim"}, space)
    assert (trial.train.seed, trial.objective.mg3d.mim_weight, trial.objective.mg3d.mlm_weight) == (1, 0.0, 0.0)
    assert trial.objective.mg3d.fusion_dim == 64  # the table's other keys stay
    assert apply_params(cfg, {"train.seed": 0, VARIANT: "full"}, space).objective.mg3d.mim_weight == 1.0
    with pytest.raises(ConfigError, match=r"objective\.mlm_weight moved to objective\.mg3d\.mlm_weight"):
        _space({}, {"old": {"objective.mlm_weight": 0.0}})
    with pytest.raises(ConfigError, match="sets 'train.seed', which tune.space also varies"):
        _space({"train.seed": [0, 1]}, {"a": {"train.seed": 3}})
    with pytest.raises(ConfigError, match="tune.variants.a must be a table"):
        _space({}, {"a": 3})
    assert trial_label({"data.fraction": 0.125, VARIANT: "full"}) == "data.fraction=0.125 variant=full"


def test_tune_tables_round_trip_through_toml(tmp_path):
    from vlp3d.config import flatten, to_toml

    cfg = replace(ExperimentConfig(), tune={"space": {"data.fraction": [0.5, 1.0], "train.lr": {"loguniform": [1e-4, 1e-2]}},
                                            "variants": {"clip": {"objective.name": "clip"}, "base": {}}})
    path = tmp_path / "sweep.toml"
    path.write_text(to_toml(cfg))
    assert load_config(path) == cfg
    assert flatten(cfg)["tune.space"] == '{"data.fraction": [0.5, 1.0], "train.lr": {"loguniform": [0.0001, 0.01]}}'
    with pytest.raises(ConfigError, match="tune.space: expected a table"):
        load_config(None, ["tune.space=[1, 2]"])


def test_shipped_sweep_configs_parse():
    from pathlib import Path

    root = Path(__file__).resolve().parents[2] / "configs" / "sweeps"
    sizes = {}
    for path in sorted(root.glob("*.toml")):
        cfg = load_config(path)
        sizes[path.stem] = parse_space(cfg.tune.space, cfg.tune.variants).grid_size() * cfg.tune.num_samples
    assert sizes == {"demo": 16, "label_efficiency": 6, "mg3d_terms_demo": 10, "scaling": 16}


def test_early_stopping_is_refused_on_axes_a_fit_pools_over():
    from vlp3d.search_space import check_selection

    scaling = load_config(None, ['tune.scheduler="asha"', 'tune.space={"model.size" = ["tiny", "small"], '
                                 '"train.max_steps" = [100, 200], "train.lr" = [0.001, 0.01]}'])
    with pytest.raises(ConfigError) as err:
        check_selection(scaling, parse_space(scaling.tune.space, scaling.tune.variants))
    assert "tune.scheduler = 'asha' with tune.space varying model.size, train.max_steps: early stopping" in str(err.value)
    median = load_config(None, ['tune.scheduler="median"', 'tune.space={"data.fraction" = [0.5, 1.0]}'])
    with pytest.raises(ConfigError, match="tune.scheduler = 'median' with tune.space varying data.fraction"):
        check_selection(median, parse_space(median.tune.space, median.tune.variants))
    # a hyperparameter or loss-weight search may stop trials early; so may variants that set an axis key
    # (variants are never pooled into one fit), and a one-value axis is a constant
    for space, variants in (({"train.lr": [0.001, 0.01], "objective.align_weight": [0.5, 1.0]}, {}),
                            ({"model.size": ["tiny"]}, {"a": {"data.fraction": 0.5}, "b": {"data.fraction": 1.0}})):
        cfg = replace(load_config(None, ['tune.scheduler="asha"']), tune={"space": space, "variants": variants})
        check_selection(cfg, parse_space(cfg.tune.space, cfg.tune.variants))


def test_selecting_on_the_report_split_is_refused():
    from vlp3d.search_space import check_selection

    space = parse_space({"train.lr": [0.001]}, {})
    check_selection(load_config(None), space)  # valid selects, test (carved from valid if need be) reports
    for overrides, keys in ((['tune.report_split="valid"'], "data.eval_split = 'valid' and tune.report_split = 'valid'"),
                            (['tune.report_split="valid[0.5:1]"'], "tune.report_split = 'valid[0.5:1]'"),
                            (['data.eval_split="test"', 'tune.report_split="test"'], "data.eval_split = 'test'"),
                            (['tune.report_split="train"'], "tune.report_split = 'train' is data.train_split")):
        with pytest.raises(ConfigError) as err:
            check_selection(load_config(None, overrides), space)
        assert keys in str(err.value)
    check_selection(load_config(None, ['data.eval_split="valid[0:0.5]"', 'tune.report_split="valid[0.5:1]"']), space)
