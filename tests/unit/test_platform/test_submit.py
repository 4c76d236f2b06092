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
from vlp3d.errors import InputError
from vlp3d.platform import jobs
from vlp3d.platform.upload import plan_upload

ROOT = Path(__file__).resolve().parents[3]



def _touch(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("x")


CODE = ("pyproject.toml", "README.md", "vlp3d/__init__.py", "vlp3d/data/phantom.py", "configs/demo.toml",
        "configs/sweeps/demo.toml")


def test_the_upload_is_an_allow_list(tmp_path):
    """Only the package, configs/, pyproject.toml and README.md (and --include) leave the machine:
    whatever else lies in the folder (data, runs, environments, notes, tests) stays."""
    _touch(tmp_path, *CODE, "benchmarks/bench.py", "tests/test_x.py", "notes.txt", "scratch/run.sh",
           "data/ct/a.nii.gz", "shards/abc/part-0.parquet", "corpus/x/scan.nii.gz", "vlp3d-runs/demo/mlflow.db",
           ".venv/pyvenv.cfg", ".git/HEAD", "id_rsa", ".ssh/config", "reports.csv",
           # caches inside the package are skipped, not refused
           "vlp3d/__pycache__/cli.cpython-311.pyc", "vlp3d.egg-info/PKG-INFO", "vlp3d/.pytest_cache/v")
    upload = plan_upload(tmp_path)
    assert upload.files == tuple(sorted(CODE))
    assert upload.size == len(CODE)  # each file holds "x"
    with_bench = plan_upload(tmp_path, include=["benchmarks/bench.py", "scratch"])
    assert set(with_bench.files) == {*CODE, "benchmarks/bench.py", "scratch/run.sh"}
    with pytest.raises(FileNotFoundError, match="--include nope.py"):
        plan_upload(tmp_path, include=["nope.py"])
    with pytest.raises(InputError, match="outside the uploaded folder"):
        plan_upload(tmp_path, include=["../elsewhere"])
    staged = upload.stage(tmp_path.parent / "staged")
    assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()) == sorted(CODE)


DICOM_WITHOUT_EXTENSION = b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI"
SERVICE_ACCOUNT = b'{"type": "service_account", "private_key": "x", "client_email": "a@b.iam.gserviceaccount.com"}'
PEM = b"-----BEGIN OPENSSH " + b"PRIVATE KEY-----\nabc\n"
# the list (#26): every one inside an allowed folder refuses the upload, by name or content
PLANTED = {
    "configs/reports_train.csv": b"VolumeName,Findings_EN\n",
    "configs/series/IM000001": DICOM_WITHOUT_EXTENSION,
    "configs/scan.IMA": b"x", "configs/seg.nrrd": b"x", "configs/features.npy": b"x", "configs/volumes.h5": b"x",
    "configs/id_rsa": b"x", "configs/.ssh/config": b"x", "configs/.aws/credentials": b"x",
    "configs/credentials.json": b"{}", "configs/gcp-project.json": SERVICE_ACCOUNT, "configs/deploy_notes.txt": PEM,
    "configs/.git-credentials": b"x", "configs/.pgpass": b"x", "configs/kubeconfig": b"x", "configs/client.p12": b"x",
    "vlp3d/data/ct.nii.gz": b"x", "vlp3d/table.parquet": b"x", "vlp3d/.env": b"x",
}


def test_secrets_and_patient_data_inside_allowed_folders_refuse_the_upload_by_name(tmp_path, capsys):
    _touch(tmp_path, *CODE)
    for name, content in PLANTED.items():
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
    with pytest.raises(InputError) as refused:
        plan_upload(tmp_path)
    message = str(refused.value)
    assert f"{len(PLANTED)} file(s) look like secrets or patient data" in message
    for name in PLANTED:
        assert f"  {name}  (" in message, name
    assert "DICOM file (DICM at byte 128)" in message and "PEM private key" in message
    assert "service-account key" in message
    # one at a time: each alone is enough
    for name, content in PLANTED.items():
        single = tmp_path.parent / f"single-{Path(name).name}"
        _touch(single, *CODE)
        (single / name).parent.mkdir(parents=True, exist_ok=True)
        (single / name).write_bytes(content)
        with pytest.raises(InputError, match="1 file\\(s\\)"):
            plan_upload(single)
    # named with --include: refused too
    clean = tmp_path.parent / "clean"
    _touch(clean, *CODE, "notes/id_ed25519")
    with pytest.raises(InputError, match="notes/id_ed25519"):
        plan_upload(clean, include=["notes"])
    # from the command line: exit 2, the names, nothing submitted
    assert main(["submit", "--working-dir", str(tmp_path), "--dry-run", "--", "pretrain"]) == 2
    assert "configs/id_rsa" in capsys.readouterr().err


