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


def __getattr__(name: str):
    """Models logged before the pyfunc moved to vlp3d.platform.pyfunc pickled its class under this
    module's name (`vlp3d.platform.tracking.Vlp3dEmbedder`): they still load."""
    if name == "Vlp3dEmbedder":
        from vlp3d.platform.pyfunc import Vlp3dEmbedder

        return Vlp3dEmbedder
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def client(cfg_or_uri: ExperimentConfig | str) -> MlflowClient:
    """A client for the config's store, also made MLflow's current one (its fluent API logs models).
    MLflow also exports the URI as $MLFLOW_TRACKING_URI / $MLFLOW_REGISTRY_URI, where the next
    config without `tracking.tracking_uri` would find it: the user's own values are put back."""
    target = cfg_or_uri if isinstance(cfg_or_uri, str) else tracking_uri(cfg_or_uri)
    if redact_userinfo(target) != target:
        # MLflow prints "View run ... at: <URL>" when a run ends, the URL built from the tracking
        # URI with its user:password: not on a terminal or into a Ray job's log
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"
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
    log_pretraining_patients(mlflow_client, run_id, shard_dir, cfg.data.train_split)
    return run_id


PRETRAINING_PATIENTS = "data/pretraining_patients.json"


def log_pretraining_patients(mlflow_client: MlflowClient, run_id: str, shard_dir: Path, split: str) -> None:
    """Fingerprints (never the ids) of the patients of the pretraining split: what the leakage check
    compares an evaluated split with, whatever shards it is read from later."""
    from vlp3d.data.patients import patient_fingerprint, split_patients

    patients = split_patients(shard_dir).get(split, set())
    record = {"split": split, "fingerprints": sorted(patient_fingerprint(p) for p in patients)}
    mlflow_client.log_text(run_id, json.dumps(record), PRETRAINING_PATIENTS)


def pretraining_patients(uri_: str, run_id: str) -> dict | None:
    """The record `log_pretraining_patients` wrote for a run ({split, fingerprints}), or None for a
    run logged before it existed."""
    try:
        return json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{PRETRAINING_PATIENTS}"))
    except Exception:  # noqa: BLE001 - missing artifact: MlflowException or OSError by store
        return None


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
    from vlp3d.evaluation.prompts import load_prompt_sets
    from vlp3d.train.checkpoint import read_meta

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


def registered_versions(uri_: str, run_id: str) -> list:
    """The registered model versions logged by a run (none for a sweep trial)."""
    return list(client(uri_).search_model_versions(f"run_id = '{run_id}'"))


def model_version(uri_: str, model_uri: str):
    """`models:/NAME/VERSION` or `models:/NAME@ALIAS` -> its ModelVersion; a ValueError naming the store otherwise."""
    mlflow_client = client(uri_)
    reference = model_uri.removeprefix("models:/")
    try:
        if "@" in reference:
            name, alias = reference.split("@", 1)
            return mlflow_client.get_model_version_by_alias(name, alias)
        name, version = reference.rsplit("/", 1)
        return mlflow_client.get_model_version(name, version)
    except (ValueError, mlflow.exceptions.MlflowException) as err:
        message = getattr(err, "message", str(err))
        raise ValueError(f"no registered model version {model_uri} in the MLflow store {redact_userinfo(uri_)} "
                         f"({message}); list them with `mlflow models` or the MLflow UI") from None


def alias_holder(uri_: str, name: str, alias: str):
    """The version holding `alias` of registered model `name`, or None."""
    try:
        return client(uri_).get_model_version_by_alias(name, alias)
    except mlflow.exceptions.MlflowException:
        return None


PROMOTION_TAG = "vlp3d.promotion"


