"""Every numeric config key declares its range where it is declared (`setting(..., ge=, gt=, le=,
lt=)`), and a value outside it is one error line naming the key, the range and where it was given."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest

from vlp3d.config import SECTIONS, ConfigError, key_ranges, leaf_fields, load_config
from vlp3d.config.schema import key_annotation


def _numeric_keys() -> dict[str, tuple[type, typing.Any]]:
    """{dotted key: (number type, default)} of every int/float key and every tuple-of-numbers key."""
    keys = {}
    for section, cls in SECTIONS.items():
        for key, f in leaf_fields(cls, f"{section}."):
            annotation = key_annotation(key)
            args = typing.get_args(annotation) if typing.get_origin(annotation) is tuple else (annotation,)
            numbers = {a for a in args if a is not Ellipsis}
            if numbers and numbers <= {int, float}:
                default = f.default_factory() if f.default is dataclasses.MISSING else f.default
                keys[key] = (numbers.pop(), default)
    return keys


NUMERIC = _numeric_keys()
DEMO = Path(__file__).resolve().parents[2] / "configs" / "demo.toml"


def _toml(value) -> str:
    if isinstance(value, tuple):
        return "[" + ", ".join(map(_toml, value)) + "]"
    return repr(value)


def _bad_values(key: str) -> list:
    """Values of `key`'s type just outside its range, at each declared end."""
    number, default = NUMERIC[key]
    bounds = key_ranges()[key]
    ends = [bounds.outside()]
    if bounds.le is not None and (bounds.ge is not None or bounds.gt is not None):
        ends.append(bounds.le + 1)
    elif bounds.lt is not None and (bounds.ge is not None or bounds.gt is not None):
        ends.append(bounds.lt)
    values = [number(v) if number is int else float(v) for v in ends]
    if isinstance(default, tuple):  # one bad number in an otherwise valid tuple
        template = default or (1, 1, 1)
        return [(v, *template[1:]) for v in values]
    return values


def test_every_numeric_key_declares_its_range():
    assert set(NUMERIC) == set(key_ranges()), sorted(set(NUMERIC) ^ set(key_ranges()))
    assert len(NUMERIC) >= 85  # the sections' keys and the built-in methods' tables


@pytest.mark.parametrize("key", sorted(NUMERIC))
def test_out_of_range_values_are_one_line_errors_naming_the_key_and_range(key, tmp_path):
    bounds = str(key_ranges()[key])
    for value in _bad_values(key):
        override = f"{key}={_toml(value)}"
        with pytest.raises(ConfigError) as err:
            load_config(DEMO, [override])
        message = str(err.value)
        assert "\n" not in message
        assert message.startswith(f"command-line override '{override}': {key} = ")
        assert f"must be {bounds}" in message or f"must be a finite number {bounds}" in message

        # in a file: the file is named
        section, *names = key.split(".")
        path = tmp_path / "bad.toml"
        path.write_text(f"[{section}{''.join('.' + n for n in names[:-1])}]\n{names[-1]} = {_toml(value)}\n")
        with pytest.raises(ConfigError, match=rf"^{path}: {key} = .* is out of range: (each value )?must be"):
            load_config(path)


@pytest.mark.parametrize("key", [k for k, (number, _) in sorted(NUMERIC.items()) if number is float])
def test_non_finite_floats_are_refused(key):
    number, default = NUMERIC[key]
    value = _toml((float("nan"), *default[1:])) if isinstance(default, tuple) and default else \
        "[nan]" if isinstance(default, tuple) else "inf"
    with pytest.raises(ConfigError, match="must be a finite number"):
        load_config(None, [f"{key}={value}"])


def test_the_issues_examples():
    with pytest.raises(ConfigError, match=r"cluster.num_workers = 0 is out of range: must be >= 1\.$"):
        load_config(DEMO, ["cluster.num_workers=0"])
    with pytest.raises(ConfigError, match=r"train.max_steps = -3 is out of range: must be >= 1\.$"):
        load_config(DEMO, ["train.max_steps=-3"])
    with pytest.raises(ConfigError, match=r"data.hu_window = \[5, 1\]: the low end must be below the high end"):
        load_config(None, ["data.hu_window=[5, 1]"])


def test_an_override_typo_blames_the_override_not_the_file(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, ["model.attenton=fused"])
    assert str(err.value) == ("command-line override 'model.attenton=fused': unknown key 'model.attenton'. "
                              "Did you mean 'model.attention'?")
    bad = tmp_path / "typo.toml"
    bad.write_text("[model]\nattenton = 'fused'\n")
    with pytest.raises(ConfigError, match=rf"^{bad}: unknown key 'model.attenton'"):
        load_config(bad, ["train.lr=1e-3"])
    # a rule across keys broken by the overrides alone
    with pytest.raises(ConfigError, match=rf"^{DEMO} with the command-line overrides: train.balance_terms"):
        load_config(DEMO, ["train.balance_terms=true", "train.grad_share_every=0"])


def test_sources_say_where_each_value_came_from(tmp_path, monkeypatch):
    from vlp3d.config import load_config_with_sources

    monkeypatch.setenv("VLP3D_WORKDIR", str(tmp_path / "store"))
    cfg, sources = load_config_with_sources("configs/mg3d_demo.toml", ["train.lr=1e-3"])
    assert sources["train.lr"] == "override" and sources["model.image_encoder"] == "config file"
    assert sources["objective.align_weight"] == "mg3d default"
    assert sources["tracking.workdir"] == "$VLP3D_WORKDIR" and cfg.tracking.workdir == str(tmp_path / "store")
    assert "train.seed" not in sources  # a plain default
    cfg, sources = load_config_with_sources(None, ["tracking.workdir=elsewhere"])
    assert cfg.tracking.workdir == "elsewhere" and sources["tracking.workdir"] == "override"
