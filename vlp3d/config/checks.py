"""Checks of a built config beyond each key's type: value ranges (declared with each key, also
applied to sweep values), keys that must be local folders, and keys that need each other."""

from __future__ import annotations

import math
from typing import Any

from vlp3d.config.experiment import SECTIONS, ExperimentConfig
from vlp3d.config.fields import ConfigError, Range, is_uri
from vlp3d.config.methods import method_sections
from vlp3d.config.schema import get_key, leaf_fields
from vlp3d.redact import redact

_RANGES: dict[tuple, dict[str, Range]] = {}


def key_ranges() -> dict[str, Range]:
    """{dotted key: its Range} of every key that declares one (`setting(..., ge=, gt=, le=, lt=)`),
    the registered methods' tables included."""
    sections = tuple(method_sections().items())
    if sections not in _RANGES:  # walked again only when a method (un)registers
        _RANGES.clear()
        _RANGES[sections] = {key: f.metadata["range"] for name, cls in SECTIONS.items()
                             for key, f in leaf_fields(cls, f"{name}.") if "range" in f.metadata}
    return _RANGES[sections]


def check_value_range(key: str, value: Any) -> None:
    """Raise ConfigError, in one line naming the key and its range, unless `value` (each number of a
    tuple) lies in the range `key` declares (if any)."""
    bounds = key_ranges().get(key)
    if bounds is None:
        return
    numbers = value if isinstance(value, tuple | list) else (value,)
    if any(number not in bounds for number in numbers):
        each = "each value " if isinstance(value, tuple | list) else ""
        finite = "" if all(math.isfinite(n) for n in numbers) else "a finite number "
        raise ConfigError(f"{key} = {_show(value)} is out of range: {each}must be {finite}{bounds}.")


def _show(value: Any) -> str:
    return f"[{', '.join(map(repr, value))}]" if isinstance(value, tuple | list) else repr(value)


# keys that must name a local (or mounted) path: what reads or writes them needs a POSIX folder
LOCAL_ONLY = {
    "tracking.workdir": "it holds the local MLflow store (sqlite) and the sweep folders; put checkpoints on "
                        "shared storage with tracking.storage=URI and runs on an MLflow server with "
                        "tracking.tracking_uri (or MLFLOW_TRACKING_URI)",
    "data.corpus": "prepare opens the corpus's volume files by path; mount the bucket (e.g. s3fs, EFS) and give "
                   "the mounted folder (the shards, data.shards / prepare --out, may be a URI)",
}


def check_ranges(cfg: ExperimentConfig) -> None:
    """Raise ConfigError, naming the key, unless `cfg` passes every check above."""
    for key, why in LOCAL_ONLY.items():
        if is_uri(get_key(cfg, key)):
            raise ConfigError(f"{key} = {redact(get_key(cfg, key))!r} must be a local folder, not a URI: {why}.")
    if cfg.train.balance_terms and not cfg.train.grad_share_every:
        raise ConfigError("train.balance_terms = true needs train.grad_share_every > 0 (the steps at which the "
                          "terms' gradient shares are measured and the multipliers move), e.g. 50.")
    for key in key_ranges():
        check_value_range(key, get_key(cfg, key))
    low, high = cfg.data.hu_window
    if low >= high:
        raise ConfigError(f"data.hu_window = [{low:g}, {high:g}]: the low end must be below the high end, "
                          "e.g. [-1000, 1000].")

