"""`vlp3d submit` / `vlp3d jobs` on a cluster (marked `cluster`): a two-node Ray cluster started like
cluster.yaml starts it, with token auth and an MLflow server, running a submitted prepare + pretrain
job (what is uploaded and passed without a cluster: tests/unit/test_platform/test_submit.py).

The cluster test starts its own processes (`ray start --block` per node, `mlflow server`), each in
a process group of its own, and stops them by PID in the fixture's teardown; it never runs
`ray stop` (that would stop every Ray on the machine) and never reads or writes the real
~/.ray/auth_token (the nodes and clients get a temporary HOME holding a test token).
"""

from __future__ import annotations

import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------- the cluster test


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cluster_yaml_start(kind: str) -> tuple[dict[str, str], list[str]]:
    """The env assignments and `ray start` arguments of cluster.yaml's head or worker start command."""
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    command = next(c for c in config[f"{kind}_start_ray_commands"] if "ray start" in c)
    words = shlex.split(command.split(";")[-1])
    env = {}
    while "=" in words[0]:
        name, value = words.pop(0).split("=", 1)
        env[name] = value
    assert words[:2] == ["ray", "start"], command
    return env, words[2:]


def _descendants(pid: int) -> list[int]:
    """pid and every process under it (Ray's workers run in sessions of their own, so a process
    group does not hold them all)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found = [pid]
    for each in found:
        found.extend(children.get(each, []))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"


def _stop(procs: list[subprocess.Popen], timeout: float = 6) -> list[int]:
    """Stop processes started in sessions of their own and everything under them, by PID: SIGTERM,
    then SIGKILL what is left after `timeout`. Returns the PIDs still alive (none, normally)."""
    tree = [pid for proc in procs for pid in _descendants(proc.pid)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.time() + timeout
        while time.time() < deadline:
            for proc in procs:
                proc.poll()  # reap our direct children
            if not [pid for pid in tree if _alive(pid)]:
                break
            time.sleep(0.2)
        tree = [pid for pid in tree if _alive(pid)]
        if not tree:
            break
    for proc in procs:
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass
    return [pid for pid in tree if _alive(pid)]


def _wait_for(check, what: str, timeout: float, procs=()) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        for proc, log in procs:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: process exited {proc.returncode}:\n{Path(log).read_text()[-3000:]}")
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{what} not ready after {timeout} s")


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.procs: list[tuple[subprocess.Popen, Path]] = []
        self.token = secrets.token_hex(32)
        self.home = root / "home"  # the nodes' and the client's HOME: ~/.ray/auth_token as on cluster.yaml's nodes
        (self.home / ".ray").mkdir(parents=True)
        token_file = self.home / ".ray" / "auth_token"
        token_file.write_text(self.token)
        token_file.chmod(0o600)
        self.gcs_port, self.dashboard_port, self.mlflow_port = _free_port(), _free_port(), _free_port()
        self.address = f"http://127.0.0.1:{self.dashboard_port}"
        self.tracking_uri = f"http://127.0.0.1:{self.mlflow_port}"
        # a temp dir per node, as on separate machines (a shared one would let one node delete the
        # unpacked working dir the other's job driver runs in); short, for Ray's socket paths
        self.ray_tmp = [Path(tempfile.mkdtemp(prefix="vlp3d-rt-")) for _ in range(2)]
        self.timings: dict[str, float] = {}

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                            "MLFLOW_TRACKING_URI")}
        env.update(HOME=str(self.home), PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
                   RAY_DATA_DISABLE_PROGRESS_BARS="1", TOKENIZERS_PARALLELISM="false",
                   RAY_TRAIN_HEALTH_CHECK_INTERVAL_S="0.5", RAY_USAGE_STATS_ENABLED="0")
        env.update(extra)
        return env

    def popen(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        log = self.root / f"{name}.log"
        with open(log, "w") as out:
            proc = subprocess.Popen(args, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append((proc, log))
        return proc

    def headers(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    def get(self, path: str, token: str | None = None):
        import requests

        return requests.get(self.address + path, headers=self.headers(token), timeout=10)

    def alive_nodes(self) -> list[dict]:
        data = self.get("/api/v0/nodes?limit=100&detail=true").json()["data"]["result"]["result"]
        return [n for n in data if n["state"] == "ALIVE"]

    def start(self) -> None:
        import requests

        t0 = time.time()
        store = str(150 * 2**20)
        self.popen("mlflow", [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(self.mlflow_port),
                              "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
                              "--artifacts-destination", str(self.root / "mlartifacts"), "--workers", "1"],
                   self.env(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false"))
        head_env, head_args = _cluster_yaml_start("head")
        assert "--dashboard-host=127.0.0.1" in head_args and head_env == {"RAY_AUTH_MODE": "token"}
        head_args = [a for a in head_args if not a.startswith(("--port=", "--autoscaling-config="))]
        self.popen("head", [str(BIN / "ray"), "start", *head_args, f"--port={self.gcs_port}",
                            f"--dashboard-port={self.dashboard_port}", "--num-cpus=3", f"--object-store-memory={store}",
                            f"--temp-dir={self.ray_tmp[0]}", f"--dashboard-agent-listen-port={_free_port()}",
                            f"--ray-client-server-port={_free_port()}", "--disable-usage-stats", "--block"],
                   self.env(**head_env))
        # the second node joins as soon as the GCS listens; the dashboard comes up meanwhile
        _wait_for(lambda: socket.create_connection(("127.0.0.1", self.gcs_port), timeout=1).close() or True,
                  "Ray GCS", 90, self.procs)
        self.timings["gcs_s"] = round(time.time() - t0, 1)
        worker_env, worker_args = _cluster_yaml_start("worker")
        assert worker_env == {"RAY_AUTH_MODE": "token"}
        worker_args = [a for a in worker_args if not a.startswith("--address=")]
        self.popen("worker", [str(BIN / "ray"), "start", *worker_args, f"--address=127.0.0.1:{self.gcs_port}",
                              "--num-cpus=3", f"--object-store-memory={store}", f"--temp-dir={self.ray_tmp[1]}",
                              f"--dashboard-agent-listen-port={_free_port()}", "--disable-usage-stats", "--block"],
                   self.env(**worker_env))
        _wait_for(lambda: len(self.alive_nodes()) == 2, "Ray dashboard and both nodes", 120, self.procs)
        _wait_for(lambda: requests.get(self.tracking_uri + "/health", timeout=5).ok, "MLflow server", 60,
                  self.procs)
        self.timings["cluster_s"] = round(time.time() - t0, 1)

    def stop(self) -> list[int]:
        left = _stop([proc for proc, _ in self.procs])
        for path in self.ray_tmp:
            shutil.rmtree(path, ignore_errors=True)
        return left

    def vlp3d(self, args: list[str], env: dict[str, str], timeout: float = 240) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "vlp3d.cli", *args], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Two Ray nodes started with cluster.yaml's flags and env (token auth, dashboard on 127.0.0.1)
    and an MLflow server on 127.0.0.1, all on this machine."""
    node = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        node.start()
        yield node
    finally:
        left = node.stop()
        assert not left, f"processes left running: {left}"