def promote(uri_: str, model_uri: str, alias: str = "champion", comparison=None, metric: str = "",
            split: str = "", split_hash: str = "", force: bool = False) -> tuple[bool, str]:
    """Give `alias` to `models:/NAME/VERSION` when nobody holds it, when `force`, or when the
    challenger beat the holder beyond the paired bootstrap interval of the difference (`comparison`:
    vlp3d.evaluation.metrics.PairedDifference, its lower bound > 0). The decision, both figures, the
    interval and the split hash are recorded as tags of the challenger version (`vlp3d.promotion.*`)."""
    mlflow_client = client(uri_)
    challenger = model_version(uri_, model_uri)
    name, version = challenger.name, challenger.version
    current = alias_holder(uri_, name, alias)
    record = {"alias": alias, "metric": metric, "split": split, "split_hash": split_hash}
    if current is None or current.version == version or force:
        reason = ("forced" if force and current is not None and current.version != version else
                  "already holds it" if current is not None and current.version == version else "no previous holder")
        moved = current is None or current.version != version
        decision = "promoted" if moved else "kept"
        message = f"models:/{name}@{alias} -> version {version} ({reason})"
    elif comparison is None:
        raise ValueError(f"models:/{name}@{alias} is version {current.version}: moving it to version {version} needs "
                         f"both evaluated on the same split (`vlp3d promote {name} --challenger {version} --shards ...`)"
                         " or --force")
    else:
        moved = comparison.better
        decision = "promoted" if moved else "rejected"
        level = f"{comparison.level:.0%}"
        figures = (f"{metric} v{version} {comparison.challenger:.4f} vs v{current.version} {comparison.champion:.4f}: "
                   f"difference {comparison.difference:+.4f}, {level} paired bootstrap interval "
                   f"[{comparison.ci_low:+.4f}, {comparison.ci_high:+.4f}] on split '{split}' ({split_hash})")
        reason = ("the interval is above zero" if moved else
                  "the interval is below zero (the challenger is worse)" if comparison.ci_high < 0 else
                  "the interval includes zero (no difference beyond chance)" if comparison.ci_low <= 0 else
                  "no finite resample")
        message = (f"{figures}; {reason}: " + (f"models:/{name}@{alias} -> version {version}" if moved
                                                else f"{alias} stays at version {current.version}"))
        record.update({"champion_version": current.version, "champion_value": f"{comparison.champion:.6g}",
                       "challenger_value": f"{comparison.challenger:.6g}",
                       "difference": f"{comparison.difference:.6g}", "ci_low": f"{comparison.ci_low:.6g}",
                       "ci_high": f"{comparison.ci_high:.6g}", "ci_level": level,
                       "bootstrap": str(comparison.n_boot)})
        reason = message
    record.update({"decision": decision, "reason": reason})
    record = {f"{PROMOTION_TAG}.{key}": str(value) for key, value in record.items() if value != ""}
    for key in challenger.tags:  # an earlier decision's figures must not mix with this one's
        if key.startswith(PROMOTION_TAG + ".") and key not in record:
            mlflow_client.delete_model_version_tag(name, version, key)
    for key, value in record.items():
        mlflow_client.set_model_version_tag(name, version, key, value)
    if moved:
        mlflow_client.set_registered_model_alias(name, alias, version)
    update_model_card(uri_, name, version)
    return moved, message


def _eval_tables(mlflow_client: MlflowClient, run_id: str) -> dict[str, pd.DataFrame]:
    """The CSV tables an evaluation logged under `eval/` of a run, by name."""
    from mlflow.environment_variables import MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR

    saved = os.environ.get(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name)
    os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = "false"  # a bar per small CSV buries the output
    try:
        return _download_tables(mlflow_client, run_id)
    finally:
        if saved is None:
            os.environ.pop(MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name, None)
        else:
            os.environ[MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR.name] = saved


