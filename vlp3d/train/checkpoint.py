"""The checkpoint folder (pure torch): what training writes, a resumed run restores and inference,
export and registration load. One module owns the format:

    model.pt          state dict of the embedding model (VisionLanguageModel): inference, export
    objective.pt      the objective's own state: heads, EMA teacher, centres
    train_state.pt    optimizer, LR scheduler, grad scaler, step, skipped steps (in all and in a
                      row), data position, every random generator of every rank (Python, NumPy,
                      torch CPU and CUDA, the augmentation generator) and the tracking calls not
                      yet delivered: a resumed run continues with the batches, masks and
                      augmentations an uninterrupted run would have used
    config.toml       the run's configuration, without locations (vlp3d.config.public_config)
    meta.json         preprocessing spec, label names, text width, step, MLflow run id

A checkpoint is only written from finite weights (`nonfinite_parameters`). Every file loads with
`torch.load(weights_only=True)`: tensors, numbers, strings and containers only, no pickled objects
(NumPy's generator state is stored as lists), so a checkpoint from elsewhere cannot run code.
"""

from __future__ import annotations

import json
import pickle
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vlp3d.config import ExperimentConfig, load_stored_config, public_config, to_toml
from vlp3d.errors import InputError

MODEL = "model.pt"
OBJECTIVE = "objective.pt"
TRAIN_STATE = "train_state.pt"
CONFIG = "config.toml"
META = "meta.json"
FORMAT = 3  # train_state.pt layout; 1 had no data position, scaler or per-rank generators; 2 pickled NumPy's state


@dataclass
class TrainState:
    """Where training stands: `position[name] = [epoch, batches consumed in it]` per dataset,
    `rng[rank]` the generator states of each rank (see `capture_rng`)."""

    step: int = 0
    skipped_steps: int = 0
    position: dict[str, list[int]] = field(default_factory=dict)
    rng: list[dict] = field(default_factory=list)
    unsent_logs: list = field(default_factory=list)  # tracking calls rank 0 could not deliver yet
    term_multipliers: dict[str, float] = field(default_factory=dict)  # engine.TermBalancer (train.balance_terms)
    skipped_in_a_row: int = 0  # consecutive non-finite steps up to `step` (train.max_skipped_steps counts them)


def _numpy_state() -> dict:
    """NumPy's legacy generator state as plain numbers and lists (`torch.load(weights_only=True)` safe)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"name": name, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "gauss": float(gauss)}


def _set_numpy_state(state) -> None:
    if isinstance(state, dict):
        np.random.set_state((state["name"], np.asarray(state["keys"], dtype=np.uint32), state["pos"],
                             state["has_gauss"], state["gauss"]))
    else:  # FORMAT 2: the tuple np.random.get_state returns
        np.random.set_state(state)


def capture_rng(generator: torch.Generator | None = None) -> dict:
    """This process's generator states: Python, NumPy, torch CPU, CUDA (every device) and `generator`."""
    state = {"python": random.getstate(), "numpy": _numpy_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    if generator is not None:
        state["generator"] = generator.get_state()
    return state


def restore_rng(state: dict, generator: torch.Generator | None = None) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))  # a list after some round trips
    _set_numpy_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if generator is not None and "generator" in state:
        generator.set_state(state["generator"])


