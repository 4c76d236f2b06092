"""Pretraining objectives; each returns a dict of named, unweighted loss terms and declares its
contract (`vlp3d.objectives.base.Objective`). `REGISTRY` is the one map from `objective.name` to
its class (imported on first use: MG-3D pulls in the text encoder)."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vlp3d.objectives.base import Objective

REGISTRY: dict[str, str] = {
    "clip": "vlp3d.objectives.clip:ClipObjective",
    "mg3d": "vlp3d.objectives.mg3d:MG3DObjective",
    "t3d": "vlp3d.objectives.t3d:T3DObjective",
    "unimedi": "vlp3d.objectives.unimedi:UniMedIObjective",
}


def objective_class(name: str) -> type[Objective]:
    """The objective class registered as `name`."""
    if name not in REGISTRY:
        raise KeyError(f"objective.name = {name!r} is not one of {', '.join(REGISTRY)}")
    module, cls = REGISTRY[name].split(":")
    return getattr(importlib.import_module(module), cls)