@pytest.mark.slow
@pytest.mark.cluster
def test_submitted_pretraining_runs_on_two_nodes_and_tracks_to_the_mlflow_server(cluster, tiny_demo, tmp_path):
    """A submitted `vlp3d pretrain` on the session's phantom shards (prepare on two nodes is
    test_multinode's): both training workers, one per node, and the run and model in the server."""
    from mlflow import MlflowClient

    work = tmp_path / "work"  # "shared storage": both nodes see this machine's folders
    pretrain = [str(tiny_demo / "config.toml"), f"tracking.workdir={work}", "train.max_steps=2", "train.global_batch=4",
                "train.checkpoint_every=2", "train.log_every=1", "train.val_every=0", "cluster.num_workers=2",
                "cluster.cpus_per_worker=2"]
    script = shlex.join(["python", "-m", "vlp3d.cli", "pretrain", *pretrain, "--run-name", "submitted"])
    t0 = time.time()
    env = cluster.env(RAY_AUTH_MODE="token", MLFLOW_TRACKING_URI=cluster.tracking_uri)
    proc = cluster.vlp3d(["submit", "--address", cluster.address, "--follow", "--", "bash", "-c", script], env)
    cluster.timings["job_s"] = round(time.time() - t0, 1)
    print(cluster.timings)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "submitted job raysubmit_" in proc.stdout and proc.stdout.rstrip().endswith("SUCCEEDED")
    assert "MLFLOW_TRACKING_URI" in proc.stderr and cluster.token not in proc.stdout + proc.stderr

    # the run and the registered model are in the MLflow server the submitting shell named
    client = MlflowClient(tracking_uri=cluster.tracking_uri, registry_uri=cluster.tracking_uri)
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    run = next(r for r in runs if r.data.tags.get("mlflow.runName", "").startswith("submitted"))
    assert run.info.status == "FINISHED" and run.data.params["cluster.num_workers"] == "2"
    versions = client.search_model_versions(f"run_id='{run.info.run_id}'")
    assert versions and versions[0].name == "vlp3d-clip"

    # Ray Train's two workers ran one on each node (2 CPUs each, 3 per node: they cannot share one)
    actors = cluster.get("/api/v0/actors?limit=1000&detail=true").json()["data"]["result"]["result"]
    train_nodes = {a["node_id"] for a in actors if "TrainWorker" in (a.get("class_name") or "")}
    assert train_nodes == {n["node_id"] for n in cluster.alive_nodes()}

    # the same submission without the token is refused, and says what to set
    no_token = cluster.env(HOME=str(tmp_path), MLFLOW_TRACKING_URI=cluster.tracking_uri)
    refused = cluster.vlp3d(["submit", "--address", cluster.address, "--follow", "--", "bash", "-c", script],
                            no_token, timeout=60)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    assert "requires a token (HTTP 401)" in refused.stderr and "RAY_AUTH_MODE=token" in refused.stderr
    assert "RAY_AUTH_TOKEN_PATH" in refused.stderr and "submitted job" not in refused.stdout


