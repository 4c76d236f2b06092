"""MLflow: experiments, runs (params, tags, artifacts), rank-0 metrics, pyfunc model and registry."""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
from mlflow.tracking import MlflowClient

import vlp3d
from vlp3d.config import ExperimentConfig, logged_params, public_config, redact_userinfo, to_toml
from vlp3d.platform.runtime import artifact_location, run_git_state, tracking_uri

log = logging.getLogger(__name__)

uri = tracking_uri
RUN_NAME_TAG = "vlp3d.run_name"


def client(cfg_or_uri: ExperimentConfig | str) -> MlflowClient:
    """A client for the config's store, also made MLflow's current one (its fluent API logs models).
    MLflow also exports the URI as $MLFLOW_TRACKING_URI / $MLFLOW_REGISTRY_URI, where the next
    config without `tracking.tracking_uri` would find it: the user's own values are put back."""
    target = cfg_or_uri if isinstance(cfg_or_uri, str) else tracking_uri(cfg_or_uri)
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


_PATH = re.compile(r"(?<![\w:/.\\])(?:[A-Za-z]:)?[/\\][^\s'\",;()\[\]]+")  # an absolute path, not a URL


def scrub(text: str, *known: object) -> str:
    """`text` without file paths (the `known` ones, e.g. a row's path and volume name, and anything
    absolute) and without URI user-info: what a failure reason may say in MLflow."""
    text = redact_userinfo(str(text))
    for value in known:
        if value not in (None, "", "None"):
            text = text.replace(str(value), "<file>")
    return _PATH.sub("<path>", text)


def public_manifest(manifest: dict) -> dict:
    """The prepare manifest as logged to MLflow: counts, spec and hashes; failed rows and warnings
    by row number and reason only (the shard folder keeps the paths, in `_failed/row-*.json`)."""
    out = {k: v for k, v in manifest.items() if k not in ("corpus", "failed", "warnings")}
    out["failed"] = [{"row": r["row"], "reason": scrub(r.get("reason", ""), r.get("path"), r.get("volume_name"))}
                     for r in manifest.get("failed", [])]
    out["warnings"] = [{"row": r["row"], "warning": scrub(r.get("warning", ""))} for r in manifest.get("warnings", [])]
    return out


