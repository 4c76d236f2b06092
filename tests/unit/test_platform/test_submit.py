"""`vlp3d submit` / `vlp3d jobs` without a cluster: what is uploaded and passed to a job, the
commit a job records, and the errors a refused token gives (the two-node cluster itself is
tests/e2e/test_submit.py)."""

from __future__ import annotations

import http.server
import os
import subprocess
import threading
from pathlib import Path

import pytest

from vlp3d.cli import main
from vlp3d.platform import jobs

ROOT = Path(__file__).resolve().parents[3]



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
