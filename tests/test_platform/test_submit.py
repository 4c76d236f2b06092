"""`vlp3d submit` / `vlp3d jobs`: what is uploaded and passed to a job, the errors a refused token
gives, and (marked `cluster`) a two-node Ray cluster started like cluster.yaml starts it, with token
auth and an MLflow server, running a submitted prepare + pretrain job.

The cluster test starts its own processes (`ray start --block` per node, `mlflow server`), each in
a process group of its own, and stops them by PID in the fixture's teardown; it never runs
`ray stop` (that would stop every Ray on the machine) and never reads or writes the real
~/.ray/auth_token (the nodes and clients get a temporary HOME holding a test token).
"""

from __future__ import annotations

import http.server
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml

from vlp3d.cli import main
from vlp3d.platform import jobs

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


# ---------------------------------------------------------------- unit tests (no cluster)


def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")


def test_working_dir_upload_leaves_out_data_runs_envs_and_credentials(tmp_path):
    _touch(tmp_path, "pyproject.toml", "vlp3d/__init__.py", "vlp3d/data/phantom.py", "configs/demo.toml",
           "benchmarks/bench.py", "tests/test_x.py",
           # data, shards, runs, stores
           "data/ct/a.nii.gz", "shards/abc/part-0.parquet", "corpus/x/scan.nii.gz", "dicom/1.dcm",
           "vlp3d-runs/demo/mlflow.db", "mlruns/0/meta.yaml", "mlartifacts/1/model.pt", "local.db",
           "ray_results/run/checkpoint", "benchmarks/results/out.json",
           # environments, git, caches
           ".venv/pyvenv.cfg", ".venv/lib/site.py", "venv/bin/python", "py311/pyvenv.cfg", "py311/lib/x.py",
           "envs/conda1/conda-meta/history", "envs/conda1/lib/y.py", ".git/HEAD",
           "vlp3d/__pycache__/cli.cpython-311.pyc", "vlp3d.egg-info/PKG-INFO", ".pytest_cache/v",
           # credentials
           ".env", ".env.local", "deploy.pem", "tls.key", ".ray/auth_token")
    files, size = jobs.upload_listing(tmp_path, jobs.excludes_for(tmp_path))
    assert set(files) == {"pyproject.toml", "vlp3d/__init__.py", "vlp3d/data/phantom.py", "configs/demo.toml",
                          "benchmarks/bench.py", "tests/test_x.py"}
    assert 0 < size < 10_000


def test_this_checkout_uploads_its_code_and_configs_only():
    working_dir = jobs.default_working_dir()
    assert working_dir == ROOT
    files, size = jobs.upload_listing(working_dir, jobs.excludes_for(working_dir))
    assert {"vlp3d/cli.py", "vlp3d/data/phantom.py", "configs/demo.toml", "pyproject.toml"} <= set(files)
    for prefix in (".venv/", ".git/", "vlp3d-runs/", "benchmarks/results/", "mlruns/"):
        assert not [f for f in files if f.startswith(prefix)], prefix
    assert not [f for f in files if "__pycache__" in f or f.endswith(".db")]
    assert size < 5 * 2**20


def test_entrypoint_runs_vlp3d_commands_through_the_uploaded_package():
    commands = ["prepare", "pretrain", "sweep", "evaluate"]
    assert jobs.entrypoint(["pretrain", "configs/demo.toml", "data.shape=[32, 32, 32]"], commands) == \
        "python -m vlp3d.cli pretrain configs/demo.toml 'data.shape=[32, 32, 32]'"
    assert jobs.entrypoint(["python", "-c", "print(1)"], commands) == "python -c 'print(1)'"
    with pytest.raises(ValueError, match="nothing to run"):
        jobs.entrypoint([], commands)


@pytest.fixture
def captured_submission(monkeypatch):
    """`vlp3d submit` up to the Jobs API call: the submission it would send."""
    sent = {}

    def fake_submit(address, submission):
        sent.update(address=address, submission=submission)
        return "raysubmit_test123"

    monkeypatch.setattr(jobs, "submit", fake_submit)
    return sent


def test_tracking_uri_and_env_names_reach_the_job_and_values_are_never_printed(
        monkeypatch, capsys, caplog, captured_submission):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow-user:tracking-pass-42@10.0.0.5:5000")
    monkeypatch.setenv("VLP3D_TEST_SECRET", "s3cr3t-value-77")
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    code = main(["submit", "--env", "VLP3D_TEST_SECRET", "--runtime-env", '{"env_vars": {"EXTRA": "1"}}',
                 "--", "pretrain", "configs/demo.toml", "train.max_steps=2"])
    assert code == 0
    submission = captured_submission["submission"]
    assert captured_submission["address"] == "http://127.0.0.1:8265"
    assert submission.entrypoint == "python -m vlp3d.cli pretrain configs/demo.toml train.max_steps=2"
    env = submission.runtime_env
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert env["env_vars"] == {"EXTRA": "1", "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
                               "VLP3D_TEST_SECRET": "s3cr3t-value-77", "VLP3D_GIT_COMMIT": head,
                               "VLP3D_GIT_DIRTY": env["env_vars"]["VLP3D_GIT_DIRTY"]}
    assert env["env_vars"]["VLP3D_GIT_DIRTY"] in ("true", "false")
    assert env["working_dir"] == str(ROOT) and "/data/" in env["excludes"] and ".venv/" in env["excludes"]
    out, err = capsys.readouterr()
    shown = out + err + caplog.text
    assert "raysubmit_test123" in out and "vlp3d jobs stop raysubmit_test123" in out
    assert "VLP3D_TEST_SECRET" in shown and "MLFLOW_TRACKING_URI" in shown
    for secret in ("s3cr3t-value-77", "tracking-pass-42"):
        assert secret not in shown


