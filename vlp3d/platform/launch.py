"""Where a training run's loop runs: in this process (`LocalRuntime`: `--local`, one-worker sweep trials)
or on Ray Train workers (`RayTrainRuntime`). The same task, loop and seed either way, so the same
losses; the drivers (`vlp3d.platform.pretrain`, `vlp3d.platform.finetune`) pick one and read back
what the run left: its last checkpoint, the metrics reported with it, and why it stopped early."""

from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from vlp3d import storage
from vlp3d.config import ExperimentConfig
from vlp3d.errors import InputError
from vlp3d.platform.mlflow.server import TrackingServerError
from vlp3d.platform.runtime import checkpoint_location, storage_location
from vlp3d.train.loop import FAULT_ENV, LoopOptions, run
from vlp3d.train.runtime import CheckpointStore, LocalRuntime

log = logging.getLogger(__name__)

RUNTIME_TAG = "vlp3d.runtime"  # on the MLflow run: "local" or "ray_train"


@dataclass
class Finished:
    """What a run left: `checkpoint` (a local folder or a URI under tracking.storage, None without one),
    the metrics reported with it, `stopped` (why the loop ended early, "" when it reached its last step)
    and Ray Train's error, if any."""

    checkpoint: Path | str | None
    metrics: dict = field(default_factory=dict)
    stopped: str = ""
    error: str = ""

    @contextlib.contextmanager
    def local_checkpoint(self) -> Iterator[Path | None]:
        """The checkpoint as a local folder (a URI's is a temporary download)."""
        if self.checkpoint is None:
            yield None
            return
        with storage.local_folder(self.checkpoint) as folder:
            yield folder


def local_device(cfg: ExperimentConfig) -> torch.device:
    """The device of a one-process run: a GPU when `cluster.use_gpu` and one is visible."""
    return torch.device("cuda" if cfg.cluster.use_gpu and torch.cuda.is_available() else "cpu")


def loop_options(loop_config: dict) -> LoopOptions:
    return LoopOptions(print_progress=loop_config.get("print_progress", True),
                       faults=loop_config.get("inject_fault", ""), run_id=loop_config["run_id"])


def base_loop_config(cfg: ExperimentConfig, task: str, run_id: str, tracking_uri: str, meta: dict,
                     progress: bool) -> dict:
    """What every worker (or the local process) needs to build the task and its tracker."""
    from vlp3d import logs
    from vlp3d.config import to_dict

    return {"task": task, "experiment": to_dict(cfg), "tracking_uri": tracking_uri, "run_id": run_id, "meta": meta,
            "print_progress": progress, "log_level": logs.level_name(), "inject_fault": os.environ.get(FAULT_ENV, "")}


def run_local(cfg: ExperimentConfig, run_name: str, loop_config: dict, datasets: dict,
              on_report: Callable[[dict, str | Path | None], None] | None = None) -> Finished:
    """The loop in this process; checkpoints under `tracking.storage` (default <workdir>/ray_results)/<run
    name>/, where a rerun with the same name resumes."""
    from vlp3d.platform.mlflow.logger import RankZeroLogger
    from vlp3d.train.tasks import make_task

    tracker = RankZeroLogger(loop_config["tracking_uri"], loop_config["run_id"])
    store = CheckpointStore(storage_location(cfg), run_name, keep=cfg.train.keep_checkpoints)
    runtime = LocalRuntime(datasets, store, local_device(cfg), tracker, on_report)
    run(make_task(loop_config, cfg), runtime, cfg, loop_options(loop_config))
    return Finished(runtime.last_checkpoint, runtime.last_metrics, runtime.stopped)


def tracking_refusal(err: BaseException) -> TrackingServerError | None:
    """The tracking server's refusal of rank 0's credentials inside Ray Train's error (whatever Ray
    wrapped it in), as the one-line error the logger raised; None for any other error."""
    text = " ".join([str(err), *(str(e) for e in getattr(err, "worker_failures", {}).values())])
    found = re.search(r"MLflow tracking server \S+ refused this client \(HTTP 40[13].*?\(values are never shown\)\.",
                      text)
    return TrackingServerError(found.group(0)) if found else None


def worker_input_error(err: BaseException) -> InputError | None:
    """The InputError (bad input: a config key, too few rows for the batch, ...) a Ray Train worker
    raised, out of the error `fit()` raises for it (WorkerGroupError.worker_failures, whose entries
    may wrap it as their `cause`); None for any other failure."""
    for failure in (getattr(err, "worker_failures", None) or {}).values():
        seen = failure
        while seen is not None:
            if isinstance(seen, InputError):
                return InputError(str(seen))
            seen = getattr(seen, "cause", None) or seen.__cause__
    return None


def run_on_ray(cfg: ExperimentConfig, run_name: str, loop_config: dict, datasets: dict,
               callbacks: Sequence = ()) -> Finished:
    """The loop on `cluster.num_workers` Ray Train workers (restarted from the last checkpoint up to
    `train.max_failures` times)."""
    import ray

    from vlp3d.platform.ray_train import run_notes, torch_trainer

    notes = run_notes()
    try:
        result = torch_trainer(cfg, run_name, datasets, {**loop_config, "notes": notes}, callbacks).fit()
        stopped = ray.get(notes.get.remote())
    except Exception as err:
        refused = tracking_refusal(err)
        if refused is not None:  # one line, as in a local run, not Ray's traceback of every attempt
            raise refused from None
        bad_input = worker_input_error(err)
        if bad_input is not None:
            raise bad_input from None  # bad input found on a worker: exit 2 with its line, not a bug
        raise
    finally:
        ray.kill(notes)
    location = checkpoint_location(cfg, result.checkpoint.path) if result.checkpoint is not None else None
    return Finished(location, dict(result.metrics or {}), stopped, str(result.error or ""))
