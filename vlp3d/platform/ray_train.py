"""The training loop on Ray Train: `RayTrainRuntime` (a worker's rank, device, dataset shards, checkpoints
and reports through Ray Train V2), the worker entry point and the TorchTrainer that starts the workers.
Everything here is Ray; what is trained and how lives in `vlp3d.train`."""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from vlp3d import logs
from vlp3d.config import ExperimentConfig, from_dict
from vlp3d.platform.runtime import run_storage
from vlp3d.train.loop import LoopOptions, run
from vlp3d.train.runtime import Tracker, gather_objects
from vlp3d.train.tasks import make_task

log = logging.getLogger(__name__)


class RayRows:
    """A worker's shard of a Ray Data dataset as a `RowSource`: its blocks, in Ray's fixed order."""

    def __init__(self, shard):
        self.shard = shard

    def blocks(self) -> Iterator[dict]:
        yield from self.shard.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=1)


class RayTrainRuntime:
    """The Runtime of one Ray Train worker. `datasets` names the datasets the trainer was given; `notes`
    is the run's `RunNotes` actor (why the run stopped early: Ray Train's result only keeps reports)."""

    def __init__(self, datasets: Sequence[str], tracker: Tracker | None, notes):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.rank, self.world_size = context.get_world_rank(), context.get_world_size()
        self.device = ray.train.torch.get_device()
        self.datasets, self.tracker, self.notes = set(datasets), tracker, notes

    def dataset(self, name: str) -> RayRows | None:
        import ray.train

        return RayRows(ray.train.get_dataset_shard(name)) if name in self.datasets else None

    def prepare_model(self, module: nn.Module, find_unused_parameters: bool = False) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(module, parallel_strategy_kwargs={
            "find_unused_parameters": find_unused_parameters})

    def gather(self, obj: object) -> list:
        return gather_objects(obj)

    @contextlib.contextmanager
    def latest_checkpoint(self) -> Iterator[Path | None]:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as folder:
            yield Path(folder)

    def report(self, metrics: Mapping[str, object], checkpoint: Path | None = None) -> None:
        import ray.train

        ray.train.report(dict(metrics), checkpoint=ray.train.Checkpoint.from_directory(checkpoint)
                         if checkpoint is not None else None)

    def stop(self, message: str) -> None:
        import ray

        ray.get(self.notes.stop.remote(message))

    def stop_requested(self) -> str:
        """The driver's signal, read from the notes actor by every rank and agreed on with one all-reduce
        (ranks may read the actor either side of the request): one small actor call per step."""
        import ray
        import torch.distributed as dist

        requested = ray.get(self.notes.requested.remote())
        if not (dist.is_available() and dist.is_initialized()):
            return requested
        flag = torch.tensor([float(bool(requested))], device=self.device if dist.get_backend() == "nccl" else "cpu")
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return (requested or ray.get(self.notes.requested.remote()) or "SIGTERM") if flag.item() else ""


def run_notes():
    """A small actor the workers tell why they stopped early, and the driver tells that it was signalled."""
    import ray

    @ray.remote(num_cpus=0)
    class RunNotes:
        def __init__(self):
            self.stopped = ""
            self.signal = ""

        def stop(self, message: str) -> None:
            self.stopped = message

        def get(self) -> str:
            return self.stopped

        def request_stop(self, signal_name: str) -> None:
            self.signal = self.signal or signal_name

        def requested(self) -> str:
            return self.signal

    return RunNotes.remote()


def _quiet_train_reports() -> None:
    """Ray Train 2.60 logs every report of every worker at INFO through a logger named after its
    module's file, which `RunConfig.logging_config` does not reach; keep those lines out of the log."""
    from ray.train.v2._internal.execution import context as train_context

    logging.getLogger(train_context.__file__).setLevel(logging.WARNING)


def train_loop_per_worker(loop_config: dict) -> None:
    """Runs on every Ray Train worker: the training loop on this worker's runtime."""
    from vlp3d.platform.mlflow.logger import RankZeroLogger

    logs.configure(loop_config.get("log_level"))
    if not logs.is_debug():
        _quiet_train_reports()
    cfg = from_dict(loop_config["experiment"])
    if not cfg.cluster.use_gpu:
        torch.set_num_threads(max(1, math.floor(cfg.cluster.cpus_per_worker)))
    import ray.train

    rank = ray.train.get_context().get_world_rank()
    tracker = RankZeroLogger(loop_config["tracking_uri"], loop_config["run_id"]) if rank == 0 else None
    runtime = RayTrainRuntime(loop_config["datasets"], tracker, loop_config["notes"])
    options = LoopOptions(print_progress=loop_config.get("print_progress", True),
                          faults=loop_config.get("inject_fault", ""), run_id=loop_config["run_id"])
    run(make_task(loop_config, cfg), runtime, cfg, options)


def torch_trainer(cfg: ExperimentConfig, run_name: str, datasets: dict, loop_config: dict, callbacks: Sequence = ()):
    """The TorchTrainer of a pretraining or fine-tuning run: `cluster.num_workers` DDP workers of
    `cluster.cpus_per_worker` CPUs, run state and checkpoints on `tracking.storage`, `train.max_failures`
    restores, `train.keep_checkpoints` kept, and Ray Data in a fixed order (no locality reordering: the
    same blocks reach the same worker in every run and after every restart, which exact resume and
    reproducible runs rely on)."""
    import ray.train
    from ray.data import ExecutionOptions
    from ray.train.torch import TorchTrainer

    storage_path, storage_filesystem = run_storage(cfg)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={**loop_config, "datasets": sorted(datasets)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.cluster.num_workers, use_gpu=cfg.cluster.use_gpu,
            resources_per_worker={"CPU": cfg.cluster.cpus_per_worker},
        ),
        run_config=ray.train.RunConfig(
            name=run_name,
            storage_path=storage_path,
            storage_filesystem=storage_filesystem,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=cfg.train.keep_checkpoints),
            callbacks=list(callbacks),
            # Train's INFO lines (one per report and worker) would bury vlp3d's progress lines
            logging_config=ray.train.LoggingConfig(log_level="INFO" if logs.is_debug() else "WARNING"),
        ),
        datasets=datasets,
        dataset_config=ray.train.DataConfig(execution_options=ExecutionOptions(preserve_order=True)),
    )
