"""`[cluster]`: the Ray cluster and the training workers."""

from __future__ import annotations

from dataclasses import dataclass

from vlp3d.config.fields import _f


@dataclass(frozen=True)
class ClusterConfig:
    address: str = _f("", "Ray address; empty: $RAY_ADDRESS, else a local Ray.", location=True)
    num_workers: int = _f(2, "Ray Train DDP workers.", ge=1)
    use_gpu: bool = _f(False, "One GPU per worker.")
    cpus_per_worker: float = _f(0.5, "CPUs reserved per worker (leave some for Ray Data on small machines).", ge=0)
