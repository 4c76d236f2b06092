"""The config's schema as data: walking its sections and sub-tables (`leaf_fields`), the
annotation of a dotted key, checking a value against an annotation, the messages for unknown
and moved keys, and `describe()` for `--help` texts and docs/configuration.md."""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from typing import Any, Literal

from vlp3d.config.experiment import SECTIONS
from vlp3d.config.fields import ConfigError, did_you_mean
from vlp3d.config.methods import discover, method_sections, moved_objective_keys


def coerce_value(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field annotation; lists become tuples, ints become floats."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}.")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{where}: expected a list, got {value!r}.")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(coerce_value(v, args[0], where) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)} ({value!r}).")
        return tuple(coerce_value(v, a, where) for v, a in zip(value, args, strict=True))
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table ({{...}} or a [section] header), got {value!r}.")
        return value
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if type(value) is not annotation:
            raise ConfigError(
                f"{where}: expected {annotation.__name__}, got {type(value).__name__} {value!r}."
            )
        return value
    if isinstance(annotation, types.UnionType):
        raise TypeError(f"unsupported annotation {annotation}")
    return value


def sub_tables(cls: type) -> dict[str, type]:
    """{name: dataclass} of the fields of `cls` that are sub-tables (ExperimentConfig: its sections;
    ObjectiveConfig: the methods' `objective.<method>` tables, so the built-in methods are
    discovered first)."""
    discover()
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls) if dataclasses.is_dataclass(hints[f.name])}


def leaf_fields(cls: type, prefix: str = "") -> typing.Iterator[tuple[str, dataclasses.Field]]:
    """(dotted key, field) of every key of `cls`, in the dataclasses' order, sub-tables walked."""
    tables = sub_tables(cls)
    for f in dataclasses.fields(cls):
        if f.name in tables:
            yield from leaf_fields(tables[f.name], f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", f


def get_key(cfg: Any, key: str) -> Any:
    """The value of the dotted config key `key` in `cfg` (e.g. 'objective.mg3d.mim_weight')."""
    value = cfg
    for name in key.split("."):
        value = getattr(value, name)
    return value


def find_raw(raw: dict[str, Any], key: str) -> tuple[bool, Any]:
    """(present, value) of dotted `key` in nested `raw`."""
    value: Any = raw
    for part in key.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def assign_raw(raw: dict[str, Any], key: str, value: Any) -> None:
    *tables, name = key.split(".")
    for part in tables:
        raw = raw.setdefault(part, {})
    raw[name] = value


def moved_key_message(key: str) -> str | None:
    """The error for a flat `objective.<key>` that moved into a method's sub-table (naming the new
    key or keys); None for any other key."""
    section, _, name = key.partition(".")
    moved = moved_objective_keys() if section == "objective" else {}
    if name not in moved:
        return None
    methods = moved[name]
    if len(methods) == 1:
        return (f"objective.{name} moved to objective.{methods[0]}.{name} "
                f"(a [objective.{methods[0]}] table in a config file).")
    return (f"objective.{name} moved to {' and '.join(f'objective.{m}.{name}' for m in methods)} (one per "
            f"method: {' and '.join(f'[objective.{m}]' for m in methods)} tables in a config file).")


def unknown_key_message(cls: type, key: str, where: str) -> str:
    """The error for `key`, not a field of `cls` (at `where`, e.g. 'objective.'): moved, another
    method's setting, or the closest valid key (sub-tables' keys included)."""
    full = f"{where}{key}"
    moved = moved_key_message(full)
    if moved:
        return moved
    moved_keys = moved_objective_keys()
    if cls in method_sections().values() and key in moved_keys:
        homes = " and ".join(f"objective.{m}.{key}" for m in moved_keys[key])
        return f"unknown key '{full}': {key} is a setting of another method ({homes})."
    names = [f.name for f in dataclasses.fields(cls)]
    candidates = {name: name for name in names}
    for table, table_cls in sub_tables(cls).items():
        for f in dataclasses.fields(table_cls):
            candidates.setdefault(f.name, f"{table}.{f.name}")
    close = difflib.get_close_matches(key, list(candidates), n=1, cutoff=0.5)
    if close:
        return f"unknown key '{full}'. Did you mean '{where}{candidates[close[0]]}'?"
    return f"unknown key '{full}'. Valid keys: {', '.join(where + v for v in sorted(names))}."


def key_annotation(key: str) -> Any:
    """The annotation of config key `key` ('train.lr', 'objective.mg3d.mim_weight'); a ConfigError
    naming the key otherwise (unknown: the closest valid one; moved: its new name; a table)."""
    section, *names = key.split(".")
    if section not in SECTIONS:
        raise ConfigError(f"unknown section '{section}'.{did_you_mean(section, SECTIONS)}")
    cls, where = SECTIONS[section], f"{section}."
    if not names:
        raise ConfigError(f"'{key}' is a section; name one of its keys, e.g. '{next(leaf_fields(cls, where))[0]}'.")
    for i, name in enumerate(names):
        tables, hints = sub_tables(cls), typing.get_type_hints(cls)
        if name not in hints:
            raise ConfigError(unknown_key_message(cls, name, where))
        last = i == len(names) - 1
        if name in tables:
            cls, where = tables[name], f"{where}{name}."
            if last:
                raise ConfigError(f"'{key}' is a table; name one of its keys, e.g. '{next(leaf_fields(cls, where))[0]}'.")
        elif not last:
            raise ConfigError(f"'{where}{name}' is a key, not a table: '{key}' does not exist.")
        else:
            return hints[name]
    raise AssertionError("unreachable")


def describe() -> list[tuple[str, str, str]]:
    """(key, default, help) for every config key (`objective.mg3d.mim_weight`: a method's table), for
    `--help` texts; a numeric key's help ends with its allowed range."""
    rows = []
    for section, cls in SECTIONS.items():
        for key, f in leaf_fields(cls, f"{section}."):
            default = f.default_factory() if f.default is dataclasses.MISSING else f.default
            text = f.metadata.get("help", "")
            if "range" in f.metadata:
                text += f" Allowed: {'each ' if isinstance(default, tuple) else ''}{f.metadata['range']}."
            rows.append((key, repr(default), text))
    return rows
