"""What leaves the process: every key as strings (`flatten`), the allow-list of MLflow params
(`logged_params`, no locations), and a config as it may be stored with a run or a model
(`public_config`: locations emptied, credentials redacted)."""

from __future__ import annotations

import json

from vlp3d.config.experiment import ExperimentConfig, to_dict
from vlp3d.config.loading import from_dict
from vlp3d.config.schema import find_raw, leaf_fields
from vlp3d.redact import redact


def flatten(cfg: ExperimentConfig) -> dict[str, str]:
    """`{"train.lr": "0.002", "objective.mg3d.mim_weight": "1.0", ...}`: every key (MLflow
    receives `logged_params`)."""
    raw = to_dict(cfg)
    out = {}
    for key, _field in leaf_fields(ExperimentConfig):
        value = find_raw(raw, key)[1]
        out[key] = json.dumps(value) if isinstance(value, list | dict) else str(value)
    return out


# what MLflow receives as params: the training-relevant sections, every field but locations
LOGGED_SECTIONS = ("data", "model", "objective", "train", "eval", "finetune", "tune", "cluster")


def logged_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The allow-list of MLflow params: `name` and the keys of LOGGED_SECTIONS except locations
    (corpus, shard and work folders, tracking and Ray addresses), credentials redacted."""
    flat = flatten(cfg)
    allowed = {"name"} | {key for key, f in leaf_fields(ExperimentConfig)
                          if key.split(".", 1)[0] in LOGGED_SECTIONS and not f.metadata.get("location")}
    return {k: redact(v) for k, v in flat.items() if k in allowed}


def public_config(cfg: ExperimentConfig) -> ExperimentConfig:
    """`cfg` as it may be stored with a run or a model: locations emptied, credentials redacted."""
    raw = to_dict(cfg)
    changed = False
    for key, f in leaf_fields(ExperimentConfig):
        if "." not in key:  # the top-level name
            continue
        *path, name = key.split(".")
        table = find_raw(raw, ".".join(path))[1]
        value = table[name]
        new = "" if f.metadata.get("location") else redact(value) if isinstance(value, str) else value
        if new != value:
            table[name], changed = new, True
    return from_dict(raw) if changed else cfg
