"""A method registers itself, from its own module, with its config table and its defaults: a toy
method defined here gets `objective.name = "toy"`, `[objective.toy]`, overrides, did-you-mean
errors, `describe()`, `to_toml`, `config show` and `objective_class("toy")` without an edit under
vlp3d/. The `toy` fixture removes it again, so no other test sees it."""

from __future__ import annotations

import pickle
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import pytest
import torch
from torch import nn

from vlp3d.config import (
    METHOD_DEFAULTS,
    OBJECTIVES,
    ConfigError,
    ExperimentConfig,
    ObjectiveConfig,
    describe,
    flatten,
    get_key,
    key_annotation,
    load_config,
    logged_params,
    register_method,
    registered_methods,
    replace,
    setting,
    to_toml,
    unregister_method,
)
from vlp3d.errors import InputError
from vlp3d.objectives import REGISTRY, objective_class
from vlp3d.objectives.base import Objective

BUILT_IN = ("clip", "mg3d", "t3d", "unimedi")
TOY_DEFAULTS = {"train.lr": 0.0123, "objective.temperature": 0.5, "model.size": "small"}


@dataclass(frozen=True)
class ToyConfig:
    """The toy method's own settings, read when `objective.name = "toy"`."""

    pull_weight: float = setting(1.0, "Toy `pull`: squared distance between volume and report embeddings.")
    scale: float = setting(2.0, "Toy: factor on the distance.")


