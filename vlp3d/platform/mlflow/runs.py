"""Runs: a training run (created or resumed by its Ray Train run name) and a sweep's parent run, what
they log (config, manifest, pretraining patients, files, summary metrics, evaluations), and their end."""

from __future__ import annotations

import json
import logging
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

import vlp3d
from vlp3d.config import ExperimentConfig, logged_params, public_config, to_toml
from vlp3d.platform.mlflow.card import update_model_card
from vlp3d.platform.mlflow.logger import RankZeroLogger
from vlp3d.platform.mlflow.registry import registered_versions
from vlp3d.platform.mlflow.store import (
    RUN_NAME_TAG,
    client,
    experiment_id,
    find_run,
    git_tags,
    log_params,
    public_manifest,
)
from vlp3d.redact import redact, scrub

log = logging.getLogger(__name__)


def start_or_resume_run(cfg: ExperimentConfig, run_name: str, manifest: dict, shard_dir: Path,
                        extra_tags: dict[str, str] | None = None) -> str:
    """The MLflow run of a Ray Train run name: reused when resuming, else created and described
    (`extra_tags`, e.g. a sweep trial's `mlflow.parentRunId`, join the standard tags)."""
    mlflow_client = client(cfg)
    exp_id = experiment_id(cfg)
    existing = find_run(cfg, RUN_NAME_TAG, run_name)
    if existing is not None:
        run_id = existing.info.run_id
        mlflow_client.update_run(run_id, status="RUNNING")
        if "vlp3d.failure" in existing.data.tags:  # resumed after a crash: the reason stays in the history
            mlflow_client.set_tag(run_id, "vlp3d.failed_before", existing.data.tags["vlp3d.failure"])
            mlflow_client.delete_tag(run_id, "vlp3d.failure")
        return run_id
    tags = {
        RUN_NAME_TAG: run_name,
        "vlp3d.method": cfg.objective.name,
        **git_tags(),
        "vlp3d.data_hash": manifest["source_manifest_hash"],
        "vlp3d.preprocess_hash": manifest["spec_hash"],
        "vlp3d.version": vlp3d.__version__,
        "mlflow.runName": run_name,
        **(extra_tags or {}),
    }
    run = mlflow_client.create_run(exp_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    log_params(mlflow_client, run_id, logged_params(cfg))
    mlflow_client.log_text(run_id, to_toml(public_config(cfg)), "config.toml")
    mlflow_client.log_text(run_id, json.dumps(public_manifest(manifest), indent=2), "data/_manifest.json")
    log_pretraining_patients(mlflow_client, run_id, shard_dir, cfg.data.train_split)
    return run_id


PRETRAINING_PATIENTS = "data/pretraining_patients.json"


def log_pretraining_patients(mlflow_client: MlflowClient, run_id: str, shard_dir: Path, split: str) -> None:
    """Keyed fingerprints (never the ids, never the key) of the patients of the pretraining split, with
    the key's id: what the leakage check compares an evaluated split with, whatever shards it is read
    from later (under the same key)."""
    from vlp3d.data.patients import patient_key, split_patients

    key = patient_key(shard_dir)
    patients = split_patients(shard_dir).get(split, set())
    record = {"split": split, "key_id": key.key_id, "fingerprints": sorted(key.fingerprint(p) for p in patients)}
    mlflow_client.log_text(run_id, json.dumps(record), PRETRAINING_PATIENTS)


def pretraining_patients(uri_: str, run_id: str) -> dict | None:
    """The record `log_pretraining_patients` wrote for a run ({split, key_id, fingerprints}; without
    key_id: unkeyed fingerprints of an older vlp3d), or None for a run logged before it existed."""
    try:
        return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{PRETRAINING_PATIENTS}"))
    except Exception:  # noqa: BLE001 - missing artifact: MlflowException or OSError by store
        return None

def deliver(uri_: str, run_id: str, items: list, timeout_s: float = 300.0) -> None:
    """Send tracking calls a worker could not deliver (kept in its checkpoint); if MLflow is still
    unreachable after `timeout_s`, say so (the checkpoint keeps them)."""
    if not items:
        return
    logger = RankZeroLogger(uri_, run_id)
    logger.requeue(items)
    if not logger.flush(timeout_s):
        log.warning(f"MLflow at {redact(uri_)} still unreachable: {len(items)} tracking calls of run "
                    f"{run_id} were not delivered (they stay in the run's last checkpoint, train_state.pt)")


def end_run_quietly(uri_: str, run_id: str, status: str, reason: str) -> None:
    """Mark a run FAILED/KILLED with its reason (tag `vlp3d.failure`, paths and secrets removed);
    a tracking outage here is reported, never raised over the training error."""
    try:
        end_run(uri_, run_id, status, {"vlp3d.failure": scrub(reason)[:5000]})
    except Exception as err:  # noqa: BLE001 - the original error matters more
        log.warning(redact(f"could not mark MLflow run {run_id} {status}: {type(err).__name__}: {err}"))

def log_evaluation(run_id: str, uri_: str, metrics: dict[str, float], tables: dict[str, pd.DataFrame],
                   figures: dict | None = None, tags: dict[str, str] | None = None) -> None:
    """Metrics, CSV tables (`eval/<name>.csv`), figures (`eval/<name>.png`) and tags of an evaluation,
    into the model's run; then the model card of every registered version of that run is rewritten."""
    mlflow_client = client(uri_)
    mlflow_client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in metrics.items()],
                            tags=[mlflow.entities.RunTag(k, str(v)) for k, v in (tags or {}).items()])
    with tempfile.TemporaryDirectory() as tmp:
        for name, table in tables.items():
            path = Path(tmp) / f"{name}.csv"
            table.to_csv(path, index=False)
            mlflow_client.log_artifact(run_id, str(path), "eval")
        for name, figure in (figures or {}).items():
            mlflow_client.log_figure(run_id, figure, f"eval/{name}.png")
    for version in registered_versions(uri_, run_id):
        update_model_card(uri_, version.name, version.version)


