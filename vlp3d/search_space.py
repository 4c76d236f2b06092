"""Sweep search spaces (`tune.space`, `tune.variants`): parse and check them against the config
schema, list the configurations they can produce, and apply one trial's values to a config.

No Ray here: `vlp3d.platform.sweep` turns the parsed dimensions into Ray Tune's search space.
Everything a sweep could get wrong about its space fails here, before any trial starts.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from vlp3d.config import (
    SECTIONS,
    ConfigError,
    ExperimentConfig,
    check_value_range,
    coerce_value,
    did_you_mean,
    key_annotation,
    replace,
)
from vlp3d.data.splits import parse_split

VARIANT = "variant"  # the trial-config key of the tune.variants axis
SAMPLED = ("uniform", "loguniform", "randint")
FORMS = ("grid", "choice", *SAMPLED)
FIXED_SECTIONS = ("tune", "tracking")  # how the sweep itself runs and logs: one value per sweep
MAX_CHECKED_CONFIGS = 5000


@dataclass(frozen=True)
class Dimension:
    """One axis of the search space. `values`: every value (grid, choice) or the bounds (sampled)."""

    key: str
    kind: str
    values: tuple

    @property
    def enumerable(self) -> bool:
        return self.kind in ("grid", "choice")

    def checked_values(self) -> tuple:
        """Values that stand for the axis when configs are checked: all of them, or the bounds."""
        if self.kind == "randint":
            return (self.values[0], self.values[1] - 1)
        return self.values


def _field(key: str) -> tuple[str, str, Any]:
    """'data.fraction' -> ('data', 'fraction', annotation), 'objective.mg3d.mim_weight' ->
    ('objective', 'mg3d.mim_weight', annotation); unknown, moved or fixed keys raise ConfigError."""
    where = f"tune.space: '{key}'"
    parts = key.split(".")
    sweepable = [s for s in SECTIONS if s not in FIXED_SECTIONS]
    if len(parts) < 2:
        raise ConfigError(f"{where} is not a config key; use section.key, e.g. \"data.fraction\" "
                          f"(sections: {', '.join(sweepable)}).")
    section = parts[0]
    if section in FIXED_SECTIONS:
        raise ConfigError(f"{where}: [{section}] settings are the sweep's own and cannot vary between trials; "
                          f"sweepable sections: {', '.join(sweepable)}.")
    if section not in SECTIONS:
        raise ConfigError(f"{where}: unknown section '{section}'.{did_you_mean(section, sweepable)}")
    try:
        annotation = key_annotation(key)
    except ConfigError as err:
        raise ConfigError(f"{where}: {err}") from None
    return section, key.split(".", 1)[1], annotation


def _value(key: str, annotation: Any, value: Any) -> Any:
    where = f"tune.space: '{key}'"
    value = coerce_value(value, annotation, where)
    try:
        check_value_range(key, value)
    except ConfigError as err:
        raise ConfigError(f"tune.space: {err}") from None
    return value


def _dimension(key: str, spec: Any) -> Dimension:
    _, _, annotation = _field(key)
    where = f"tune.space: '{key}'"
    if isinstance(spec, list):
        kind, values = "grid", spec
    elif isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in FORMS:
        kind, values = next(iter(spec.items()))
    else:
        raise ConfigError(
            f"{where} = {spec!r}: give a list of values (every one is tried) or one of "
            "{grid = [...]}, {choice = [...]}, {uniform = [lo, hi]}, {loguniform = [lo, hi]}, {randint = [lo, hi]}."
        )
    if not isinstance(values, list) or not values:
        raise ConfigError(f"{where}: {kind} needs a non-empty list, got {values!r}.")
    if kind in ("grid", "choice"):
        return Dimension(key, kind, tuple(_value(key, annotation, v) for v in values))
    number = int if kind == "randint" else float
    if annotation is not number:
        raise ConfigError(f"{where}: {kind} samples {number.__name__}s but the key holds "
                          f"{getattr(annotation, '__name__', annotation)}; list its values instead.")
    if len(values) != 2:
        raise ConfigError(f"{where}: {kind} takes [lo, hi], got {values!r}.")
    low, high = (_value(key, annotation, v) for v in values)
    if not low < high or (kind == "loguniform" and low <= 0):
        raise ConfigError(f"{where}: {kind} needs {'0 < ' if kind == 'loguniform' else ''}lo < hi, got {values!r}.")
    if kind == "randint":
        _value(key, annotation, high - 1)
    return Dimension(key, kind, (low, high))


@dataclass(frozen=True)
class SearchSpace:
    dimensions: tuple[Dimension, ...]
    variants: dict[str, dict[str, Any]]

    @property
    def keys(self) -> list[str]:
        """Config keys that vary between trials (space keys, then keys set by any variant)."""
        keys = [d.key for d in self.dimensions if d.key != VARIANT]
        for overrides in self.variants.values():
            keys += [k for k in overrides if k not in keys]
        return keys

    def grid_size(self) -> int:
        """Grid points ('grid' search): product of the grid axes (sampled and choice axes count 1)."""
        size = 1
        for dimension in self.dimensions:
            if dimension.kind == "grid":
                size *= len(dimension.values)
        return size

    def representative_params(self) -> Iterator[dict[str, Any]]:
        """Every combination of the enumerable values and sampled bounds (capped): what any trial
        can combine, for checking before a sweep starts."""
        axes = [[(d.key, v) for v in d.checked_values()] for d in self.dimensions]
        for count, combination in enumerate(itertools.product(*axes)):
            if count >= MAX_CHECKED_CONFIGS:
                return
            yield dict(combination)


def parse_space(space: dict[str, Any], variants: dict[str, Any]) -> SearchSpace:
    """`tune.space` and `tune.variants` -> SearchSpace; every key, value and range checked."""
    dimensions = [_dimension(key, spec) for key, spec in space.items()]
    parsed_variants: dict[str, dict[str, Any]] = {}
    for name, overrides in variants.items():
        if not isinstance(overrides, dict):
            raise ConfigError(f"tune.variants.{name} must be a table of config keys, e.g. "
                              f"[tune.variants.{name}] \"objective.mg3d.mim_weight\" = 0.0; got {overrides!r}.")
        parsed = {}
        for key, value in overrides.items():
            if key in space:
                raise ConfigError(f"tune.variants.{name} sets '{key}', which tune.space also varies; "
                                  "set it in one place.")
            parsed[key] = _value(key, _field(key)[2], value)
        parsed_variants[str(name)] = parsed
    if parsed_variants:
        dimensions.append(Dimension(VARIANT, "grid", tuple(parsed_variants)))
    if not dimensions:
        raise ConfigError("tune.space and tune.variants are empty: nothing to sweep. Add e.g. "
                          "[tune.space] \"data.fraction\" = [0.25, 0.5, 1.0] to the config.")
    return SearchSpace(tuple(dimensions), parsed_variants)


def planned_trials(cfg: ExperimentConfig, space: SearchSpace) -> int:
    """Trials a sweep runs: every grid point tune.num_samples times ('grid'), else tune.num_samples."""
    return space.grid_size() * cfg.tune.num_samples if cfg.tune.search == "grid" else cfg.tune.num_samples


def apply_params(cfg: ExperimentConfig, params: dict[str, Any], space: SearchSpace) -> ExperimentConfig:
    """The config of one trial: its variant's keys, then its space values (checked like overrides)."""
    updates: dict[str, Any] = {}
    values = dict(space.variants.get(params.get(VARIANT, ""), {}))
    values.update({k: v for k, v in params.items() if k != VARIANT})
    for key, value in values.items():  # 'objective.mg3d.mim_weight' -> {'objective': {'mg3d': {'mim_weight': v}}}
        *tables, name = key.split(".")
        table = updates
        for part in tables:
            table = table.setdefault(part, {})
        table[name] = value
    return replace(cfg, **updates)


