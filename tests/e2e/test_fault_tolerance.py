"""Nothing lost, nothing leaked. One uninterrupted reference run logs to a real `mlflow server`
(127.0.0.1, a password in the tracking URI) that is taken down mid-run and brought back; the
other runs use the demo's store and must reproduce the reference's losses step by step:
- a run whose rank-1 worker is SIGKILLed at step 3 and whose rank-0 worker at step 6 (Ray Train
  restores from the last checkpoint each time): exact resume, and before a kill, two runs agree;
- a run whose rank-0 input turns NaN from step 3: the steps are skipped, two in a row stop the
  run (FAILED in MLflow, not registered), and `pretrain` with its name resumes it to the end.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from tests.privacy_scan import assert_nothing_leaked, demo_needles, store_files
from vlp3d.config import load_config

STEPS = 8
COMMON = [f"train.max_steps={STEPS}", "train.checkpoint_every=2", "train.log_every=1", "train.max_failures=2"]
SECRET = "hunter2-do-not-log"
TOLERANCE = 1e-6  # CPU, gloo, fixed thread count: the runs agree to float32 rounding or better


class MlflowServer:
    """`mlflow server` on 127.0.0.1 in its own process group (stopped with everything it spawned)."""

    def __init__(self, root: Path):
        import socket

        self.root = root
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.process = None

    def start(self) -> None:
        command = [str(Path(sys.executable).with_name("mlflow")), "server", "--host", "127.0.0.1",
                   "--port", str(self.port), "--workers", "1", "--backend-store-uri", f"sqlite:///{self.root}/db",
                   "--artifacts-destination", str(self.root / "artifacts")]
        with open(self.root / "server.log", "a") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + 300  # ~10 s on an idle 2-core machine; far more under heavy load
        while time.time() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                time.sleep(0.3)
        self.stop()
        pytest.fail(f"mlflow server did not start in 300 s; see {self.root / 'server.log'}")

    def stop(self) -> None:
        if self.process is not None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)
            self.process = None


def _losses(client: MlflowClient, run_id: str) -> dict[int, list[float]]:
    out: dict[int, list[float]] = {}
    for metric in client.get_metric_history(run_id, "train/loss"):
        out.setdefault(metric.step, []).append(metric.value)
    return out


def _assert_same_losses(losses: dict[int, list[float]], reference: dict[int, float]) -> None:
    assert sorted(losses) == sorted(reference) == list(range(1, STEPS + 1))
    for step, values in losses.items():  # a replayed step is logged again: every value must agree
        for value in values:
            assert value == pytest.approx(reference[step], abs=TOLERANCE, rel=TOLERANCE), (step, values, reference)


@pytest.fixture(scope="module")
def reference(tiny_demo, tmp_path_factory):
    """The uninterrupted run. The server goes down once Ray Train starts the run (the driver has
    described it in MLflow; no worker has logged yet) and comes back after the first checkpoint:
    steps 1-2 are logged into an outage."""
    from vlp3d.platform.pretrain import pretrain

    root = tmp_path_factory.mktemp("mlflow-server")
    server = MlflowServer(root)
    server.start()
    uri = f"http://vlp3d:{SECRET}@127.0.0.1:{server.port}"
    cfg = load_config(tiny_demo / "config.toml", [*COMMON, f"tracking.tracking_uri={uri}",
                                                  "tracking.experiment=privacy-and-outage"])
    storage = Path(cfg.tracking.workdir) / "ray_results" / "reference"
    outage: dict[str, float] = {}

    def take_down_and_restore():
        deadline = time.time() + 600
        # Ray Train creates the run's storage folder once the driver is done describing the run in
        # MLflow (a file the server wrote is not yet an answered request) and before any worker starts
        while time.time() < deadline and not storage.is_dir():
            time.sleep(0.1)
        server.stop()
        outage["down"] = time.time()
        while time.time() < deadline and not list(storage.glob("checkpoint_*")):
            time.sleep(0.1)
        outage["up"] = time.time()
        server.start()

    watcher = threading.Thread(target=take_down_and_restore, daemon=True)
    watcher.start()
    try:
        result = pretrain(cfg, run_name="reference", progress=lambda *_: None)
        watcher.join(timeout=120)
        client = MlflowClient(tracking_uri=uri)
        yield {"result": result, "client": client, "root": root, "outage": outage, "uri": uri,
               "losses": {s: v[-1] for s, v in _losses(client, result.run_id).items()}}
    finally:
        server.stop()


def test_metrics_logged_during_an_outage_arrive(reference):
    client, run_id, outage = reference["client"], reference["result"].run_id, reference["outage"]
    assert set(outage) == {"down", "up"}
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted({m.step for m in history}) == list(range(1, STEPS + 1))
    during = [m.step for m in history if outage["down"] * 1000 <= m.timestamp <= outage["up"] * 1000]
    assert 1 in during and 2 in during  # produced while the server was down, delivered after
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {"loss_weight/align", "compute/flops_per_step"} <= set(run.data.params)
    assert run.data.metrics["train/skipped_steps"] == 0


def test_no_secret_report_or_patient_file_in_the_mlflow_store(reference, tiny_demo, tmp_path):
    """Every byte the server stored and every byte of the demo's own store (prepare, pretrain, evaluate,
    promote and whatever else the session ran into it), database and artifacts, registered models
    included: no report, planted MRN, DICOM UID or credential, file path, patient key or unkeyed
    fingerprint of a patient (tests/privacy_scan.py)."""
    from vlp3d.data.patients import patient_key, split_patients

    needles = demo_needles(tiny_demo) | {SECRET}
    for root in (reference["root"], tiny_demo):
        files = store_files(root / "db", root / "artifacts") if root == reference["root"] else \
            store_files(tiny_demo / "mlflow.db", tiny_demo / "mlartifacts")
        assert any(p.name == "model.pt" for p in files)  # the model's artifacts are part of the scan
        assert any(p.name == "inference.py" and "code" in p.parts for p in files)  # vlp3d's code (code_paths)
        assert assert_nothing_leaked(files, needles) == len(files)
    params = reference["client"].get_run(reference["result"].run_id).data.params
    assert "data.corpus" not in params and not any(k.startswith("tracking.") for k in params)
    # the pretraining patients are in the store, keyed: recognisable with the key (the leakage check), not without
    record = json.loads(Path(mlflow.artifacts.download_artifacts(
        f"runs:/{reference['result'].run_id}/data/pretraining_patients.json", tracking_uri=reference["uri"],
        dst_path=str(tmp_path))).read_text())
    shard_dir = reference["result"].shard_dir
    key = patient_key(shard_dir)
    assert record["key_id"] == key.key_id
    assert record["fingerprints"] == sorted(key.fingerprint(p) for p in split_patients(shard_dir)["train"])


@pytest.fixture(scope="module")
def killed(tiny_demo):
    """SIGKILL of the rank-1 worker at step 3, then of the rank-0 worker (the one logging to
    MLflow) at step 6: two restores in one run."""
    from vlp3d.platform.pretrain import pretrain
    from vlp3d.train.loop import FAULT_ENV

    cfg = load_config(tiny_demo / "config.toml", COMMON)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAULT_ENV, "3:1:kill,6:0:kill")
        return pretrain(cfg, run_name="killed", progress=lambda *_: None)


def test_sigkilled_workers_resume_exactly(killed, reference, tiny_demo):
    import tempfile

    for step, rank in ((3, 1), (6, 0)):  # both processes really died (each kill fires once per run)
        assert Path(tempfile.gettempdir(), f"vlp3d-fault-{killed.run_id}-{step}-{rank}").exists()
    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_demo / 'mlflow.db'}")
    resumes = [a.path for a in client.list_artifacts(killed.run_id) if a.path.startswith("resume-")]
    assert resumes and set(resumes) <= {"resume-2.txt", "resume-4.txt"}  # from a checkpoint, not from scratch
    # the steps before a kill come from a second, independent run (reproducible); those after it
    # from a restored one (exact resume): all equal the reference's
    _assert_same_losses(_losses(client, killed.run_id), reference["losses"])
    assert client.get_run(killed.run_id).info.status == "FINISHED"


def test_nan_steps_are_skipped_then_stop_the_run_which_resumes_by_name(reference, tiny_demo):
    from vlp3d.platform.mlflow import store
    from vlp3d.platform.pretrain import NonFiniteTrainingError, pretrain
    from vlp3d.train.loop import FAULT_ENV

    client = MlflowClient(tracking_uri=f"sqlite:///{tiny_demo / 'mlflow.db'}")
    versions = len(client.search_model_versions("name='vlp3d-clip'"))
    cfg = load_config(tiny_demo / "config.toml", [*COMMON, "train.max_skipped_steps=2"])
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(FAULT_ENV, "3:0:nan")
        with pytest.raises(NonFiniteTrainingError, match=r"stopped at step 4: 2 consecutive .* non-finite at the "
                                                         r"last one: align, gradients"):
            pretrain(cfg, run_name="nan-drill", progress=lambda *_: None)
    run = store.find_run(cfg, store.RUN_NAME_TAG, "nan-drill")
    assert run.info.status == "FAILED" and "align" in run.data.tags["vlp3d.failure"]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "train/skipped_steps")][-1] == (3, 1)
    assert len(client.search_model_versions("name='vlp3d-clip'")) == versions  # nothing registered

    resumed = pretrain(cfg, run_name="nan-drill", progress=lambda *_: None)  # same name, no fault
    assert resumed.run_id == run.info.run_id
    after = client.get_run(resumed.run_id)
    assert after.info.status == "FINISHED" and "vlp3d.failure" not in after.data.tags
    assert "align" in after.data.tags["vlp3d.failed_before"]
    _assert_same_losses(_losses(client, resumed.run_id), reference["losses"])
