"""Building a config: TOML files, `section.key=value` overrides, nested dicts (`from_dict`), the
chosen method's defaults, `replace`, and the migration of configs vlp3d stored before the
methods' `[objective.<method>]` tables."""

from __future__ import annotations

import dataclasses
import json
import os
import tomllib
import typing
from pathlib import Path
from typing import Any

from vlp3d.config.checks import check_ranges, check_value_range
from vlp3d.config.experiment import SECTIONS, ExperimentConfig, to_dict
from vlp3d.config.fields import ConfigError, did_you_mean
from vlp3d.config.methods import (
    check_method_name,
    method_defaults,
    method_sections,
    moved_objective_keys,
)
from vlp3d.config.objective import ObjectiveConfig
from vlp3d.config.schema import (
    assign_raw,
    coerce_value,
    find_raw,
    key_annotation,
    leaf_fields,
    sub_tables,
    unknown_key_message,
)


def read_toml(path: str | Path, missing: str, where: str = "") -> dict[str, Any]:
    """The parsed TOML file `path`; ConfigError `missing` when it is not a file, or naming the file
    (after `where`, e.g. "eval.prompts = ") and the parse error."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(missing)
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"{where}{path}: invalid TOML: {err}") from err


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> ExperimentConfig:
    """Defaults < the chosen method's defaults < TOML file < `section.key=value` overrides."""
    return load_config_with_sources(path, overrides)[0]


WORKDIR_ENV = "VLP3D_WORKDIR"  # tracking.workdir when neither the config file nor an override sets it
# where a key's value came from (`load_config_with_sources`, `vlp3d config show`, `--dry-run`)
FROM_FILE, FROM_OVERRIDE, FROM_ENV = "config file", "override", f"${WORKDIR_ENV}"


def load_config_with_sources(path: str | Path | None = None, overrides: typing.Sequence[str] = ()
                             ) -> tuple[ExperimentConfig, dict[str, str]]:
    """`load_config`, and where each key that is not at its plain default came from: {dotted key:
    'config file' | 'override' | '<method> default' | '$VLP3D_WORKDIR'}.

    An override is checked on its own first (its key, type and range), so its error names the
    command-line override, not the file; `$VLP3D_WORKDIR` gives tracking.workdir when neither sets it."""
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        raw = read_toml(path, f"config file '{path}' not found (see configs/ for examples).")
        raw.setdefault("name", path.stem)
    file_raw = json.loads(json.dumps(raw))
    given: dict[str, Any] = {}
    for text in overrides:
        keys, value = parse_override(text)
        if len(keys) == 1 and keys[0] == "name":
            raw["name"] = given["name"] = value
            continue
        _check_override(text, keys, value)
        table = raw
        for depth, name in enumerate(keys[:-1]):
            table = table.setdefault(name, {})
            if not isinstance(table, dict):
                raise ConfigError(f"command-line override '{text}': '{'.'.join(keys[:depth + 1])}' is not a table.")
        table[keys[-1]] = value
        assign_raw(given, ".".join(keys), value)
    env_workdir = os.environ.get(WORKDIR_ENV, "")
    if env_workdir and not find_raw(raw, "tracking.workdir")[0]:
        assign_raw(raw, "tracking.workdir", env_workdir)
    try:
        cfg = from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"{_blame(path, file_raw, given)}{err}") from None
    methods = method_defaults_applied(raw)
    sources = {}
    for section, cls in SECTIONS.items():
        for key, _ in leaf_fields(cls, f"{section}."):
            if find_raw(given, key)[0]:
                sources[key] = FROM_OVERRIDE
            elif find_raw(file_raw, key)[0]:
                sources[key] = FROM_FILE
            elif key in methods:
                sources[key] = f"{methods[key]} default"
            elif key == "tracking.workdir" and env_workdir:
                sources[key] = FROM_ENV
    return cfg, sources


