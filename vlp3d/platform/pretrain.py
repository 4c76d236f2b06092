"""`vlp3d pretrain`: the run described in MLflow (params, tags, artifacts from the driver, metrics from
rank 0), the training loop on Ray Train's DDP workers or in this process (`local`), and the final
checkpoint logged and registered as a pyfunc model."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from vlp3d import logs
from vlp3d.platform.launch import RUNTIME_TAG, Finished, base_loop_config, run_local, run_on_ray
from vlp3d.platform.mlflow import models, runs, store
from vlp3d.platform.runtime import init_ray
from vlp3d.train import checkpoint as checkpoints
from vlp3d.train.tasks.pretrain import local_datasets, preflight, shuffle_rows

log = logging.getLogger(__name__)


class NonFiniteTrainingError(FloatingPointError):
    """Training stopped: too many consecutive non-finite steps, or non-finite weights."""

    exit_code = 1


@dataclass
class PretrainResult:
    run_id: str
    run_name: str
    checkpoint_dir: Path | str  # a URI when tracking.storage is one
    shard_dir: Path | str  # a URI when data.shards is one
    model_uri: str  # registered version, models:/NAME/VERSION
    metrics: dict
    elapsed_s: float


def pretrain(cfg, run_name: str | None = None, progress=log.info, callbacks: Sequence = (),
             parent_run_id: str | None = None, register: bool = True, tags: dict[str, str] | None = None,
             local: bool = False, on_report: Callable | None = None) -> PretrainResult:
    """Train `cfg`; re-running with the same `run_name` resumes from its last checkpoint.

    `local` runs the loop in this process without Ray (`LocalRuntime`: one rank, the same losses as one
    Ray Train worker), else on `cluster.num_workers` Ray Train workers. Sweeps pass Ray Train
    `callbacks` (Tune's report callback) or, for a local trial, `on_report(metrics, checkpoint)`, the
    MLflow `parent_run_id` and extra `tags` of the trial's child run, `register=False` (the model is
    logged, not registered) and `progress=None` (no progress lines, from here or from rank 0).
    """
    logs.ensure_configured()
    started = time.time()
    shard_dir, manifest = preflight(cfg)
    store.check_server(store.uri(cfg))  # an unreachable or refusing server: one line before Ray starts
    if not local:
        init_ray(cfg)
    run_name = run_name or f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"
    extra_tags = dict(tags or {})
    if parent_run_id:
        extra_tags["mlflow.parentRunId"] = parent_run_id
    run_id = runs.start_or_resume_run(cfg, run_name, manifest, shard_dir, extra_tags)
    uri = store.uri(cfg)
    store.client(uri).set_tag(run_id, RUNTIME_TAG, "local" if local else "ray_train")
    text_dim = int(manifest["text_dim"])
    meta = {"spec": manifest["spec"], "spec_hash": manifest["spec_hash"], "label_names": manifest["label_names"],
            "text_dim": text_dim, "mlflow_run_id": run_id}
    loop_config = {**base_loop_config(cfg, "pretrain", run_id, uri, meta, progress is not None),
                   "shuffle_rows": shuffle_rows(shard_dir, manifest)}
    if progress is not None:
        where = "this process (local runtime)" if local else f"{cfg.cluster.num_workers} workers"
        progress(f"training {cfg.train.max_steps} steps on {where} (global batch {cfg.train.global_batch}); "
                 f"run {run_name}")
    try:
        if local:
            finished = run_local(cfg, run_name, loop_config, local_datasets(cfg, shard_dir, manifest), on_report)
        else:
            from vlp3d.platform.ray_data import pretraining_datasets

            finished = run_on_ray(cfg, run_name, loop_config, pretraining_datasets(cfg, shard_dir, manifest),
                                  callbacks)
    except BaseException as err:  # a failed (or interrupted) run is never left RUNNING in MLflow
        status = "KILLED" if isinstance(err, KeyboardInterrupt) else "FAILED"
        runs.end_run_quietly(uri, run_id, status, f"{type(err).__name__}: {err}")
        raise
    model_uri = finish(cfg, run_id, run_name, finished, register)
    return PretrainResult(run_id, run_name, finished.checkpoint, shard_dir, model_uri, finished.metrics,
                          time.time() - started)


def finish(cfg, run_id: str, run_name: str, finished: Finished, register: bool) -> str:
    """Deliver what rank 0 could not send, fail a run that stopped early or left no (finite) checkpoint,
    else log (and register) its model: returns the model URI."""
    uri = store.uri(cfg)
    with finished.local_checkpoint() as local:
        if local is not None:  # what rank 0 could not deliver to MLflow before it finished
            runs.deliver(uri, run_id, checkpoints.restore_unsent(local))
        if finished.stopped:
            runs.end_run_quietly(uri, run_id, "FAILED", finished.stopped)
            raise NonFiniteTrainingError(f"run {run_name}: {finished.stopped}")
        if local is None:
            runs.end_run_quietly(uri, run_id, "FAILED", f"finished without a checkpoint ({finished.error})")
            raise RuntimeError(f"training run {run_name} finished without a checkpoint (error: {finished.error})")
        bad = checkpoints.nonfinite_parameters_in(local)
        if bad:  # never registered (the loop refuses to write these; this guards older checkpoints)
            runs.end_run_quietly(uri, run_id, "FAILED", f"non-finite weights in {', '.join(bad[:5])}")
            raise NonFiniteTrainingError(f"run {run_name}: checkpoint {finished.checkpoint} holds non-finite weights "
                                         f"({', '.join(bad[:5])}); not registered.")
        return models.finish_training(run_id, cfg, Path(local), finished.metrics, register=register)
