"""A config as TOML (`to_toml`): the file `vlp3d config show` prints and vlp3d stores with
checkpoints, models and sweeps; it loads back to the same config."""

from __future__ import annotations

import json
from typing import Any

from vlp3d.config.experiment import SECTIONS, ExperimentConfig, to_dict
from vlp3d.config.schema import sub_tables


def to_toml(cfg: ExperimentConfig, notes: dict[str, str] | None = None) -> str:
    """`cfg` as TOML (it loads back to `cfg`); `notes` {dotted key: text} become end-of-line comments."""
    notes = notes or {}

    def fmt(value: Any) -> str:
        if isinstance(value, bool):
            return "true" if value else "false"
        if isinstance(value, list):
            return "[" + ", ".join(fmt(v) for v in value) + "]"
        if isinstance(value, dict):  # an inline table; keys quoted (search-space keys hold dots)
            items = ", ".join(f"{json.dumps(k)} = {fmt(v)}" for k, v in value.items())
            return f"{{ {items} }}" if items else "{}"
        return json.dumps(value)

    def table(header: str, cls: type, values: dict[str, Any]) -> None:
        """`[header]` with its keys, then its sub-tables (`[objective.mg3d]`, ...)."""
        tables = sub_tables(cls)
        lines.append(f"\n[{header}]")
        for key, value in values.items():
            if key not in tables:
                note = notes.get(f"{header}.{key}")
                lines.append(f"{key} = {fmt(value)}" + (f"  # {note}" if note else ""))
        for key, table_cls in tables.items():
            table(f"{header}.{key}", table_cls, values[key])

    raw = to_dict(cfg)
    lines = [f"name = {fmt(raw.pop('name'))}"]
    for section, values in raw.items():
        table(section, SECTIONS[section], values)
    return "\n".join(lines) + "\n"