def _check_override(text: str, keys: list[str], value: Any) -> None:
    """A ConfigError naming the command-line override unless its key exists and its value has the
    key's type and range (keys inside a table-valued key, tune.space.*, are checked with the config)."""
    key = ".".join(keys)
    where = f"command-line override '{text}'"
    if len(keys) < 2:
        raise ConfigError(f"{where}: use section.key=value, e.g. train.lr=1e-3 "
                          "(objective.mg3d.mim_weight=0 for a method's table).")
    if keys[0] not in SECTIONS:
        raise ConfigError(f"{where}: unknown section '{keys[0]}'.{did_you_mean(keys[0], SECTIONS)}")
    cls = SECTIONS[keys[0]]
    for depth, name in enumerate(keys[1:], start=2):
        hint = typing.get_type_hints(cls).get(name)
        if dataclasses.is_dataclass(hint):
            if depth == len(keys):
                return  # a whole table (objective.mg3d={...}): checked with the config
            cls = hint
        elif typing.get_origin(hint) is dict and depth < len(keys):
            return  # a key inside a table-valued key (tune.space.*): checked with the config
        else:
            break
    try:
        if key == "objective.name":
            check_method_name(value, key)
            return
        annotation = key_annotation(key)
        check_value_range(key, coerce_value(value, annotation, key))
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None


def _blame(path: Path | None, file_raw: dict[str, Any], given: dict[str, Any]) -> str:
    """The prefix of an error of the whole config: the file when it fails alone, else the overrides."""
    if path is None:
        return "command-line overrides: " if given else ""
    if not given:
        return f"{path}: "
    try:
        from_dict(file_raw)
    except ConfigError:
        return f"{path}: "
    return f"{path} with the command-line overrides: "


def replace(cfg: ExperimentConfig, **sections: dict[str, Any]) -> ExperimentConfig:
    """A copy with some keys of some sections changed, validated like an override. A method's keys
    go in a nested dict: `replace(cfg, objective={"mg3d": {"mim_weight": 0.0}})` (its other keys stay).

    Changing `objective.name` switches method defaults like a file would: every key of the old or
    the new method's defaults that still holds the value the old method gave it (so the user did
    not choose it) and that this call does not set takes the new method's default, or the plain
    default when the new method has none."""
    raw = to_dict(cfg)
    for section, values in sections.items():
        raw[section] = _merge(SECTIONS[section], raw[section], values)
    old, new = cfg.objective.name, raw["objective"]["name"]
    defaults = method_defaults()
    if new != old and new in defaults:
        given = {f"{section}.{key}" for section, values in sections.items() for key in _dotted(values)}
        plain = to_dict(ExperimentConfig())
        for key in set(defaults.get(old, {})) | set(defaults[new]):
            if key in given:
                continue
            before = find_raw(plain, key)[1]
            before = defaults.get(old, {}).get(key, before)
            if json.dumps(find_raw(raw, key)[1]) == json.dumps(list(before) if isinstance(before, tuple) else before):
                after = defaults[new].get(key, find_raw(plain, key)[1])
                assign_raw(raw, key, list(after) if isinstance(after, tuple) else after)
    return from_dict(raw)


def _dotted(values: dict[str, Any], prefix: str = "") -> list[str]:
    out = []
    for key, value in values.items():
        if isinstance(value, dict) and key in method_sections() and not prefix:
            out += _dotted(value, f"{key}.")
        else:
            out.append(f"{prefix}{key}")
    return out


def migrate_stored(raw: dict[str, Any]) -> dict[str, Any]:
    """A stored config (`raw`, parsed TOML) written before the methods' settings moved into
    `[objective.<method>]` tables, with its flat method keys moved there (decoder_dim into both
    MG-3D's and T3D's), and flat `objective.<key>` keys of tune.space / tune.variants renamed (to
    the configured method's table where two hold the key). Other configs are returned unchanged."""
    objective = raw.get("objective")
    if not isinstance(objective, dict):
        return raw
    method = objective.get("name")
    moved = moved_objective_keys()

    def new_key(key: Any) -> Any:
        section, _, name = str(key).partition(".")
        if section != "objective" or name not in moved:
            return key
        homes = moved[name]
        return f"objective.{method if method in homes else homes[0]}.{name}"

    objective = {k: dict(v) if isinstance(v, dict) else v for k, v in objective.items()}
    for name in [k for k in objective if k in moved]:
        value = objective.pop(name)
        for home in moved[name]:
            table = objective.setdefault(home, {})
            if isinstance(table, dict):
                table.setdefault(name, value)
    out = {**raw, "objective": objective}
    tune = raw.get("tune")
    if isinstance(tune, dict):
        tune = dict(tune)
        if isinstance(tune.get("space"), dict):
            tune["space"] = {new_key(k): v for k, v in tune["space"].items()}
        if isinstance(tune.get("variants"), dict):
            tune["variants"] = {n: {new_key(k): v for k, v in keys.items()} if isinstance(keys, dict) else keys
                                for n, keys in tune["variants"].items()}
        out["tune"] = tune
    return out


