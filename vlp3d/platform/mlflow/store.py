"""The MLflow store: its client, experiments, runs found by tag, the code version a run records, and what
may be logged (`public_manifest`: failure reasons scrubbed by `vlp3d.redact.scrub`)."""

from __future__ import annotations

import os

import mlflow
from mlflow.tracking import MlflowClient

from vlp3d import logs
from vlp3d.config import ExperimentConfig
from vlp3d.platform.mlflow.server import check_server
from vlp3d.platform.runtime import artifact_location, run_git_state, tracking_uri
from vlp3d.redact import redact, scrub

uri = tracking_uri
RUN_NAME_TAG = "vlp3d.run_name"  # on a training run: its Ray Train run name
PRETRAINED_TAG = "vlp3d.pretrained_model"  # on a fine-tuning run and its model version: models:/NAME/VERSION
TASK_TAG = "vlp3d.task"  # on a fine-tuning run and its model version: segmentation / classification


def client(cfg_or_uri: ExperimentConfig | str) -> MlflowClient:
    """A client for the config's store, also made MLflow's current one (its fluent API logs models);
    a tracking server is checked first (`server.check_server`: TrackingServerError naming the host).
    MLflow also exports the URI as $MLFLOW_TRACKING_URI / $MLFLOW_REGISTRY_URI, where the next
    config without `tracking.tracking_uri` would find it: the user's own values are put back."""
    target = cfg_or_uri if isinstance(cfg_or_uri, str) else tracking_uri(cfg_or_uri)
    logs.redact_handlers("mlflow")  # MLflow's handler exists once mlflow is imported, maybe after logs.configure
    if redact(target) != target:
        # MLflow prints "View run ... at: <URL>" when a run ends, the URL built from the tracking
        # URI with its user:password: not on a terminal or into a Ray job's log
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
    check_server(target)  # unreachable or refusing: one line now, not minutes of retries later
    saved = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    mlflow.set_tracking_uri(target)
    mlflow.set_registry_uri(target)
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    return MlflowClient(tracking_uri=target, registry_uri=target)


def git_commit() -> str:
    """The code version a run records: $VLP3D_GIT_COMMIT (`vlp3d submit` sets it from the submitting
    checkout), else this checkout's HEAD, else "unknown"."""
    return run_git_state()[0]


def git_tags() -> dict[str, str]:
    """`vlp3d.git_commit` and `vlp3d.git_dirty` ("true": the code differed from that commit) of a run."""
    commit, dirty = run_git_state()
    return {"vlp3d.git_commit": commit, "vlp3d.git_dirty": dirty}


def experiment_id(cfg: ExperimentConfig) -> str:
    mlflow_client = client(cfg)
    name = cfg.tracking.experiment or cfg.name
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    return mlflow_client.create_experiment(name, artifact_location=artifact_location(cfg))


def find_run(cfg: ExperimentConfig, tag: str, value: str):
    """The run of the config's experiment whose `tag` equals `value` (newest first), or None."""
    found = client(cfg).search_runs([experiment_id(cfg)], filter_string=f"tags.`{tag}` = '{value}'",
                                    order_by=["attributes.start_time DESC"], max_results=1)
    return found[0] if found else None


def public_manifest(manifest: dict) -> dict:
    """The prepare manifest as logged to MLflow: counts, spec and hashes; failed rows and warnings
    by row number and reason only (the shard folder keeps the paths, in `_failed/row-*.json`)."""
    out = {k: v for k, v in manifest.items() if k not in ("corpus", "failed", "warnings")}
    out["failed"] = [{"row": r["row"], "reason": scrub(r.get("reason", ""), r.get("path"), r.get("volume_name"))}
                     for r in manifest.get("failed", [])]
    out["warnings"] = [{"row": r["row"], "warning": scrub(r.get("warning", ""))} for r in manifest.get("warnings", [])]
    return out



def log_params(mlflow_client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    """Params in batches of 100 (MLflow's limit), each value cut at 6000 characters."""
    items = list(params.items())
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in items[start:start + 100]])

