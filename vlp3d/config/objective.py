"""`[objective]`: the keys every pretraining method shares (the method's name, the temperature, the
contrastive loss's reach, the heads' learning rate, the weight of `align`).

The methods' own tables (`[objective.mg3d]`, ...) are not declared here: each method registers its
table with the method registry (vlp3d.config.methods), which calls `rebuild` to regenerate this
dataclass in place - the same class object, so every module that imported it sees the change -
with one sub-table field per registered table and `name` typed as the Literal of the registered
methods.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from vlp3d.config.fields import _f


@dataclass(frozen=True)
class ObjectiveConfig:
    """Loss terms and heads of the pretraining method. Every `*_weight` scales one named term.

    Setting `name` in a config file or override also applies that method's defaults
    (`METHOD_DEFAULTS`, docs/methods.md: encoder, data, objective and optimiser keys) to every key
    the file does not set itself.
    """

    name: str = _f("clip", "Pretraining method: a registered one (vlp3d.config.methods).")
    temperature: float = _f(0.07, "Initial softmax temperature tau of the volume-report InfoNCE logits.", gt=0)
    learnable_temperature: bool = _f(True, "Learn log(1/tau), clamped at 100 (false: tau stays fixed).")
    gather_with_grad: bool = _f(True, "All-gather embeddings with gradients so negatives are the global batch.")
    local_loss: bool = _f(False, "Compute only the local rows (B x G) of the global logits.")
    head_lr_mult: float = _f(1.0, "Learning rate of every non-encoder parameter = train.lr x this (MG-3D: 5).", ge=0)
    # clip / mg3d
    align_weight: float = _f(1.0, "Weight of `align`, the volume-report InfoNCE (MG-3D: 0.1).", ge=0)

    def __new__(cls, *args: Any, **kwargs: Any) -> ObjectiveConfig:
        # the registered methods complete this class's fields: discover them before any instance
        from vlp3d.config.methods import discover

        discover()
        return super().__new__(cls)


_GENERAL = dataclasses.fields(ObjectiveConfig)
_GENERAL_TYPES = typing.get_type_hints(ObjectiveConfig)
_DOC = ObjectiveConfig.__doc__
# what @dataclass generates: removed before it runs again (it keeps what a class defines itself)
_GENERATED = ("__init__", "__repr__", "__eq__", "__hash__", "__setattr__", "__delattr__", "__match_args__",
              "__replace__")
_tables: list[str] = []  # the sub-table fields the last rebuild added


def general_keys() -> tuple[str, ...]:
    """The keys of `[objective]` that are not a method's table."""
    return tuple(f.name for f in _GENERAL)


def rebuild(methods: Sequence[str], sections: Mapping[str, type]) -> None:
    """Regenerate ObjectiveConfig for the registered `methods` (in order) and their tables
    (`sections`: {method: frozen dataclass}): the shared keys, then one sub-table per method, its
    default the table's defaults; `name` a Literal of `methods`. Instances made before keep their
    values; a table added since reads as its defaults."""
    cls = ObjectiveConfig
    for attr in (*_GENERATED, *_tables):
        if attr in cls.__dict__:
            delattr(cls, attr)
    annotations: dict[str, Any] = {}
    for f in _GENERAL:
        metadata = dict(f.metadata)
        annotations[f.name] = _GENERAL_TYPES[f.name]
        if f.name == "name" and methods:
            annotations[f.name] = Literal[tuple(methods)]
            names = f"{', '.join(methods[:-1])} or {methods[-1]}" if len(methods) > 1 else methods[0]
            metadata["help"] = f"Pretraining method: {names}."
        setattr(cls, f.name, field(default=f.default, metadata=metadata))
    for method, section in sections.items():
        annotations[method] = section
        setattr(cls, method, field(default=section(), metadata={"help": f"Settings of the {method} method."}))
    cls.__annotations__ = annotations
    dataclass(frozen=True)(cls)
    _tables[:] = sections
    cls.__doc__ = _DOC
    if sections:
        first, table = next(iter(sections.items()))
        keys = dataclasses.fields(table)
        example = f" (override: `objective.{first}.{keys[0].name}=0`)" if keys else ""
        cls.__doc__ = (f"{_DOC.rstrip()}\n    Each method's own settings are in a sub-table: "
                       f"{', '.join(f'`[objective.{m}]`' for m in sections)}{example}.\n")