@pytest.fixture
def toy():
    """The toy method, registered for one test."""

    @register_method(section=ToyConfig, defaults=TOY_DEFAULTS)
    class ToyObjective(Objective):
        """One term, `pull`, weighted by `objective.toy.pull_weight`."""

        name = "toy"
        terms = ("pull",)
        projection_terms = frozenset(terms)

        def __init__(self, cfg: ExperimentConfig, model: nn.Module | None = None, text_dim: int | None = None):
            super().__init__()
            self.scale = cfg.objective.toy.scale

        def forward(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            image, text, _scale = model(batch["volume"], batch["report_embedding"])
            return {"pull": self.scale * (image - text).pow(2).sum(-1).mean()}

    yield ToyObjective
    unregister_method("toy")
    assert tuple(OBJECTIVES) == BUILT_IN and "toy" not in REGISTRY
    assert "toy" not in ObjectiveConfig.__dataclass_fields__ and not hasattr(ExperimentConfig().objective, "toy")
    assert not any(key.startswith("objective.toy.") for key, _default, _help in describe())
    with pytest.raises(InputError):
        objective_class("toy")
    with pytest.raises(ConfigError, match="is not one of 'clip', 'mg3d', 't3d', 'unimedi'"):
        load_config(None, ["objective.name=toy"])


def test_a_toy_method_gets_its_table_from_toml_and_overrides(toy, tmp_path):
    path = tmp_path / "toy.toml"
    path.write_text('[objective]\nname = "toy"\n\n[objective.toy]\nscale = 3\n')
    cfg = load_config(path, ["objective.toy.pull_weight=0.5"])
    assert (cfg.objective.name, cfg.objective.toy.scale, cfg.objective.toy.pull_weight) == ("toy", 3.0, 0.5)
    assert isinstance(cfg.objective.toy.scale, float)
    assert get_key(cfg, "objective.toy.scale") == 3.0 and key_annotation("objective.toy.scale") is float
    assert load_config(path, ["objective.toy.scale=4"]).objective.toy.scale == 4.0  # the override wins
    # the other methods' tables stay as they were
    assert cfg.objective.mg3d == ExperimentConfig().objective.mg3d
    changed = replace(cfg, objective={"toy": {"scale": 5.0}})
    assert (changed.objective.toy.scale, changed.objective.toy.pull_weight) == (5.0, 0.5)


def test_unknown_keys_in_a_toy_table_suggest_the_closest(toy, tmp_path):
    with pytest.raises(ConfigError, match=r"unknown key 'objective\.toy\.scal'\. Did you mean 'objective\.toy\.scale'"):
        load_config(None, ["objective.toy.scal=1"])
    path = tmp_path / "typo.toml"
    path.write_text('[objective]\nname = "toy"\n\n[objective.toy]\npull_wieght = 1.0\n')
    with pytest.raises(ConfigError, match=r"typo\.toml: unknown key 'objective\.toy\.pull_wieght'\. "
                                          r"Did you mean 'objective\.toy\.pull_weight'"):
        load_config(path)
    with pytest.raises(ConfigError, match=r"objective\.toy\.scale: expected float"):
        load_config(None, ["objective.toy.scale=big"])
    with pytest.raises(ConfigError, match=r"objective\.name: 'tyo' is not one of 'clip', 'mg3d', 't3d', 'unimedi', "
                                          r"'toy' \(the registered methods\)\. Did you mean 'toy'"):
        load_config(None, ["objective.name=tyo"])


def test_describe_to_toml_and_params_include_the_toy_table(toy, tmp_path):
    from vlp3d.jobs import config_docs

    rows = {key: (default, text) for key, default, text in describe()}
    assert rows["objective.toy.pull_weight"] == ("1.0", ToyConfig.__dataclass_fields__["pull_weight"].metadata["help"])
    assert rows["objective.toy.scale"][0] == "2.0" and "objective.toy" not in rows
    assert "Pretraining method: clip, mg3d, t3d, unimedi or toy." == rows["objective.name"][1]
    cfg = load_config(None, ["objective.name=toy", "objective.toy.scale=7"])
    text = to_toml(cfg)
    assert "\n[objective.toy]\npull_weight = 1.0\nscale = 7.0\n" in text
    path = tmp_path / "round.toml"
    path.write_text(text)
    assert load_config(path) == cfg
    assert pickle.loads(pickle.dumps(cfg)) == cfg
    assert flatten(cfg)["objective.toy.scale"] == "7.0" and logged_params(cfg)["objective.toy.pull_weight"] == "1.0"
    page = config_docs.render()
    assert "### `[objective.toy]`" in page and "| `objective.toy.scale` | `2.0` |" in page
    assert "`[objective.unimedi]` and `[objective.toy]`" in page and "| `toy` | `train.lr = 0.0123`" in page


def test_choosing_the_toy_method_applies_its_defaults_and_config_show_marks_them(toy, tmp_path, capsys):
    from vlp3d.cli import main

    assert METHOD_DEFAULTS["toy"] == TOY_DEFAULTS and tuple(OBJECTIVES) == (*BUILT_IN, "toy")
    cfg = load_config(None, ["objective.name=toy", "model.size=tiny"])
    assert (cfg.train.lr, cfg.objective.temperature, cfg.model.size) == (0.0123, 0.5, "tiny")  # the user's key wins
    assert replace(ExperimentConfig(), objective={"name": "toy"}) == load_config(None, ["objective.name=toy"])
    assert replace(cfg, objective={"name": "clip"}).train.lr == ExperimentConfig().train.lr  # switching back
    assert main(["config", "show", "objective.name=toy", "model.size=tiny"]) == 0
    out = capsys.readouterr().out
    assert "lr = 0.0123  # toy default" in out and "temperature = 0.5  # toy default" in out
    assert 'size = "tiny"  # override\n' in out and "\n[objective.toy]\n" in out
    path = tmp_path / "shown.toml"
    path.write_text(out)
    assert load_config(path) == cfg


def test_the_toy_objective_class_and_its_term_weights(toy):
    assert objective_class("toy") is toy and REGISTRY["toy"] is toy and registered_methods()["toy"].section is ToyConfig
    assert toy.weight_key("pull") == "objective.toy.pull_weight"
    cfg = load_config(None, ["objective.name=toy", "objective.toy.pull_weight=0.25"])
    assert toy.term_weights(cfg) == {"pull": 0.25}
    assert toy(cfg).scale == 2.0
    with pytest.raises(ValueError, match=r"every loss term of objective 'toy' has weight 0 \(objective\.toy\.pull_weight\)"):
        toy.term_weights(replace(cfg, objective={"toy": {"pull_weight": 0.0}}))


def test_a_config_built_before_the_registration_reads_the_new_table_as_its_defaults():
    before = load_config(None, ["train.lr=0.5"])
    with_toy = register_method(section=ToyConfig)(type("Toy", (Objective,), {"name": "toy", "terms": ("pull",)}))
    try:
        assert before.objective.toy == ToyConfig() and "\n[objective.toy]\n" in to_toml(before)
        assert load_config(None, ["train.lr=0.5"]) == before
        assert objective_class("toy") is with_toy
    finally:
        unregister_method("toy")
    assert "[objective.toy]" not in to_toml(before)


def _objective(name: str) -> type:
    return type("Candidate", (Objective,), {"name": name, "terms": ("pull",), "__module__": __name__})


@pytest.mark.parametrize(("name", "section", "defaults", "error", "match"), [
    ("bad", None, {"train.lrr": 1e-3}, ConfigError, r"method 'bad': defaults: unknown key 'train\.lrr'\. Did you mean 'train\.lr'"),
    ("bad", None, {"train.lr": "fast"}, ConfigError, r"method 'bad': defaults: train\.lr: expected float"),
    ("bad", None, {"objective.name": "clip"}, ConfigError, "cannot choose the method"),
    ("mg3d", None, {}, ValueError, r"method 'mg3d' is already registered by vlp3d\.objectives\.mg3d\.MG3DObjective"),
    ("temperature", None, {}, ValueError, r"'temperature' is a key of \[objective\]"),
    ("bad name", None, {}, TypeError, "must be the method's name"),
    ("bad", dataclass(type("Loose", (), {"__annotations__": {"x": "int"}, "x": setting(1, "x")})), {}, TypeError,
     "frozen dataclass"),
    ("bad", dataclass(frozen=True)(type("Helpless", (), {"__annotations__": {"x": "int"}, "x": 1})), {}, TypeError,
     "has no help text"),
    ("bad", dataclass(frozen=True)(type("Shadow", (), {"__annotations__": {"temperature": "float"},
                                                       "temperature": setting(0.1, "t")})), {}, ValueError,
     "shadows objective.temperature"),
])
def test_a_registration_is_checked_and_leaves_nothing_when_it_fails(name, section, defaults, error, match):
    with pytest.raises(error, match=match):
        register_method(section=section, defaults=defaults)(_objective(name))
    assert tuple(OBJECTIVES) == BUILT_IN and objective_class("mg3d").__module__ == "vlp3d.objectives.mg3d"
    assert set(ObjectiveConfig.__dataclass_fields__) >= {"mg3d", "t3d", "unimedi"}
    assert "bad" not in ObjectiveConfig.__dataclass_fields__


def test_the_built_in_methods_register_in_module_order_with_their_tables():
    methods = registered_methods()
    assert tuple(methods) == BUILT_IN
    assert {name: m.section.__name__ for name, m in methods.items() if m.section} == \
        {"mg3d": "MG3DConfig", "t3d": "T3DConfig", "unimedi": "UniMedIConfig"}
    assert all(m.section is None or m.section.__module__ == m.objective.__module__ for m in methods.values())
    assert methods["clip"].defaults == {} and methods["t3d"].defaults["data.storage"] == "highres"


def test_importing_the_config_imports_neither_torch_nor_the_methods_until_it_needs_them():
    code = ("import sys; import vlp3d.config as c\n"
            "loaded = lambda: [m for m in ('torch', 'vlp3d.objectives', 'vlp3d.storage') if m in sys.modules]\n"
            "print(loaded()); c.describe(); print(loaded())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "[]"  # nor storage: the config is the bottom layer
    assert out[1] == "['torch', 'vlp3d.objectives']"
