"""The bottom of the config: its error, the field helper every section's keys are declared with,
the did-you-mean hint of its messages, and what counts as a URI."""

from __future__ import annotations

import difflib
import math
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from vlp3d.errors import InputError


class ConfigError(InputError):
    """A config file or override is invalid; the message names the key and how to fix it."""


@dataclass(frozen=True)
class Range:
    """The values a numeric key (or each number of a tuple key) may take: `ge`/`gt` below, `le`/`lt`
    above (None: unbounded); always finite."""

    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None

    def __contains__(self, value: float) -> bool:
        return (math.isfinite(value)
                and (self.ge is None or value >= self.ge) and (self.gt is None or value > self.gt)
                and (self.le is None or value <= self.le) and (self.lt is None or value < self.lt))

    def __str__(self) -> str:
        low = f"[{self.ge:g}" if self.ge is not None else f"({self.gt:g}" if self.gt is not None else None
        high = f"{self.le:g}]" if self.le is not None else f"{self.lt:g})" if self.lt is not None else None
        if low and high:
            return f"in {low}, {high}"
        if low:
            return f"{'>=' if self.ge is not None else '>'} {low[1:]}"
        if high:
            return f"{'<=' if self.le is not None else '<'} {high[:-1]}"
        return "finite"

    def outside(self) -> float | None:
        """A value just outside the range (for tests and examples); None when unbounded."""
        if self.ge is not None:
            return self.ge - 1
        if self.gt is not None:
            return self.gt
        if self.le is not None:
            return self.le + 1
        if self.lt is not None:
            return self.lt
        return None


def setting(default: Any, help: str, location: bool = False, *, ge: float | None = None,
            gt: float | None = None, le: float | None = None, lt: float | None = None) -> Any:
    """A dataclass field whose help text serves `config show --help` and the docs. A `location`
    (a path or URI of data, storage or a service) is never logged to MLflow (`logged_params`).
    A numeric key (or a tuple of numbers, checked number by number) declares its range with
    `ge`/`gt` (>=, > the low end) and `le`/`lt` (<=, < the high end); every number is also finite."""
    if isinstance(default, list | dict):
        raise TypeError("use tuples for sequence defaults so configs stay frozen")
    metadata = {"help": help, "location": location}
    if (ge, gt, le, lt) != (None, None, None, None):
        bounds = Range(ge, gt, le, lt)
        for value in default if isinstance(default, tuple) else (default,):
            if value not in bounds:
                raise TypeError(f"default {default!r} is not {bounds}")
        metadata["range"] = bounds
    return field(default=default, metadata=metadata)


_f = setting  # the short name the sections' one-line keys use


def table_setting(help: str) -> Any:
    """A TOML-table field (empty by default); its contents are checked by vlp3d.search_space."""
    return field(default_factory=dict, metadata={"help": help})


def did_you_mean(key: str, valid: typing.Iterable[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    if close:
        return f" Did you mean '{prefix}{close[0]}'?"
    return f" Valid keys: {', '.join(prefix + v for v in sorted(valid))}."


# `scheme://...`: a URI (vlp3d.storage opens it with pyarrow); anything else is a local path
URI_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]+)://")


def is_uri(location: str | Path) -> bool:
    """True for `scheme://...` (a Windows drive letter `C:/` is not a scheme: two letters at least)."""
    return isinstance(location, str) and bool(URI_SCHEME.match(location))