# --- sweeps: one parent run per sweep, one child run per trial (tagged mlflow.parentRunId) --------

SWEEP_PARENT_TAG = "vlp3d.sweep_parent"  # on the parent run: the sweep name
SWEEP_TAG = "vlp3d.sweep"  # on each trial's child run: the sweep name
TRIAL_TAG = "vlp3d.trial_id"
TRIAL_STATUS_TAG = "vlp3d.trial_status"  # finished / stopped (early, by the scheduler) / error


def start_or_resume_sweep_run(cfg: ExperimentConfig, name: str, search_space: dict) -> str:
    """The parent run of sweep `name`: reused when the sweep resumes, else created with the
    flattened config as params (the search space included) and the space as an artifact."""
    mlflow_client = client(cfg)
    existing = find_run(cfg, SWEEP_PARENT_TAG, name)
    if existing is not None:
        mlflow_client.update_run(existing.info.run_id, status="RUNNING")
        return existing.info.run_id
    tags = {SWEEP_PARENT_TAG: name, "mlflow.runName": name, "vlp3d.method": cfg.objective.name,
            **git_tags(), "vlp3d.version": vlp3d.__version__}
    run_id = mlflow_client.create_run(experiment_id(cfg), run_name=name, tags=tags).info.run_id
    log_params(mlflow_client, run_id, logged_params(cfg))
    mlflow_client.log_text(run_id, to_toml(public_config(cfg)), "config.toml")
    mlflow_client.log_text(run_id, json.dumps(search_space, indent=2), "search_space.json")
    return run_id


def log_files(uri_: str, run_id: str, files: list[Path], artifact_path: str | None = None) -> None:
    mlflow_client = client(uri_)
    for path in files:
        mlflow_client.log_artifact(run_id, str(path), artifact_path)


def log_summary_metrics(uri_: str, run_id: str, metrics: dict[str, float]) -> None:
    client(uri_).log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in metrics.items()])


def end_run(uri_: str, run_id: str, status: str, tags: dict[str, str] | None = None) -> None:
    """Set a run's final status (FINISHED, KILLED, FAILED) and tags."""
    mlflow_client = client(uri_)
    for key, value in (tags or {}).items():
        mlflow_client.set_tag(run_id, key, value)
    mlflow_client.set_terminated(run_id, status)