@pytest.mark.slow
@pytest.mark.cluster
def test_a_head_started_like_cluster_yaml_refuses_unauthenticated_jobs(cluster, tmp_path):
    import requests

    marker = f"echo unauthenticated-{secrets.token_hex(4)}"
    for headers, status in (({}, 401), ({"Authorization": "Bearer " + secrets.token_hex(32)}, 403)):
        answer = requests.post(cluster.address + "/api/jobs/", json={"entrypoint": marker}, headers=headers,
                               timeout=10)
        assert answer.status_code == status, answer.text
    listed = cluster.get("/api/jobs/").json()
    assert not [j for j in listed if j.get("entrypoint") == marker]
    # and a wrong token through the CLI: exit 2, the 403 explained, the token not echoed
    wrong = secrets.token_hex(32)
    proc = cluster.vlp3d(["jobs", "list", "--address", cluster.address],
                         cluster.env(HOME=str(tmp_path), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=wrong), timeout=60)
    assert proc.returncode == 2 and "refused the token read from $RAY_AUTH_TOKEN" in proc.stderr
    assert wrong not in proc.stderr + proc.stdout
    ok = cluster.vlp3d(["jobs", "list", "--address", cluster.address], cluster.env(RAY_AUTH_MODE="token"), timeout=60)
    assert ok.returncode == 0 and f"jobs at {cluster.address}" in ok.stdout, ok.stderr

