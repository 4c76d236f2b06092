"""Where a training run's loop runs: in this process (`LocalRuntime`: `--local`, one-worker sweep trials)
or on Ray Train workers (`RayTrainRuntime`). The same task, loop and seed either way, so the same
losses; the drivers (`vlp3d.platform.pretrain`, `vlp3d.platform.finetune`) pick one and read back
what the run left: its last checkpoint, the metrics reported with it, and why it stopped early."""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import re
import signal
import threading
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
    interrupted: str = ""  # the signal that stopped it ("SIGTERM", "SIGINT") after a final checkpoint

    @contextlib.contextmanager
    def local_checkpoint(self) -> Iterator[Path | None]:
        """The checkpoint as a local folder (a URI's is a temporary download)."""
        if self.checkpoint is None:
            yield None
            return
        with storage.local_folder(self.checkpoint) as folder:
            yield folder


class TrainingInterrupted(KeyboardInterrupt):
    """The run was stopped by SIGTERM (`ray job stop`, a scheduler) or SIGINT (Ctrl-C): marked KILLED in
    MLflow (with its final checkpoint when the loop was running); exit code 128 + the signal's number,
    as a shell reports it. A KeyboardInterrupt, so that no `except Exception` on the way swallows it."""

    def __init__(self, message: str, signal_name: str):
        super().__init__(message)
        self.exit_code = 128 + int(getattr(signal, signal_name, signal.SIGTERM))


STOP_SIGNALS = ("SIGTERM", "SIGINT")


def interruptible(driver):
    """A training driver (pretrain, finetune) during which SIGTERM raises `TrainingInterrupted`, as Ctrl-C
    raises KeyboardInterrupt (Python's default for SIGTERM ends the process on the spot, leaving its
    MLflow run RUNNING); while the loop runs, `stop_on_signals` takes over. Main thread only."""
    @functools.wraps(driver)
    def wrapped(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():
            return driver(*args, **kwargs)

        def handle(signum, frame) -> None:
            raise TrainingInterrupted("stopped by SIGTERM", "SIGTERM")

        previous = signal.signal(signal.SIGTERM, handle)
        try:
            return driver(*args, **kwargs)
        finally:
            signal.signal(signal.SIGTERM, previous)

    return wrapped


@contextlib.contextmanager
def stop_on_signals(on_signal: Callable[[str], None]) -> Iterator[None]:
    """While training runs in this process's main thread: the first SIGTERM or SIGINT calls
    `on_signal(name)` (the loop then writes a final checkpoint at the end of its step and returns); a
    second one raises KeyboardInterrupt at once. Elsewhere (a Tune trial's thread) nothing is installed."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[str] = []

    def handle(signum, frame) -> None:
        name = signal.Signals(signum).name
        if received:
            raise TrainingInterrupted(f"{name} again: stopped at once, without a final checkpoint", name)
        received.append(name)
        log.warning(f"{name} received: stopping after this step with a final checkpoint ({name} again: at once)")
        on_signal(name)

    previous = {name: signal.signal(getattr(signal, name), handle) for name in STOP_SIGNALS}
    try:
        yield
    finally:
        for name, handler in previous.items():
            signal.signal(getattr(signal, name), handler)


def end_interrupted(uri: str, run_id: str, run_name: str, finished: Finished) -> None:
    """A run its signal stopped: KILLED in MLflow (again: the signal handler marked it already) and
    `TrainingInterrupted`, naming its final checkpoint."""
    from vlp3d.platform.mlflow import runs

    message = (f"run {run_name} stopped by {finished.interrupted}; final checkpoint {finished.checkpoint}: run the "
               "same command with the same run name to resume it")
    runs.end_run_quietly(uri, run_id, "KILLED", f"stopped by {finished.interrupted}")
    raise TrainingInterrupted(message, finished.interrupted)


def killed_on_signal(uri: str, run_id: str, request: Callable[[str], None]) -> Callable[[str], None]:
    """The driver's reaction to a signal: the MLflow run is marked KILLED at once (`ray job stop` SIGKILLs
    the driver RAY_JOB_STOP_WAIT_TIME_S after its SIGTERM, 3 s by default: the run must not stay
    RUNNING), then `request` asks the loop for its final checkpoint."""
    from vlp3d.platform.mlflow import runs

    def on_signal(name: str) -> None:
        request(name)
        runs.end_run_quietly(uri, run_id, "KILLED", f"stopped by {name}")

    return on_signal


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
    on_signal = killed_on_signal(loop_config["tracking_uri"], loop_config["run_id"], runtime.request_stop)
    with stop_on_signals(on_signal):
        result = run(make_task(loop_config, cfg), runtime, cfg, loop_options(loop_config))
    return Finished(runtime.last_checkpoint, runtime.last_metrics, runtime.stopped, interrupted=result.interrupted)


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
    on_signal = killed_on_signal(loop_config["tracking_uri"], loop_config["run_id"],
                                 lambda name: notes.request_stop.remote(name))
    try:
        with stop_on_signals(on_signal):
            result = torch_trainer(cfg, run_name, datasets, {**loop_config, "notes": notes}, callbacks).fit()
        stopped, interrupted = ray.get(notes.get.remote()), ray.get(notes.requested.remote())
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
    return Finished(location, dict(result.metrics or {}), stopped, str(result.error or ""), interrupted)