def trial_label(params: dict[str, Any]) -> str:
    """'variant=full data.fraction=0.5 model.size=small' for progress lines and plot legends."""
    def fmt(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    return " ".join(f"{k}={fmt(v)}" for k, v in params.items())


# keys whose variation a scaling fit pools over (vlp3d.evaluation.scaling): their points must each run to
# their budget, so an early-stopping scheduler must not cut them short
FIT_KEYS = ("data.fraction", "model.size", "train.max_steps", "train.global_batch")


def check_selection(cfg: ExperimentConfig, space: SearchSpace) -> None:
    """How a sweep selects and reports: an early-stopping scheduler (tune.scheduler) only where no axis of
    tune.space feeds a scaling fit; selection (data.eval_split: tune.metric, the best trial, early stopping,
    the validation loss) and reporting (tune.report_split) on splits that do not overlap."""
    if cfg.tune.scheduler != "none":
        pooled = [d.key for d in space.dimensions if d.key in FIT_KEYS and (not d.enumerable or len(d.values) > 1)]
        if pooled:
            raise ConfigError(
                f"tune.scheduler = {cfg.tune.scheduler!r} with tune.space varying {', '.join(pooled)}: early stopping "
                "cuts short exactly the small-budget trials a scaling fit needs, each run to its own budget. Set "
                "tune.scheduler = 'none' for a scaling sweep; keep early stopping for loss-weight and hyperparameter "
                "searches (or set such keys per tune.variants entry: variants are never pooled into one fit).")
    select, report = parse_split(cfg.data.eval_split), parse_split(cfg.tune.report_split)
    if select.split == report.split and select.low < report.high and report.low < select.high:  # they overlap
        raise ConfigError(f"data.eval_split = {cfg.data.eval_split!r} and tune.report_split = "
                          f"{cfg.tune.report_split!r}: the sweep would report its figures on the split it selects on "
                          "(best trial, early stopping, tune.metric). Use another tune.report_split (e.g. 'test', "
                          "carved from data.eval_split's patients when the shards have none).")
    if report.split == cfg.data.train_split:
        raise ConfigError(f"tune.report_split = {cfg.tune.report_split!r} is data.train_split: report on held-out "
                          "patients (e.g. 'test').")
    if not 0 < cfg.tune.report_share < 1:
        raise ConfigError(f"tune.report_share = {cfg.tune.report_share} must be in (0, 1): the share of "
                          "data.eval_split's patients carved out for reporting, the rest selects.")