def _log_params(mlflow_client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    items = list(params.items())
    for start in range(0, len(items), 100):
        mlflow_client.log_batch(run_id, params=[mlflow.entities.Param(k, v[:6000]) for k, v in items[start:start + 100]])


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
    _log_params(mlflow_client, run_id, logged_params(cfg))
    mlflow_client.log_text(run_id, to_toml(public_config(cfg)), "config.toml")
    mlflow_client.log_text(run_id, json.dumps(public_manifest(manifest), indent=2), "data/_manifest.json")
    return run_id


# error codes of a server that answered and refused (a retry cannot succeed)
_REJECTED = {"INVALID_PARAMETER_VALUE", "BAD_REQUEST", "RESOURCE_ALREADY_EXISTS", "RESOURCE_DOES_NOT_EXIST",
             "INVALID_STATE", "PERMISSION_DENIED", "UNAUTHENTICATED"}


class RankZeroLogger:
    """Metrics, params and texts from the rank-0 training worker into an existing run, sent by a
    background thread so that training never waits on MLflow. While the server is unreachable
    everything is kept in order and retried with backoff (one warning when it goes away, one
    line when it is back); `flush` waits a bounded time, and what is still unsent can be saved
    with a checkpoint (`pending`) and re-queued by the next rank 0 (`requeue`)."""

    def __init__(self, tracking_uri_: str, run_id: str, request_timeout_s: int = 10, warn=print):
        import queue
        import threading

        # bounded single requests: the thread retries itself (MLflow's defaults wait minutes)
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(request_timeout_s))
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        self.client = MlflowClient(tracking_uri=tracking_uri_)
        self.run_id = run_id
        self._where = redact_userinfo(tracking_uri_)
        self._warn = warn
        self._queue: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self._sending: list[tuple] = []  # the batch in flight (kept until it is acknowledged)
        self._unsent = 0
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, name="mlflow-logger", daemon=True)
        self._thread.start()

    # --- what the training loop calls (never blocks on the network) ---------------------------
    def log_params(self, params: dict[str, object]) -> None:
        self._put(("params", {k: str(v) for k, v in params.items()}))

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        import time

        self._put(("metrics", {"values": {k: float(v) for k, v in metrics.items()}, "step": int(step),
                               "timestamp": int(time.time() * 1000)}))

    def log_text(self, text: str, artifact_file: str) -> None:
        self._put(("text", {"text": text, "artifact_file": artifact_file}))

    def flush(self, timeout_s: float = 30.0) -> bool:
        """Wait until everything queued was sent (True) or `timeout_s` passed (False)."""
        return self._idle.wait(timeout_s)

    def pending(self) -> list[tuple]:
        """Everything not yet acknowledged by the server, oldest first (a copy)."""
        with self._lock:
            return list(self._sending) + list(self._queue.queue)

    def requeue(self, items: list) -> None:
        for kind, payload in items:
            self._put((kind, payload))

    # --- the sender thread ----------------------------------------------------------------------
    def _put(self, item: tuple) -> None:
        with self._lock:
            self._idle.clear()
            self._queue.put(item)

    def _run(self) -> None:
        import time

        failing_since, delay = None, 1.0
        while True:
            with self._lock:
                if not self._sending:
                    self._sending = self._take()
                batch = list(self._sending)
                if not batch:
                    self._idle.set()
            if not batch:
                time.sleep(0.05)
                continue
            error = self._attempt(batch)
            if error is not None:  # unreachable, timed out, 5xx: keep the batch, retry with backoff
                if failing_since is None:
                    failing_since = time.time()
                    self._warn(f"MLflow at {self._where} is not answering ({error}); metrics are kept and "
                               "sent when it is back, training goes on", flush=True)
                time.sleep(delay)
                delay = min(30.0, delay * 2)
                continue
            with self._lock:
                self._sending = []
            if failing_since is not None:
                self._warn(f"MLflow at {self._where} is back after {time.time() - failing_since:.0f} s; "
                           "buffered metrics sent", flush=True)
                failing_since, delay = None, 1.0

    def _attempt(self, batch: list[tuple]) -> str | None:
        """Send `batch`: None when done (or refused by the server: a retry cannot succeed, so it
        is dropped with a warning), else the error's name."""
        try:
            self._send(batch)
        except mlflow.exceptions.MlflowException as err:
            if err.error_code not in _REJECTED:
                return type(err).__name__
            self._warn(f"MLflow refused {len(batch)} logging calls: {err.message}", flush=True)
        except Exception as err:  # noqa: BLE001 - connection refused, timeouts, ...
            return type(err).__name__
        return None

    def _take(self) -> list[tuple]:
        """Queued items, oldest first, at most 500 metrics per request."""
        items, metrics = [], 0
        while not self._queue.empty() and metrics < 500:
            item = self._queue.get_nowait()
            items.append(item)
            metrics += len(item[1]["values"]) if item[0] == "metrics" else 0
        return items

    def _send(self, items: list[tuple]) -> None:
        metrics, params = [], []
        for kind, payload in items:
            if kind == "metrics":
                metrics += [mlflow.entities.Metric(k, v, payload["timestamp"], payload["step"])
                            for k, v in payload["values"].items()]
            elif kind == "params":
                params += [mlflow.entities.Param(k, v) for k, v in payload.items()]
        if metrics or params:
            self.client.log_batch(self.run_id, metrics=metrics, params=params)
        for kind, payload in items:
            if kind == "text":
                self.client.log_text(self.run_id, payload["text"], payload["artifact_file"])


def deliver(uri_: str, run_id: str, items: list, timeout_s: float = 300.0) -> None:
    """Send tracking calls a worker could not deliver (kept in its checkpoint); if MLflow is still
    unreachable after `timeout_s`, say so (the checkpoint keeps them)."""
    if not items:
        return
    logger = RankZeroLogger(uri_, run_id)
    logger.requeue(items)
    if not logger.flush(timeout_s):
        log.warning(f"MLflow at {redact_userinfo(uri_)} still unreachable: {len(items)} tracking calls of run "
                    f"{run_id} were not delivered (they stay in the run's last checkpoint, train_state.pt)")


def end_run_quietly(uri_: str, run_id: str, status: str, reason: str) -> None:
    """Mark a run FAILED/KILLED with its reason (tag `vlp3d.failure`, paths and secrets removed);
    a tracking outage here is reported, never raised over the training error."""
    try:
        end_run(uri_, run_id, status, {"vlp3d.failure": scrub(reason)[:5000]})
    except Exception as err:  # noqa: BLE001 - the original error matters more
        log.warning(f"could not mark MLflow run {run_id} {status}: {type(err).__name__}: {err}")


def load_embedder(model_uri: str, model_config: dict | None = None):
    """The pyfunc at `model_uri` (and its Embedder); an unknown name/alias/run is a ValueError saying where it
    looked. `model_config` replaces the logged one's keys (`allowed_root`, `device`: vlp3d.platform.pyfunc)."""
    try:
        model = mlflow.pyfunc.load_model(model_uri, model_config=model_config)
    except mlflow.exceptions.MlflowException as err:
        raise ValueError(
            f"cannot load --model {model_uri} from the MLflow store {mlflow.get_tracking_uri()}: {err.message} "
            "(set --workdir/--tracking-uri or MLFLOW_TRACKING_URI to the store the model was registered in)"
        ) from None
    return model, model.unwrap_python_model().embedder


def registered_name(cfg: ExperimentConfig) -> str:
    return cfg.tracking.registered_model or f"vlp3d-{cfg.objective.name}"


