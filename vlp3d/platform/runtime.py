"""Connecting to Ray (local or cluster) and resolving the MLflow store."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path

import pyarrow.fs

from vlp3d import logs, storage
from vlp3d.config import ExperimentConfig

PARQUET_V2_ENV = "RAY_DATA_USE_DATASOURCE_V2"


def init_ray(cfg: ExperimentConfig | None = None, quiet: bool | None = None) -> None:
    """Start a local Ray, or join the cluster named by cluster.address / $RAY_ADDRESS. `quiet`
    (default: unless logging at debug level, `vlp3d --log-level debug`) keeps Ray's INFO lines,
    Ray Data's per-dataset lines and its progress bars off the terminal."""
    import ray

    if quiet is None:
        quiet = not logs.is_debug()

    if quiet:
        os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # Ray Data's Parquet reader V2 (Ray 2.60's default) starts a pool of footer-reading actors, new
    # processes, for every read: 1.7 s per warm read of the demo's shards against 0.4 s with V1, and
    # reads happen at every run, validation and evaluation (benchmarks/README.md, "Ray Data's Parquet
    # reader"). RAY_DATA_USE_DATASOURCE_V2=1 in the environment keeps V2.
    os.environ.setdefault(PARQUET_V2_ENV, "0")
    if not ray.is_initialized():
        address = (cfg.cluster.address if cfg else "") or os.environ.get("RAY_ADDRESS", "")
        if quiet and not address:  # a path on this machine: only for the Ray started here
            os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", str(Path(__file__).with_name("ray_data_logging.yaml")))
        # workers find vlp3d through the driver's environment; on a cluster it is installed
        # and log at the driver's level (vlp3d.logs), with MLflow as quiet as in the driver
        env_vars = {k: os.environ[k] for k in ("RAY_DATA_DISABLE_PROGRESS_BARS", "RAY_DATA_LOGGING_CONFIG", PARQUET_V2_ENV,
                                               logs.LEVEL_ENV, "MLFLOW_LOGGING_LEVEL",
                                               "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR")
                    if k in os.environ and not (address and k == "RAY_DATA_LOGGING_CONFIG")}
        if not logs.is_debug():  # the local Ray has token auth on by default: good, and nothing to act on
            logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_TOKEN_NOTICE)
        env = {"env_vars": env_vars} if env_vars else None
        if address:
            ray.init(address=address, runtime_env=env, log_to_driver=True)
        else:
            store_mb = int(os.environ.get("VLP3D_OBJECT_STORE_MB", "0"))
            ray.init(
                # a Ray of its own: never join (or trip over) another local instance left running
                address="local",
                # quiet: Ray's own INFO lines (every epoch of every dataset) would bury vlp3d's progress
                logging_config=ray.LoggingConfig(log_level="WARNING" if quiet else "INFO"),
                # the dashboard process also serves the state API that Ray Train's controller polls
                include_dashboard=True,
                dashboard_host="127.0.0.1",
                object_store_memory=store_mb * 2**20 if store_mb else None,
                runtime_env=env,
                log_to_driver=True,
                configure_logging=True,
                logging_level="WARNING",
            )
    from ray.data import DataContext

    context = DataContext.get_current()
    # every pipeline in a fixed order: prepare writes the same rows to the same files, training
    # materialises and splits them the same way, so the same corpus, config and seed give the same run
    context.execution_options.preserve_order = True
    context.use_datasource_v2 = os.environ[PARQUET_V2_ENV] == "1"  # (ray.data may have read it before)
    if quiet:
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # "Dataset ... execution finished" per read
        # this process's notice (its logging may predate RAY_DATA_LOGGING_CONFIG, which filters the workers')
        logging.getLogger("ray.data._internal.progress").addFilter(_PROGRESS_NOTICE)
        context.enable_progress_bars = False
        context.print_on_execution_start = False
    context.enable_operator_progress_bars = not quiet