def _git(folder: Path, *args: str) -> str:
    command = ["git", "-c", "user.name=t", "-c", "user.email=t@example.org", "-c", "commit.gpgsign=false", *args]
    return subprocess.run(command, cwd=folder, capture_output=True, text=True, check=True).stdout.strip()


def test_a_job_records_the_submitting_checkouts_commit_and_whether_it_was_dirty(tmp_path, monkeypatch):
    """The job's working directory travels without .git: the submitter's commit and dirty flag go
    in the runtime env, and the job's runs are tagged with them."""
    from vlp3d.platform.mlflow import store
    from vlp3d.platform.runtime import GIT_COMMIT_ENV, GIT_DIRTY_ENV

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # passed through when set: not what is tested here
    checkout = tmp_path / "checkout"
    _touch(checkout, "train.py")
    _git(checkout, "init", "-q")
    _git(checkout, "add", "train.py")
    _git(checkout, "commit", "-q", "-m", "first")
    head = _git(checkout, "rev-parse", "HEAD")
    clean = jobs.build_submission(["pretrain"], ["pretrain"], working_dir=checkout).runtime_env["env_vars"]
    assert clean == {GIT_COMMIT_ENV: head, GIT_DIRTY_ENV: "false"}
    (checkout / "train.py").write_text("changed")
    dirty = jobs.build_submission(["pretrain"], ["pretrain"], working_dir=checkout).runtime_env["env_vars"]
    assert dirty == {GIT_COMMIT_ENV: head, GIT_DIRTY_ENV: "true"}

    # not a git checkout: nothing passed (the job's own git_state says "unknown")
    plain = tmp_path / "plain"
    _touch(plain, "train.py")
    assert "env_vars" not in jobs.build_submission(["pretrain"], ["pretrain"], working_dir=plain).runtime_env

    # in the job: the passed values win over the (missing) .git of the uploaded folder
    for name, value in dirty.items():
        monkeypatch.setenv(name, value)
    assert store.git_commit() == head
    assert store.git_tags() == {"vlp3d.git_commit": head, "vlp3d.git_dirty": "true"}
    monkeypatch.delenv(GIT_COMMIT_ENV)
    monkeypatch.delenv(GIT_DIRTY_ENV)
    local = store.git_tags()  # a local run: this checkout's own state
    assert local["vlp3d.git_commit"] == _git(ROOT, "rev-parse", "HEAD")
    assert local["vlp3d.git_dirty"] in ("true", "false")


def test_an_env_name_missing_here_is_bad_input(monkeypatch, capsys, captured_submission):
    monkeypatch.delenv("VLP3D_NOT_SET", raising=False)
    assert main(["submit", "--env", "VLP3D_NOT_SET", "--", "pretrain"]) == 2
    assert "VLP3D_NOT_SET" in capsys.readouterr().err and not captured_submission


def test_auth_help_says_what_to_set(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.ray/auth_token here
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    unset = jobs.auth_help("http://127.0.0.1:8265", 401)
    assert "RAY_AUTH_MODE is unset" in unset
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    missing = jobs.auth_help("http://127.0.0.1:8265", 401)
    assert "none was found" in missing
    monkeypatch.setenv("RAY_AUTH_TOKEN", "wrong-token-value")
    wrong = jobs.auth_help("http://127.0.0.1:8265", 403)
    assert "refused the token read from $RAY_AUTH_TOKEN" in wrong and "wrong-token-value" not in wrong
    for text in (unset, missing, wrong):
        assert "RAY_AUTH_MODE=token" in text and "RAY_AUTH_TOKEN_PATH" in text
        assert "ray rsync-down cluster.yaml '~/.ray/auth_token'" in text and "ray get-auth-token" in text


class _Refuses(http.server.BaseHTTPRequestHandler):
    """A Jobs API that answers every request like a token-auth Ray dashboard without a token."""

    def _refuse(self):
        body = b"Unauthorized: Missing authentication token"
        self.send_response(401)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = _refuse

    def log_message(self, *args):
        pass


def test_a_refused_request_is_exit_2_with_what_to_set(monkeypatch, tmp_path, capsys):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Refuses)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HOME", str(tmp_path))
        address = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["jobs", "list", "--address", address]) == 2
        err = capsys.readouterr().err
        assert f"the Ray cluster at {address} requires a token (HTTP 401)" in err
        assert "RAY_AUTH_MODE=token" in err and "RAY_AUTH_TOKEN_PATH" in err
    finally:
        server.shutdown()
        server.server_close()


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