def seed_everything(seed: int, generator: torch.Generator | None = None) -> None:
    """A fresh start: every generator `capture_rng` saves, seeded from `seed`."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if generator is not None:
        generator.manual_seed(seed + 1)


def nonfinite_parameters(module: nn.Module) -> list[str]:
    """Names of parameters and buffers holding NaN or inf (empty when all are finite)."""
    tensors = list(module.named_parameters()) + list(module.named_buffers())
    return [name for name, t in tensors if t.is_floating_point() and not bool(torch.isfinite(t).all())]


def save(directory: str | Path, model: nn.Module, objective: nn.Module, optimizer, scheduler,
         scaler: torch.amp.GradScaler | None, state: TrainState, cfg: ExperimentConfig, meta: dict) -> None:
    """Write the checkpoint folder; refuses (ValueError) when a weight is not finite."""
    bad = nonfinite_parameters(model) + [f"objective.{n}" for n in nonfinite_parameters(objective)]
    if bad:
        raise InputError(f"not writing a checkpoint at step {state.step}: non-finite values in {', '.join(bad[:5])}"
                         + (f" and {len(bad) - 5} more" if len(bad) > 5 else ""))
    directory = Path(directory)
    torch.save(model.state_dict(), directory / MODEL)
    torch.save(objective.state_dict(), directory / OBJECTIVE)
    torch.save({"format": FORMAT, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None, "step": state.step,
                "skipped_steps": state.skipped_steps, "skipped_in_a_row": state.skipped_in_a_row,
                "position": state.position, "rng": state.rng,
                "unsent_logs": state.unsent_logs, "term_multipliers": state.term_multipliers},
               directory / TRAIN_STATE)
    (directory / CONFIG).write_text(to_toml(public_config(cfg)))
    (directory / META).write_text(json.dumps({**meta, "step": state.step}, indent=2))


def restore(directory: str | Path, model: nn.Module, objective: nn.Module, optimizer, scheduler,
            scaler: torch.amp.GradScaler | None, map_location: torch.device | str = "cpu") -> TrainState:
    """Load everything `save` wrote into the given objects; returns the training state."""
    directory = Path(directory)
    model.load_state_dict(torch.load(directory / MODEL, map_location=map_location, weights_only=True))
    objective.load_state_dict(torch.load(directory / OBJECTIVE, map_location=map_location, weights_only=True))
    raw = load_train_state(directory)
    optimizer.load_state_dict(raw["optimizer"])
    scheduler.load_state_dict(raw["scheduler"])
    if scaler is not None and raw.get("scaler"):
        scaler.load_state_dict(raw["scaler"])
    return TrainState(step=int(raw["step"]), skipped_steps=int(raw.get("skipped_steps", 0)),
                      skipped_in_a_row=int(raw.get("skipped_in_a_row", 0)),
                      position={k: list(v) for k, v in raw.get("position", {}).items()}, rng=list(raw.get("rng", [])),
                      unsent_logs=list(raw.get("unsent_logs", [])),
                      term_multipliers=dict(raw.get("term_multipliers", {})))


def load_train_state(directory: str | Path) -> dict:
    """train_state.pt with `weights_only=True`; one written before FORMAT 3 (NumPy's state pickled as an
    array) is refused with how to go on, never unpickled."""
    path = Path(directory) / TRAIN_STATE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        raise InputError(f"{path}: holds objects that torch.load(weights_only=True) refuses (a checkpoint written "
                         f"before vlp3d stored its training state as tensors, numbers and lists, or not by vlp3d): "
                         f"{str(err).splitlines()[0][:200]}. Start the run afresh under a new name.") from None


def read_meta(directory: str | Path) -> dict:
    return json.loads((Path(directory) / META).read_text())


def read_config(directory: str | Path) -> ExperimentConfig:
    """The checkpoint's config (one stored before the `[objective.<method>]` tables loads too)."""
    return load_stored_config(Path(directory) / CONFIG)


def load_model_state(directory: str | Path, map_location: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
    """The embedding model's state dict (what inference and export load)."""
    return torch.load(Path(directory) / MODEL, map_location=map_location, weights_only=True)


def restore_unsent(directory: str | Path) -> list:
    """The tracking calls a checkpoint holds that its writer had not delivered."""
    path = Path(directory) / TRAIN_STATE
    if not path.is_file():
        return []
    return list(load_train_state(directory).get("unsent_logs", []))


def nonfinite_parameters_in(directory: str | Path) -> list[str]:
    """Names of non-finite tensors in a checkpoint's model.pt."""
    return [name for name, t in load_model_state(directory).items()
            if t.is_floating_point() and not bool(torch.isfinite(t).all())]