class HideProgressBarNotice(logging.Filter):
    """Ray Data says 'Progress bars disabled' once per process (every split coordinator, every
    trial) when RAY_DATA_DISABLE_PROGRESS_BARS is set, which is how vlp3d asks for it."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(("Progress bars disabled", "Progress bars for operators disabled"))


# one filter object each, so that adding them at every init_ray adds them once (Filterer.addFilter)
_TOKEN_NOTICE = logs.DropMessages("Token authentication is enabled")
_PROGRESS_NOTICE = HideProgressBarNotice()


def tracking_uri(cfg: ExperimentConfig, create: bool = True) -> str:
    """tracking.tracking_uri, else $MLFLOW_TRACKING_URI, else sqlite under the workdir (the workdir
    created unless `create` is false: a dry run or a command that only reads a store)."""
    if cfg.tracking.tracking_uri:
        return cfg.tracking.tracking_uri
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return os.environ["MLFLOW_TRACKING_URI"]
    workdir = Path(cfg.tracking.workdir).resolve()
    if create:
        workdir.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{workdir / 'mlflow.db'}"


def artifact_location(cfg: ExperimentConfig) -> str | None:
    """Artifacts beside a local sqlite store (<workdir>/mlartifacts); the server decides otherwise."""
    uri = tracking_uri(cfg)
    if uri.startswith("sqlite:///"):
        return (Path(uri.removeprefix("sqlite:///")).parent / "mlartifacts").as_uri()
    return None


def storage_location(cfg: ExperimentConfig) -> str:
    """Ray Train storage (run state, checkpoints): tracking.storage (a folder or a pyarrow filesystem
    URI), else <workdir>/ray_results (created)."""
    if storage.is_uri(cfg.tracking.storage):
        return cfg.tracking.storage.rstrip("/")
    path = Path(cfg.tracking.storage or Path(cfg.tracking.workdir, "ray_results")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return str(path)


def run_storage(cfg: ExperimentConfig) -> tuple[str, pyarrow.fs.FileSystem | None]:
    """(storage_path, storage_filesystem) of Ray Train's RunConfig: a URI's filesystem resolved here,
    once (one pyarrow cannot open fails naming tracking.storage), and the path on it; a local
    folder as it is (no filesystem)."""
    location = storage_location(cfg)
    if not storage.is_uri(location):
        return location, None
    fs, path = storage.filesystem(location, "tracking.storage")
    return path, fs


def checkpoint_location(cfg: ExperimentConfig, fs_path: str) -> Path | str:
    """A checkpoint's path as Ray reports it (on run_storage's filesystem) as a local Path, or a
    URI under tracking.storage (a URI, as a local run reports it, is kept)."""
    if storage.is_uri(fs_path):
        return fs_path
    location = storage_location(cfg)
    return storage.uri_of(location, fs_path) if storage.is_uri(location) else Path(fs_path)


# the submitting checkout's commit and whether its tree differed from it ("true"/"false"), set by
# `vlp3d submit`: a job's working directory is uploaded without .git
GIT_COMMIT_ENV = "VLP3D_GIT_COMMIT"
GIT_DIRTY_ENV = "VLP3D_GIT_DIRTY"


def git_state(folder: str | Path | None = None) -> tuple[str, str]:
    """(commit, dirty) of the git checkout holding `folder` (default: vlp3d's own): the HEAD
    commit, and "true" when tracked files changed or untracked, not ignored files exist (they
    would be uploaded or imported too), else "false"; ("unknown", "unknown") outside git."""
    if folder is None:
        import vlp3d

        folder = Path(vlp3d.__file__).parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=folder)
        if head.returncode or not head.stdout.strip():
            return "unknown", "unknown"
        status = subprocess.run(["git", "status", "--porcelain"], capture_output=True, text=True, timeout=30,
                                cwd=folder)
    except (OSError, subprocess.SubprocessError):
        return "unknown", "unknown"
    dirty = "unknown" if status.returncode else ("true" if status.stdout.strip() else "false")
    return head.stdout.strip(), dirty


def run_git_state() -> tuple[str, str]:
    """What a run records as its code version: the submitter's (GIT_COMMIT_ENV / GIT_DIRTY_ENV,
    set by `vlp3d submit`), else this checkout's `git_state()`."""
    if os.environ.get(GIT_COMMIT_ENV):
        return os.environ[GIT_COMMIT_ENV], os.environ.get(GIT_DIRTY_ENV, "unknown")
    return git_state()
