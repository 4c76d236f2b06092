"""The whole config, `ExperimentConfig`: a top-level `name` and one frozen dataclass per section
(`SECTIONS`), each in its own module; `to_dict` and `config_hash` of any config dataclass."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from vlp3d.config.cluster import ClusterConfig
from vlp3d.config.data import DataConfig
from vlp3d.config.eval import EvalConfig
from vlp3d.config.fields import _f
from vlp3d.config.finetune import FinetuneConfig
from vlp3d.config.model import ModelConfig
from vlp3d.config.objective import ObjectiveConfig
from vlp3d.config.tracking import TrackingConfig
from vlp3d.config.train import TrainConfig
from vlp3d.config.tune import TuneConfig


@dataclass(frozen=True)
class ExperimentConfig:
    name: str = _f("demo", "Experiment name (MLflow experiment and run-name prefix).")
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)


SECTIONS: dict[str, type] = {
    f.name: f.type if isinstance(f.type, type) else globals()[f.type]
    for f in dataclasses.fields(ExperimentConfig)
    if f.name != "name"
}


def to_dict(cfg: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_hash(obj: Any) -> str:
    """Short stable hash of a dataclass or JSON-able value."""
    payload = to_dict(obj) if dataclasses.is_dataclass(obj) else obj
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:12]
