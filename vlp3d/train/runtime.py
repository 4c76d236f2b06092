"""What the training loop runs on: a `Runtime` says which rank this process is, on which device, which
rows it reads, and where checkpoints and reports go. `LocalRuntime` is one process without Ray (tests,
debugging, `--local`, one-worker sweep trials); `vlp3d.platform.ray_train.RayTrainRuntime` is a Ray
Train worker. The loop (`vlp3d.train.loop.run`) never asks which one it has.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from vlp3d import storage
from vlp3d.train.feed import RowSource

log = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint_"
_CHECKPOINT = re.compile(rf"^{CHECKPOINT_PREFIX}(\d+)$")


class Tracker(Protocol):
    """Where rank 0's metrics, params and texts go (MLflow's `RankZeroLogger` in the platform): calls that
    never block training, a bounded `flush`, and what is still unsent (`pending`) to save with a
    checkpoint and hand to the next rank 0 (`requeue`)."""

    def log_params(self, params: Mapping[str, object]) -> None: ...
    def log_metrics(self, metrics: Mapping[str, float], step: int) -> None: ...
    def log_text(self, text: str, artifact_file: str) -> None: ...
    def flush(self, timeout_s: float = 30.0) -> bool: ...
    def pending(self) -> list: ...
    def requeue(self, items: list) -> None: ...


class Runtime(Protocol):
    """One process of a training run. `tracker` is set on rank 0 only (None elsewhere)."""

    rank: int
    world_size: int
    device: torch.device
    tracker: Tracker | None

    def dataset(self, name: str) -> RowSource | None:
        """This rank's rows of dataset `name` ("train", "train_2d", "valid"), None when the run has none."""

    def prepare_model(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        """`module` on the device, wrapped for data parallelism when there are several ranks."""

    def gather(self, obj: object) -> list:
        """`obj` of every rank, by rank."""

    def latest_checkpoint(self) -> contextlib.AbstractContextManager[Path | None]:
        """A local folder holding the run's latest checkpoint (None for a fresh run)."""

    def report(self, metrics: Mapping[str, object], checkpoint: Path | None = None) -> None:
        """Every rank calls it at the same steps; rank 0 passes the checkpoint folder it wrote."""

    def stop(self, message: str) -> None:
        """Rank 0: the run ends early for `message` (e.g. diverged); the driver fails it with that reason."""

    def stop_requested(self) -> str:
        """The signal the driver was sent ("SIGTERM", "SIGINT"; "" when none): every rank gets the same
        answer at the same step, and the loop then writes a final checkpoint and returns."""


def gather_objects(obj: object) -> list:
    """`obj` of every rank of the initialised process group, by rank (one process: [obj])."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


class CheckpointStore:
    """Checkpoint folders of one run under `location/<run name>/` (a local folder or a pyarrow filesystem
    URI): `checkpoint_<step>` each, written whole before it is visible (a crash mid-write leaves no
    half checkpoint), the newest `keep` kept."""

    def __init__(self, location: str | Path, run_name: str, keep: int = 2):
        self.root = storage.join(location, run_name)
        self.keep = max(1, keep)

    def _existing(self) -> list[tuple[int, str | Path]]:
        found = []
        for entry, folder in storage.list_dir(self.root):
            match = _CHECKPOINT.match(storage.name(entry))
            if folder and match:
                found.append((int(match.group(1)), entry))
        return sorted(found)

    def latest(self) -> str | Path | None:
        existing = self._existing()
        return existing[-1][1] if existing else None

    @contextlib.contextmanager
    def latest_local(self) -> Iterator[Path | None]:
        latest = self.latest()
        if latest is None:
            yield None
            return
        with storage.local_folder(latest) as local:
            yield local

    def save(self, folder: Path, step: int) -> str | Path:
        name = f"{CHECKPOINT_PREFIX}{step:08d}"
        target = storage.join(self.root, name)
        if storage.is_uri(self.root):
            storage.upload(folder, str(target), last=["meta.json"])
        else:
            Path(self.root).mkdir(parents=True, exist_ok=True)
            partial = Path(self.root) / f".{name}.partial"
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(folder, partial)
            if Path(target).exists():
                shutil.rmtree(target)
            partial.rename(target)
        for _, old in self._existing()[:-self.keep]:
            self._remove(old)
        return target

    def _remove(self, entry: str | Path) -> None:
        if storage.is_uri(entry):
            fs, path = storage.filesystem(str(entry))
            fs.delete_dir(path)
        else:
            shutil.rmtree(entry, ignore_errors=True)


class LocalRuntime:
    """One process, rank 0 of 1, no Ray: datasets are `RowSource`s given by the caller (`LocalRows` over
    the shard files), checkpoints go to a `CheckpointStore`, reports to `on_report` (e.g. a Tune trial's
    `tune.report`). A rerun with the same store resumes from its latest checkpoint."""

    rank = 0
    world_size = 1

    def __init__(self, datasets: Mapping[str, RowSource], store: CheckpointStore, device: str | torch.device = "cpu",
                 tracker: Tracker | None = None, on_report=None):
        self.datasets = dict(datasets)
        self.store = store
        self.device = torch.device(device)
        self.tracker = tracker
        self.on_report = on_report
        self.stopped = ""
        self.requested = ""  # set by the driver's signal handler (`request_stop`)
        self.last_checkpoint: str | Path | None = store.latest()
        self.last_metrics: dict = {}

    def dataset(self, name: str) -> RowSource | None:
        return self.datasets.get(name)

    def prepare_model(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        return module.to(self.device)

    def gather(self, obj: object) -> list:
        return [obj]

    def latest_checkpoint(self):
        return self.store.latest_local()

    def report(self, metrics: Mapping[str, object], checkpoint: Path | None = None) -> None:
        if checkpoint is not None:
            self.last_checkpoint = self.store.save(checkpoint, int(metrics.get("step", 0)))
            self.last_metrics = dict(metrics)
        if self.on_report is not None:
            self.on_report(dict(metrics), self.last_checkpoint if checkpoint is not None else None)

    def stop(self, message: str) -> None:
        self.stopped = message

    def request_stop(self, signal_name: str) -> None:
        self.requested = self.requested or signal_name

    def stop_requested(self) -> str:
        return self.requested


@contextlib.contextmanager
def checkpoint_folder() -> Iterator[Path]:
    """A temporary folder to write one checkpoint into before handing it to `Runtime.report`."""
    with tempfile.TemporaryDirectory(prefix="vlp3d-checkpoint-") as tmp:
        yield Path(tmp)