def load_stored_config(path: str | Path) -> ExperimentConfig:
    """A config vlp3d stored itself (`to_toml`: a checkpoint's or model's config.toml, a sweep's
    sweep.toml). Flat method keys of configs stored before the `[objective.<method>]` tables are
    moved there silently (`migrate_stored`); files people write get `load_config`'s error instead."""
    path = Path(path)
    raw = read_toml(path, f"stored config '{path}' not found.")
    raw.setdefault("name", path.stem)
    try:
        return from_dict(migrate_stored(raw))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def _build(cls: type, values: dict[str, Any], where: str) -> Any:
    tables = sub_tables(cls)
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(unknown_key_message(cls, key, where))
        if cls is ObjectiveConfig and key == "name":  # a registered method, or the closest one
            kwargs[key] = check_method_name(value, f"{where}{key}")
        elif key in tables:
            if not isinstance(value, dict):
                raise ConfigError(f"{where}{key}: expected a table ([{where}{key}] in a config file, or "
                                  f"{where}{key}.KEY=VALUE overrides), got {value!r}.")
            kwargs[key] = _build(tables[key], value, f"{where}{key}.")
        else:
            kwargs[key] = coerce_value(value, hints[key], f"{where}{key}")
    return cls(**kwargs)


def _merge(cls: type, base: dict[str, Any], updates: dict[str, Any]) -> dict[str, Any]:
    """`base` with `updates` applied: sub-tables of `cls` merged key by key, other values replaced
    (a table-valued key such as tune.space is replaced whole)."""
    tables = sub_tables(cls)
    out = dict(base)
    for key, value in updates.items():
        if key in tables and isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(tables[key], out[key], value)
        else:
            out[key] = value
    return out


def chosen_method(raw: dict[str, Any]) -> str | None:
    """The method a raw (parsed TOML + overrides) config names, if it is one with defaults."""
    present, name = find_raw(raw, "objective.name")
    return name if present and isinstance(name, str) and name in method_defaults() else None


def method_defaults_applied(raw: dict[str, Any]) -> dict[str, str]:
    """{dotted key: method} of the keys `from_dict(raw)` takes from the chosen method's defaults
    (those `raw` does not set), for `vlp3d config show`."""
    method = chosen_method(raw)
    if method is None:
        return {}
    return {key: method for key in method_defaults()[method] if not find_raw(raw, key)[0]}


def with_method_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """`raw` plus the chosen method's defaults for every key it does not set."""
    applied = method_defaults_applied(raw)
    if not applied:
        return raw
    out = json.loads(json.dumps(raw))
    defaults = method_defaults()
    for key, method in applied.items():
        value = defaults[method][key]
        assign_raw(out, key, list(value) if isinstance(value, tuple) else value)
    return out


def from_dict(raw: dict[str, Any]) -> ExperimentConfig:
    """Build and validate a config from nested dicts; the chosen method's defaults fill the keys
    `raw` does not set (the `defaults` it registered with, vlp3d.config.methods)."""
    raw = with_method_defaults(raw)
    top = [f.name for f in dataclasses.fields(ExperimentConfig)]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in top:
            raise ConfigError(f"unknown section '{key}'.{did_you_mean(key, top)}")
        if key == "name":
            kwargs["name"] = coerce_value(value, str, "name")
        else:
            if not isinstance(value, dict):
                raise ConfigError(f"'{key}' must be a table ([{key}]), got {value!r}.")
            kwargs[key] = _build(SECTIONS[key], value, f"{key}.")
    cfg = ExperimentConfig(**kwargs)
    check_ranges(cfg)
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`train.lr=1e-3` -> (['train', 'lr'], 0.001). Values use TOML syntax; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like section.key=value (e.g. train.lr=1e-3).")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw
    return key.strip().split("."), value
