"""`[objective]`: the pretraining method, its temperature and the keys every method shares;
each method's own settings are its sub-table (vlp3d.config.methods)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from vlp3d.config.fields import _f
from vlp3d.config.methods import MG3DConfig, T3DConfig, UniMedIConfig


def _method(cls: type, method: str) -> Any:
    """A sub-table of method settings (the method's defaults when the config does not set it)."""
    return field(default_factory=cls, metadata={"help": f"Settings of the {method} method."})


@dataclass(frozen=True)
class ObjectiveConfig:
    """Loss terms and heads of the pretraining method. Every `*_weight` scales one named term.

    Setting `name` in a config file or override also applies that method's defaults
    (`METHOD_DEFAULTS`, docs/methods.md: encoder, data, objective and optimiser keys) to every key
    the file does not set itself.
    Each method's own settings are in a sub-table: `[objective.mg3d]`, `[objective.t3d]`,
    `[objective.unimedi]` (override: `objective.mg3d.mim_weight=0`).
    """

    name: Literal["clip", "mg3d", "t3d", "unimedi"] = _f("clip", "Pretraining method: clip, mg3d, t3d or unimedi.")
    temperature: float = _f(0.07, "Initial softmax temperature tau of the volume-report InfoNCE logits.")
    learnable_temperature: bool = _f(True, "Learn log(1/tau), clamped at 100 (false: tau stays fixed).")
    gather_with_grad: bool = _f(True, "All-gather embeddings with gradients so negatives are the global batch.")
    local_loss: bool = _f(False, "Compute only the local rows (B x G) of the global logits.")
    head_lr_mult: float = _f(1.0, "Learning rate of every non-encoder parameter = train.lr x this (MG-3D: 5).")
    # clip / mg3d
    align_weight: float = _f(1.0, "Weight of `align`, the volume-report InfoNCE (MG-3D: 0.1).")
    mg3d: MG3DConfig = _method(MG3DConfig, "MG-3D")
    t3d: T3DConfig = _method(T3DConfig, "T3D")
    unimedi: UniMedIConfig = _method(UniMedIConfig, "UniMedI")