def test_this_checkout_uploads_its_code_and_configs_only():
    working_dir = jobs.default_working_dir()
    assert working_dir == ROOT
    upload = plan_upload(working_dir)
    files = set(upload.files)
    assert {"vlp3d/cli.py", "vlp3d/data/phantom.py", "configs/demo.toml", "pyproject.toml", "README.md"} <= files
    assert {f.split("/")[0] for f in files} == {"vlp3d", "configs", "pyproject.toml", "README.md"}
    assert not [f for f in files if "__pycache__" in f or f.endswith((".db", ".pyc"))]
    assert upload.size < 5 * 2**20


def test_dry_run_lists_the_upload_and_contacts_nothing(monkeypatch, capsys, tmp_path):
    def no_cluster(*args, **kwargs):
        raise AssertionError("a dry run contacted the cluster")

    monkeypatch.setattr(jobs, "client", no_cluster)
    monkeypatch.setattr(jobs, "submit", no_cluster)
    _touch(tmp_path, *CODE, "benchmarks/bench.py")
    code = main(["submit", "--working-dir", str(tmp_path), "--include", "benchmarks/bench.py", "--dry-run",
                 "--submission-id", "mine-1", "--", "pretrain", "configs/demo.toml"])
    out = capsys.readouterr().out
    assert code == 0
    listed = [line.removeprefix("  upload  ") for line in out.splitlines() if line.startswith("  upload  ")]
    assert sorted(listed) == sorted([*CODE, "benchmarks/bench.py"])
    assert f"would upload {len(CODE) + 1} files (0.0 KiB)" in out
    assert "python -m vlp3d.cli pretrain configs/demo.toml" in out and "submission_id=mine-1" in out
    assert "dry run: pretrain" in out and "train.max_steps" in out  # the job's own plan follows


def test_submit_sends_ray_job_submits_options_and_the_staged_upload(monkeypatch, tmp_path, capsys):
    sent = {}

    class Client:
        def submit_job(self, **kwargs):
            staged = Path(kwargs["runtime_env"]["working_dir"])
            sent.update(kwargs, staged=sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*")
                                              if p.is_file()))
            return kwargs.get("submission_id") or "raysubmit_x"

    monkeypatch.setattr(jobs, "client", lambda address: Client())
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    _touch(tmp_path, *CODE, "data/scan.nii.gz")
    code = main(["submit", "--working-dir", str(tmp_path), "--address", "http://10.0.0.1:8265",
                 "--submission-id", "pretrain-7", "--entrypoint-num-cpus", "1", "--entrypoint-num-gpus", "0.5",
                 "--entrypoint-memory", "1000000", "--entrypoint-resources", '{"head": 1}',
                 "--metadata-json", '{"team": "ct"}', "--runtime-env-json", '{"env_vars": {"A": "1"}}',
                 "--", "pretrain", "configs/demo.toml"])
    assert code == 0, capsys.readouterr().err
    assert sent["submission_id"] == "pretrain-7" and sent["metadata"] == {"team": "ct"}
    assert (sent["entrypoint_num_cpus"], sent["entrypoint_num_gpus"], sent["entrypoint_memory"]) == (1.0, 0.5, 1000000)
    assert sent["entrypoint_resources"] == {"head": 1}
    assert sent["runtime_env"]["env_vars"] == {"A": "1", "RAY_JOB_STOP_WAIT_TIME_S": "120"}
    assert sent["staged"] == sorted(CODE)  # what reached Ray's packaging: the allow-list only
    assert not Path(sent["runtime_env"]["working_dir"]).exists()  # the staging folder is gone
    assert "submitted job pretrain-7" in capsys.readouterr().out
    assert main(["submit", "--metadata-json", "[1]", "--dry-run", "--", "pretrain"]) == 2