def _download_tables(mlflow_client: MlflowClient, run_id: str) -> dict[str, pd.DataFrame]:
    tables: dict[str, pd.DataFrame] = {}
    with tempfile.TemporaryDirectory() as tmp:
        try:
            files = [f.path for f in mlflow_client.list_artifacts(run_id, "eval") if f.path.endswith(".csv")]
        except (OSError, mlflow.exceptions.MlflowException):
            return tables
        for path in files:
            try:
                tables[Path(path).stem] = pd.read_csv(mlflow_client.download_artifacts(run_id, path, tmp))
            except pd.errors.EmptyDataError:  # e.g. no finding with both classes in the split
                continue
    return tables


def _fmt(value, digits: int = 3) -> str:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return "" if number != number else f"{number:.{digits}f}"


def _interval(low, high) -> str:
    return f"[{_fmt(low)}, {_fmt(high)}]" if _fmt(low) else ""


def _markdown(rows: list[list], headers: list[str]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    return "\n".join(lines + ["| " + " | ".join(str(v) for v in row) + " |" for row in rows])


def model_card(name: str, version: str, run, tables: dict[str, pd.DataFrame], version_tags: dict[str, str]
               ) -> tuple[str, dict[str, str]]:
    """The markdown description and the tags of a registered version, from its run (tags, params,
    metrics) and the evaluation tables logged to it."""
    params, run_tags, metrics = run.data.params, run.data.tags, run.data.metrics
    steps, flops_per_step = params.get("train.max_steps", ""), params.get("compute/flops_per_step", "")
    try:
        flops = f"{float(steps) * float(flops_per_step):.3g}"
    except ValueError:
        flops = ""
    facts = {
        "method": run_tags.get("vlp3d.method", ""),
        "image_encoder": f"{params.get('model.image_encoder', '')}/{params.get('model.size', '')}",
        "text_encoder": params.get("model.text_encoder", ""),
        "preprocess_hash": run_tags.get("vlp3d.preprocess_hash", ""),
        "data_hash": run_tags.get("vlp3d.data_hash", ""),
        "train_steps": steps,
        "train_flops": flops,
        "git_commit": run_tags.get("vlp3d.git_commit", ""),
    }
    preprocessing = (f"{params.get('data.shape', '')} voxels at {params.get('data.spacing_mm', '')} mm (RAS), "
                     f"HU window {params.get('data.hu_window', '')}, stored {params.get('data.storage_dtype', '')} "
                     f"({params.get('data.storage', '')}); spec hash `{facts['preprocess_hash']}`")
    lines = [f"# {name} version {version}", "",
             f"A 3D CT vision-language embedding model pretrained with vlp3d (MLflow run `{run.info.run_id}`): "
             f"`mlflow.pyfunc.load_model(\"models:/{name}/{version}\")` embeds CT volumes and report texts into "
             "one space.", "",
             _markdown([["method", facts["method"]], ["image encoder", facts["image_encoder"]],
                        ["text encoder", facts["text_encoder"]], ["preprocessing", preprocessing],
                        ["data (source manifest hash)", f"`{facts['data_hash']}`, pretraining split "
                                                        f"'{params.get('data.train_split', '')}'"],
                        ["training", f"{steps} steps x global batch {params.get('train.global_batch', '')}, "
                                     f"{flops or '?'} FLOPs"],
                        ["code", f"vlp3d {run_tags.get('vlp3d.version', '')}, git `{facts['git_commit']}`"]],
                       ["", ""])]
    tags = {f"vlp3d.{k}": str(v) for k, v in facts.items() if v not in ("", "/")}
    splits = sorted({k.split("/")[1] for k in metrics if k.startswith("eval/") and k.endswith("/macro_auroc")})
    for split in splits:
        zero_shot, retrieval = tables.get(f"{split}_zero_shot"), tables.get(f"{split}_retrieval")
        zero_shot = zero_shot if zero_shot is not None and "n" in zero_shot else pd.DataFrame(columns=["n"])
        prefix = f"eval/{split}/"
        macro, low, high = (metrics.get(prefix + k) for k in ("macro_auroc", "macro_auroc_ci_low", "macro_auroc_ci_high"))
        n = int(zero_shot["n"].iloc[0]) if len(zero_shot) else int(metrics.get(prefix + "retrieval_pool", 0))
        split_hash = run_tags.get(f"vlp3d.eval.{split}.split_hash", "")
        rows = [[r.label, _fmt(r.auroc), _interval(r.auroc_ci_low, r.auroc_ci_high), _fmt(r.f1), r.positives]
                for r in zero_shot.itertuples()]
        rows.append(["**macro**", _fmt(macro), _interval(low, high), _fmt(metrics.get(prefix + "macro_f1")), ""])
        lines += ["", f"## Zero-shot classification, split '{split}' ({n} volumes"
                      + (f", split hash `{split_hash}`" if split_hash else "") + ")", "",
                  _markdown(rows, ["finding", "AUROC", "95% CI", "F1", "positives"])]
        tags[f"vlp3d.eval.{split}.macro_auroc"] = f"{_fmt(macro)} {_interval(low, high)}".strip()
        if split_hash:
            tags[f"vlp3d.eval.{split}.split_hash"] = split_hash
        if retrieval is not None and len(retrieval):
            pool = int(retrieval["pool"].iloc[0])
            lines += ["", f"Retrieval among all {pool} volumes and reports of the split (pool size {pool}):", "",
                      _markdown([[r.direction, _fmt(r._2), _fmt(r._3), _fmt(r._4), _fmt(r.MAP)]
                                 for r in retrieval.itertuples()], ["direction", "R@1", "R@5", "R@10", "MAP"])]
            tags[f"vlp3d.eval.{split}.retrieval_pool"] = str(pool)
        lines += ["", f"Plots (run artifacts): `eval/{split}_roc.png` (ROC per finding), "
                      f"`eval/{split}_reliability.png` (reliability of the zero-shot probabilities)."]
    for key in sorted(k for k in tables if k.startswith("probe_") and not k.endswith("_per_label")):
        probe = tables[key]
        split = key.removeprefix("probe_")
        rows = [[r.features, f"{r.fraction:.0%}", r.train_volumes, _fmt(r.auroc), _interval(r.auroc_ci_low, r.auroc_ci_high),
                 int(r.labels) if r.labels == r.labels else "", r.skipped if isinstance(r.skipped, str) else ""]
                for r in probe.itertuples()]
        lines += ["", f"## Linear probe on frozen image features, tested on '{split}'", "",
                  _markdown(rows, ["features", "labels used", "training volumes", "macro AUROC", "95% CI",
                                   "findings", "skipped"]),
                  "", f"Plot: `eval/{key}.png`; per finding: `eval/{key}_per_label.csv`."]
        for r in probe.itertuples():
            tags[f"vlp3d.probe.{split}.{r.features.replace(' ', '_')}.{r.fraction:g}"] = (
                f"{_fmt(r.auroc)} {_interval(r.auroc_ci_low, r.auroc_ci_high)}".strip())
    promotion = {k.removeprefix(PROMOTION_TAG + "."): v for k, v in version_tags.items() if k.startswith(PROMOTION_TAG)}
    if promotion:
        lines += ["", "## Promotion", "", f"{promotion.get('decision', '')}: {promotion.get('reason', '')}"]
    return "\n".join(lines) + "\n", tags


def update_model_card(uri_: str, name: str, version: str) -> None:
    """Rewrite a registered version's description (markdown model card) and its `vlp3d.*` tags from
    what its run holds now."""
    mlflow_client = client(uri_)
    model_version_ = mlflow_client.get_model_version(name, version)
    run = mlflow_client.get_run(model_version_.run_id)
    description, tags = model_card(name, version, run, _eval_tables(mlflow_client, run.info.run_id),
                                   dict(model_version_.tags))
    mlflow_client.update_model_version(name, version, description=description)
    for key, value in tags.items():
        mlflow_client.set_model_version_tag(name, version, key, value[:5000])


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
