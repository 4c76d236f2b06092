"""Shared fixtures of every level (tests/unit, tests/integration, tests/e2e; see tests/README.md):
one local Ray per test session with a small object store, an S3-compatible server, and the tiny
demo (corpus, shards, a trained and registered model) built once per session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Train's controller polls its workers every 2 s by default; a checkpoint report waits for the
# poll, and so do a run's start and end: the suite's many 8-step runs poll faster
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def _free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


# S3 in this session means the `s3_server` fixture's moto_server on 127.0.0.1, never AWS: fake
# credentials and its endpoint, set before any Ray process starts so that every worker has them
# (as every node of a cluster has its own credentials)
S3_PORT = _free_port()
os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                   "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://127.0.0.1:{S3_PORT}"})
for _name in ("AWS_SESSION_TOKEN", "AWS_PROFILE"):
    os.environ.pop(_name, None)

# a credential in every process's environment (Ray's workers included), which no MLflow store, log line
# or upload may hold (tests/privacy_scan.py)
from tests.privacy_scan import CREDENTIAL_ENV, PLANTED_CREDENTIAL  # noqa: E402

os.environ[CREDENTIAL_ENV] = PLANTED_CREDENTIAL


LEVELS = ("unit", "integration", "e2e")  # tests/<level>/: the level is the folder (tests/README.md)


def pytest_collection_modifyitems(config, items):
    """Each test carries its level's marker (`pytest -m unit`, `-m "not e2e"`), from its folder."""
    root = Path(__file__).parent
    for item in items:
        level = Path(str(item.path)).relative_to(root).parts[0]
        if level not in LEVELS:
            raise pytest.UsageError(f"{item.nodeid}: every test lives in tests/unit, tests/integration or tests/e2e")
        item.add_marker(getattr(pytest.mark, level))
        ray_fixtures = {"ray_session", "tiny_demo"} & set(getattr(item, "fixturenames", ()))
        if level == "unit" and ray_fixtures:
            raise pytest.UsageError(f"{item.nodeid} is in tests/unit but uses {sorted(ray_fixtures)}: a test that "
                                    "needs Ray or the trained demo belongs in tests/integration or tests/e2e")


@pytest.fixture(scope="session")
def ray_session():
    import ray

    started_here = not ray.is_initialized()
    if started_here:
        # address="local": a Ray the user (or another session) left running on this machine is
        # never joined; the suite starts, and later stops, only its own
        ray.init(address="local", num_cpus=2, object_store_memory=400 * 2**20, include_dashboard=True, dashboard_host="127.0.0.1",
                 logging_level="WARNING", log_to_driver=True)
    yield ray
    if started_here:
        ray.shutdown()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    """An S3-compatible server (moto_server, from the dev extra) on 127.0.0.1:S3_PORT with an empty
    bucket `vlp3d-test`, for `s3://vlp3d-test/...` URIs; stopped by its PID."""
    import shutil
    import socket
    import subprocess
    import sys
    import time
    from pathlib import Path

    import pyarrow.fs as pafs

    server = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or shutil.which("moto_server")
    if server is None:
        pytest.fail("moto_server not found: install the dev extra (pip install -e '.[dev]')")
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([server, "-H", "127.0.0.1", "-p", str(S3_PORT)], stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.time() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", S3_PORT), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    pytest.fail(f"moto_server did not start on port {S3_PORT}: {log.read_text()[-2000:]}")
                time.sleep(0.2)
        pafs.S3FileSystem(endpoint_override=f"127.0.0.1:{S3_PORT}", scheme="http",
                          allow_bucket_creation=True).create_dir("vlp3d-test")
        yield "s3://vlp3d-test"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(autouse=True)
def _mlflow_store_env_unchanged():
    """Each test leaves $MLFLOW_TRACKING_URI / $MLFLOW_REGISTRY_URI as it found them: MLflow 3's
    `set_tracking_uri` exports the URI, which every later config without `tracking.tracking_uri`
    would take for the user's store (tests use tests/mlflow_store.current_store)."""
    keys = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")
    saved = {key: os.environ.get(key) for key in keys}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


# the session's one prepared corpus and trained model: a tiny `vlp3d demo` (24 phantoms, 4 steps)
TINY_DEMO = ["--n", "24", "train.max_steps=4", "train.global_batch=8", "train.checkpoint_every=2",
             "train.log_every=2", "eval.bootstrap=10"]


@pytest.fixture(scope="session")
def tiny_demo(ray_session, tmp_path_factory):
    """A tiny demo run once per session: integration and end-to-end tests read its shards, runs and
    registry (`models:/vlp3d-clip@champion`). Its corpus is the demo's phantom with one report sentence
    planted (an MRN and a DICOM UID: tests/privacy_scan.py), written before the demo, which reuses it."""
    import json

    from tests.privacy_scan import plant_in_corpus
    from vlp3d.cli import main
    from vlp3d.data.phantom import synthesize

    workdir = tmp_path_factory.mktemp("demo")
    n = int(TINY_DEMO[TINY_DEMO.index("--n") + 1])
    synthesize(workdir / "corpus", n, seed=0)
    (workdir / "corpus" / "_synth.json").write_text(json.dumps({"n": n, "seed": 0, "radiographs": False}))
    plant_in_corpus(workdir / "corpus")
    assert main(["demo", "--workdir", str(workdir), *TINY_DEMO]) == 0
    return workdir


@pytest.fixture(autouse=True)
def _grad_mode_unchanged():
    """A test leaves autograd on, as it found it: a global torch.set_grad_enabled(False) left behind (an
    in-process MONAI bundle run did) breaks every later test's backward far from its cause."""
    import sys

    yield
    torch = sys.modules.get("torch")
    if torch is not None and not torch.is_grad_enabled():
        torch.set_grad_enabled(True)
        pytest.fail("this test left torch's grad mode disabled (torch.set_grad_enabled(False) without restoring it)")
