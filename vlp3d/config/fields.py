"""The bottom of the config: its error, the field helper every section's keys are declared with,
the did-you-mean hint of its messages, and what counts as a URI."""

from __future__ import annotations

import difflib
import re
import typing
from dataclasses import field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """A config file or override is invalid; the message names the key and how to fix it."""


def setting(default: Any, help: str, location: bool = False) -> Any:
    """A dataclass field whose help text serves `config show --help` and the docs. A `location`
    (a path or URI of data, storage or a service) is never logged to MLflow (`logged_params`)."""
    if isinstance(default, list | dict):
        raise TypeError("use tuples for sequence defaults so configs stay frozen")
    return field(default=default, metadata={"help": help, "location": location})


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
