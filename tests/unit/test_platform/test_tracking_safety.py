"""Tracking without leaks or stalls: the params allow-list, scrubbed failure records, MLflow's
exported URI put back, and the rank-0 logger that buffers through an outage (no server needed)."""

import os
import threading
import time

import pytest

from vlp3d.config import ExperimentConfig, logged_params, public_config, replace
from vlp3d.platform.mlflow import store
from vlp3d.platform.mlflow.logger import RankZeroLogger
from vlp3d.platform.mlflow.server import TrackingServerError


def test_params_are_an_allow_list_without_locations_or_userinfo():
    cfg = replace(ExperimentConfig(), tracking={"tracking_uri": "https://me:s3cret@mlflow.example/"},
                  data={"corpus": "/data/patients", "shards": "/data/shards"},
                  cluster={"address": "ray://me:pw@head:10001"},
                  model={"text_encoder": "https://user:tok3n@models.example/minilm"})
    params = logged_params(cfg)
    assert {"train.lr", "model.image_encoder", "objective.name", "data.shape", "cluster.num_workers"} <= set(params)
    assert not {"data.corpus", "data.shards", "cluster.address"} & set(params)
    assert not any(k.startswith("tracking.") for k in params)
    assert params["model.text_encoder"] == "https://models.example/minilm"
    text = " ".join(params.values()) + str(public_config(cfg))
    for secret in ("s3cret", "tok3n", "pw@", "/data/"):
        assert secret not in text


def test_failure_records_keep_row_and_reason_only():
    manifest = {"corpus": "/data/ct", "counts": {"rows": 3}, "spec_hash": "abc",
                "failed": [{"row": 2, "path": "/data/ct/p17/scan.nii.gz", "volume_name": "p17_scan",
                            "reason": "OSError: cannot read /data/ct/p17/scan.nii.gz (p17_scan)"}],
                "warnings": [{"row": 1, "warning": "raw values in /mnt/x/y.nii"}]}
    public = store.public_manifest(manifest)
    assert public["failed"] == [{"row": 2, "reason": "OSError: cannot read <file> (<file>)"}]
    assert public["warnings"] == [{"row": 1, "warning": "raw values in <path>"}]
    assert "corpus" not in public and public["counts"] == {"rows": 3}


