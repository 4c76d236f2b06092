"""Pretraining objectives; each returns a dict of named, unweighted loss terms and declares its
contract (`vlp3d.objectives.base.Objective`).

Each method's module registers its objective class, its `[objective.<name>]` config table and
its published set-up in one place, `@register_method(section=..., defaults=...)` on the class
(vlp3d.config.methods). Importing this package imports every module in it, so every built-in
method is registered without a hand-kept list; the config imports this package the first time it
needs the registry. `objective_class(name)` is the one map from `objective.name` to its class;
`REGISTRY` is a read-only view {name: class} of the registered methods.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Mapping
from typing import TYPE_CHECKING

from vlp3d.config.methods import RegistryView, objective_classes, registered_methods
from vlp3d.errors import InputError

if TYPE_CHECKING:
    from vlp3d.objectives.base import Objective


def _import_modules() -> None:
    """Import every module of this package, in name order (each method's module registers it)."""
    for module in sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_")):
        importlib.import_module(f"{__name__}.{module}")


def objective_class(name: str) -> type[Objective]:
    """The objective class registered as `name`."""
    methods = registered_methods()
    if name not in methods:
        raise InputError(f"objective.name = {name!r} is not one of {', '.join(methods)}")
    return methods[name].objective


REGISTRY: Mapping[str, type[Objective]] = RegistryView(objective_classes)
_import_modules()  # after objective_class: modules of this package (model.py) import it