@pytest.mark.parametrize(("given", "env", "expected"), [
    ("http://h:8265", {"RAY_API_SERVER_ADDRESS": "http://api:8265", "RAY_ADDRESS": "http://r:8265"}, "http://h:8265"),
    ("h:8265", {}, "http://h:8265"),
    (None, {"RAY_API_SERVER_ADDRESS": "api:8265", "RAY_ADDRESS": "http://r:8265"}, "http://api:8265"),
    (None, {"RAY_ADDRESS": "http://r:8265"}, "http://r:8265"),
    (None, {"RAY_ADDRESS": "10.0.0.5:6379"}, "10.0.0.5:6379"),  # ray.init's address: Ray's client resolves it
    (None, {"RAY_ADDRESS": "auto"}, "auto"),
    (None, {}, "http://127.0.0.1:8265"),
])
def test_the_jobs_api_address_follows_ray_job_submit(given, env, expected, monkeypatch):
    import argparse

    from vlp3d.jobs.submit import resolve_address

    for name in ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert resolve_address(argparse.Namespace(address=given)) == expected


def test_a_cluster_address_given_as_address_is_refused():
    import argparse

    from vlp3d.jobs.submit import resolve_address

    with pytest.raises(InputError, match="not the cluster"):
        resolve_address(argparse.Namespace(address="10.0.0.5:6379"))


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
    monkeypatch.delenv("RAY_API_SERVER_ADDRESS", raising=False)
    code = main(["submit", "--env", "VLP3D_TEST_SECRET", "--runtime-env", '{"env_vars": {"EXTRA": "1"}}',
                 "--", "pretrain", "configs/demo.toml", "train.max_steps=2"])
    assert code == 0
    submission = captured_submission["submission"]
    assert captured_submission["address"] == "http://127.0.0.1:8265"
    assert submission.entrypoint == "python -m vlp3d.cli pretrain configs/demo.toml train.max_steps=2"
    env = submission.runtime_env
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    assert env["env_vars"] == {"EXTRA": "1", "RAY_JOB_STOP_WAIT_TIME_S": "120", "MLFLOW_TRACKING_URI": os.environ["MLFLOW_TRACKING_URI"],
                               "VLP3D_TEST_SECRET": "s3cr3t-value-77", "VLP3D_GIT_COMMIT": head,
                               "VLP3D_GIT_DIRTY": env["env_vars"]["VLP3D_GIT_DIRTY"]}
    assert env["env_vars"]["VLP3D_GIT_DIRTY"] in ("true", "false")
    assert "working_dir" not in env and submission.upload.root == ROOT  # staged at submission
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
    clean = jobs.build_submission(["pretrain"], ["pretrain"], working_dir=checkout, include=["train.py"]).runtime_env["env_vars"]
    assert clean == {GIT_COMMIT_ENV: head, GIT_DIRTY_ENV: "false", "RAY_JOB_STOP_WAIT_TIME_S": "120"}
    (checkout / "train.py").write_text("changed")
    dirty = jobs.build_submission(["pretrain"], ["pretrain"], working_dir=checkout, include=["train.py"]).runtime_env["env_vars"]
    assert dirty == {GIT_COMMIT_ENV: head, GIT_DIRTY_ENV: "true", "RAY_JOB_STOP_WAIT_TIME_S": "120"}

    # not a git checkout: nothing passed (the job's own git_state says "unknown")
    plain = tmp_path / "plain"
    _touch(plain, "train.py")
    assert GIT_COMMIT_ENV not in jobs.build_submission(["pretrain"], ["pretrain"], working_dir=plain, include=["train.py"]).runtime_env["env_vars"]

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
        # --address wins over the environment (Ray's own client would let these override it)
        monkeypatch.setenv("RAY_ADDRESS", "http://127.0.0.1:9")
        monkeypatch.setenv("RAY_API_SERVER_ADDRESS", "http://127.0.0.1:9")
        address = f"http://127.0.0.1:{server.server_address[1]}"
        assert main(["jobs", "list", "--address", address]) == 2
        err = capsys.readouterr().err
        assert f"the Ray cluster at {address} requires a token (HTTP 401)" in err
        assert "RAY_AUTH_MODE=token" in err and "RAY_AUTH_TOKEN_PATH" in err
        assert os.environ["RAY_ADDRESS"] == "http://127.0.0.1:9"  # put back
    finally:
        server.shutdown()
        server.server_close()