def test_client_leaves_the_users_environment_as_it_was(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    store.client(f"sqlite:///{tmp_path / 'a.db'}")
    assert "MLFLOW_TRACKING_URI" not in os.environ  # MLflow exported it; a later default must not find it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://users-own:5000")
    store.client(f"sqlite:///{tmp_path / 'b.db'}")
    assert os.environ["MLFLOW_TRACKING_URI"] == "http://users-own:5000"


class FlakyClient:
    """Refuses connections while `down` is set; records what it received."""

    def __init__(self):
        self.down = threading.Event()
        self.metrics, self.params, self.texts, self.calls = [], [], [], 0

    def log_batch(self, run_id, metrics=(), params=()):
        self.calls += 1
        if self.down.is_set():
            raise ConnectionRefusedError("server down")
        self.metrics += list(metrics)
        self.params += list(params)

    def log_text(self, run_id, text, artifact_file):
        if self.down.is_set():
            raise ConnectionRefusedError("server down")
        self.texts.append(artifact_file)


def test_logger_never_blocks_and_delivers_everything_after_an_outage():
    warnings = []
    logger = RankZeroLogger("http://user:pw@127.0.0.1:1", "run", warn=lambda m, **_: warnings.append(m))
    fake = logger.client = FlakyClient()
    logger.log_params({"a": 1})
    logger.log_metrics({"train/loss": 1.0}, step=1)
    assert logger.flush(5)
    fake.down.set()
    started = time.perf_counter()
    for step in range(2, 202):
        logger.log_metrics({"train/loss": float(step)}, step=step)
    logger.log_text("resumed", "resume-2.txt")
    assert time.perf_counter() - started < 1.0  # training's calls return at once
    assert not logger.flush(0.5)  # nothing gets through while the server is down
    assert len(logger.pending()) == 201
    fake.down.clear()
    assert logger.flush(30)
    assert sorted(m.step for m in fake.metrics) == list(range(1, 202))
    assert [p.key for p in fake.params] == ["a"] and fake.texts == ["resume-2.txt"]
    assert len([w for w in warnings if "not answering" in w]) == 1 and any("is back" in w for w in warnings)
    assert all("pw" not in w for w in warnings)


def test_what_was_not_delivered_can_be_requeued():
    logger = RankZeroLogger("http://127.0.0.1:1", "run", warn=lambda *a, **k: None)
    fake = logger.client = FlakyClient()
    fake.down.set()
    logger.log_metrics({"x": 1.0}, step=3)
    time.sleep(0.2)
    saved = logger.pending()  # what a checkpoint keeps
    successor = RankZeroLogger("http://127.0.0.1:1", "run", warn=lambda *a, **k: None)
    other = successor.client = FlakyClient()
    successor.requeue(saved)
    assert successor.flush(10)
    assert [(m.key, m.step, m.value) for m in other.metrics] == [("x", 3, 1.0)]


@pytest.mark.parametrize("code, retried", [("TEMPORARILY_UNAVAILABLE", True), ("INVALID_PARAMETER_VALUE", False)])
def test_refused_calls_are_dropped_and_unavailable_ones_retried(code, retried):
    import mlflow
    from mlflow.protos import databricks_pb2

    logger = RankZeroLogger("http://127.0.0.1:1", "run", warn=lambda *a, **k: None)
    assert logger._attempt([("params", {"a": "1"})]) == "MlflowException"  # connection refused: retried
    class Failing:
        def log_batch(self, *a, **k):
            raise mlflow.exceptions.MlflowException("nope", error_code=getattr(databricks_pb2, code))

    logger.client = Failing()
    assert (logger._attempt([("params", {"a": "1"})]) is not None) is retried


def test_a_tracking_uri_with_a_password_is_never_printed_by_mlflow(tmp_path, monkeypatch):
    """MLflow writes "View run NAME at: URL" to stdout when a run on a server ends, the URL built
    from the tracking URI, user:password included; vlp3d turns that off for such a URI."""
    from mlflow.environment_variables import MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT

    from tests.mlflow_store import current_store

    monkeypatch.delenv("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", raising=False)
    with current_store(f"sqlite:///{tmp_path / 'mlflow.db'}"):
        store.client(f"sqlite:///{tmp_path / 'mlflow.db'}")
        assert not MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get()  # no secret: MLflow's links stay
        with pytest.raises(TrackingServerError, match="127.0.0.1:9 is unreachable") as unreachable:
            store.client("http://vlp3d:hunter2@127.0.0.1:9")  # nothing listens there
        assert MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT.get() and "hunter2" not in str(unreachable.value)


def test_ending_a_run_quietly_never_prints_the_password(monkeypatch):
    """The warning when a run cannot be marked FAILED quoted MLflow's error, which quotes the URL with
    its user:password; the failure tag itself is scrubbed too."""
    from vlp3d.platform.mlflow import runs

    def unreachable(uri, run_id, status, tags):
        assert tags == {"vlp3d.failure": "OSError: cannot read <path> (see http://host:5000/x)"}
        raise ConnectionError(f"API request to {uri}/api/2.0/mlflow/runs/set-tag failed: Max retries exceeded")

    warnings = []
    monkeypatch.setattr(runs, "end_run", unreachable)
    monkeypatch.setattr(runs.log, "warning", lambda message, *a, **k: warnings.append(message))
    runs.end_run_quietly("http://vlp3d:hunter2@host:5000", "run-1", "FAILED",
                         "OSError: cannot read /data/ct/QX8675309/a.nii.gz (see http://u:pw@host:5000/x)")
    assert warnings == ["could not mark MLflow run run-1 FAILED: ConnectionError: API request to http://host:5000/api/"
                        "2.0/mlflow/runs/set-tag failed: Max retries exceeded"]