def model_metadata(cfg: ExperimentConfig, checkpoint_dir: Path, metrics: dict) -> dict:
    """What a user of the logged model needs besides the embeddings (`mlflow.models.get_model_info(
    uri).metadata`): the method and encoder, the logit scale the zero-shot softmax uses, the label
    names of the pretraining shards, and the prompt ensemble evaluation used (templates with `{name}`,
    `{Name}`, `{a}`; vlp3d.evaluation.prompts)."""
    from vlp3d.checkpoint import read_meta
    from vlp3d.evaluation.prompts import load_prompt_sets

    temperature = metrics.get("temperature")
    sets = load_prompt_sets(cfg.eval.prompts)
    return {
        "vlp3d_version": vlp3d.__version__,
        "objective": cfg.objective.name,
        "image_encoder": f"{cfg.model.image_encoder}/{cfg.model.size}",
        "logit_scale": 1.0 / float(temperature) if temperature else None,
        "label_names": list(read_meta(checkpoint_dir).get("label_names", [])),
        "prompt_ensemble": list(cfg.eval.prompt_ensemble),
        "prompt_templates": {name: {"positive": list(sets[name].positive), "negative": list(sets[name].negative)}
                             for name in cfg.eval.prompt_ensemble if name in sets},
    }


def finish_training(run_id: str, cfg: ExperimentConfig, checkpoint_dir: Path, metrics: dict,
                    register: bool = True, status: str = "FINISHED") -> str:
    """Log the final checkpoint as a pyfunc model and register a new version: returns
    `models:/NAME/VERSION` (with `register=False`, e.g. a sweep trial: the logged model's URI)."""
    from vlp3d.encoders.text import DEFAULT_TEXT_ENCODER, resolve_text_encoder
    from vlp3d.platform import pyfunc

    mlflow_client = client(cfg)
    name = registered_name(cfg) if register else None
    metadata = model_metadata(cfg, checkpoint_dir, metrics)
    artifacts = {"checkpoint": str(checkpoint_dir)}
    text_encoder = cfg.model.text_encoder
    if text_encoder != DEFAULT_TEXT_ENCODER and Path(resolve_text_encoder(text_encoder)).is_dir():
        artifacts["text_encoder"] = text_encoder  # a local folder: the model carries its copy
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=pyfunc.Vlp3dEmbedder(metadata),
            artifacts=artifacts,
            # the package's code goes with the model: its environment needs no vlp3d release
            code_paths=[str(Path(vlp3d.__file__).parent)],
            pip_requirements=pyfunc.model_requirements(text_encoder),
            model_config={"allowed_root": cfg.tracking.model_allowed_root, "device": "auto"},
            signature=pyfunc.signature(),
            input_example=pyfunc.input_example(),
            registered_model_name=name,
            metadata=metadata,
        )
    mlflow_client.set_terminated(run_id, status)
    return f"models:/{name}/{info.registered_model_version}" if register else info.model_uri


def log_evaluation(run_id: str, uri_: str, metrics: dict[str, float], tables: dict[str, pd.DataFrame],
                   figures: dict | None = None) -> None:
    mlflow_client = client(uri_)
    mlflow_client.log_batch(run_id, metrics=[mlflow.entities.Metric(k, float(v), 0, 0) for k, v in metrics.items()])
    with tempfile.TemporaryDirectory() as tmp:
        for name, table in tables.items():
            path = Path(tmp) / f"{name}.csv"
            table.to_csv(path, index=False)
            mlflow_client.log_artifact(run_id, str(path), "eval")
        for name, figure in (figures or {}).items():
            mlflow_client.log_figure(run_id, figure, f"eval/{name}.png")


def promote(uri_: str, model_uri: str, alias: str = "champion", metric: str | None = None,
            force: bool = False) -> tuple[bool, str]:
    """Give `alias` to `models:/NAME/VERSION` if it beats the current holder on `metric` (higher wins)."""
    mlflow_client = client(uri_)
    name, version = model_uri.removeprefix("models:/").rsplit("/", 1)
    try:
        current = mlflow_client.get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        current = None
    if current is not None and current.version != version and not force and metric:
        new_value = mlflow_client.get_run(mlflow_client.get_model_version(name, version).run_id).data.metrics.get(metric)
        old_value = mlflow_client.get_run(current.run_id).data.metrics.get(metric)
        if new_value is None:
            return False, f"version {version} has no metric '{metric}' (evaluate it first); {alias} stays at v{current.version}"
        if old_value is not None and new_value < old_value:
            return False, (f"version {version} {metric}={new_value:.4f} < v{current.version} {old_value:.4f}; "
                           f"{alias} stays at v{current.version}")
    mlflow_client.set_registered_model_alias(name, alias, version)
    return True, f"models:/{name}@{alias} -> version {version}"


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
    _log_params(mlflow_client, run_id, logged_params(cfg))
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
