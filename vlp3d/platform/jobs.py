"""Ray job submission: run a vlp3d command on a Ray cluster through its Jobs API.

How the job finds vlp3d: the submitting checkout is uploaded as the job's `working_dir`
(Ray zips it, stores it in the cluster's GCS and unpacks it on every node that runs a task of
the job). Ray puts that folder first on PYTHONPATH of the job's driver and of every worker, and
the driver starts in it, so `python -m vlp3d.cli <command>` runs the code you submitted and
relative paths (`configs/...`) resolve inside the upload. The cluster only needs vlp3d's
dependencies installed (cluster.yaml's setup_commands do `pip install -e` of the synced
checkout, which also installs them); nothing is built per job. The alternative, a runtime-env
`pip` install of the uploaded folder, would build a fresh virtualenv on every node for every
job (minutes, torch included) and needs a package index reachable from the cluster.

What is uploaded: an allow-list (`vlp3d.platform.upload`: the package, configs/, pyproject.toml,
README.md and the `--include` files), staged in a temporary folder that Ray zips; a file of the
deny-list (secrets, patient data) inside it refuses the submission with its name.

Token authentication (Ray >= 2.59): a client sends `Authorization: Bearer <token>` only when
RAY_AUTH_MODE=token is set in its environment; the token comes from $RAY_AUTH_TOKEN, the file
named by $RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token. A cluster started with token auth answers
401 without a token and 403 with a wrong one; both become `ClusterAuthError` (exit 2) saying
what to set. Token values are never printed or logged, nor are the values of the environment
variables handed to the job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shlex
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from vlp3d.errors import InputError
from vlp3d.platform.upload import Upload, plan_upload
from vlp3d.redact import redact

log = logging.getLogger(__name__)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
TRACKING_ENV = "MLFLOW_TRACKING_URI"
TOKEN_ENV, TOKEN_PATH_ENV, AUTH_MODE_ENV = "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"
TOKEN_FILE = "~/.ray/auth_token"
CLUSTER_TOKEN_COPY = "~/.ray/vlp3d-cluster-token"  # where the docs put a copy of the cluster's token

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
# Ray's packaging and job-client INFO/WARNING lines (each .gitignore honoured, the package upload,
# the default excludes, the log socket closing): shown at `--log-level debug` only
_RAY_CHATTER = ("ray._private.runtime_env.packaging", "ray._private.runtime_env.working_dir",
                "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk")


def quiet_ray_client() -> None:
    from vlp3d import logs

    if not logs.is_debug():
        for name in _RAY_CHATTER:
            logging.getLogger(name).setLevel(logging.ERROR)


class ClusterAuthError(RuntimeError):
    """The Jobs API refused the request (401/403): what to set is in the message. Exit 2."""

    exit_code = 2


def token_source() -> str | None:
    """Where a client on this machine would read its token from (never the token itself)."""
    if os.environ.get(TOKEN_ENV):
        return f"${TOKEN_ENV}"
    if os.environ.get(TOKEN_PATH_ENV):
        path = Path(os.environ[TOKEN_PATH_ENV]).expanduser()
        return f"{path} (${TOKEN_PATH_ENV})" if path.is_file() and path.stat().st_size else None
    path = Path(TOKEN_FILE).expanduser()
    return str(path) if path.is_file() and path.stat().st_size else None


def auth_help(address: str, status: int | None) -> str:
    """The error text for a refused request: why, and exactly what to set."""
    mode = os.environ.get(AUTH_MODE_ENV, "")
    source = token_source()
    if status == 403:
        why = (f"the Ray cluster at {address} refused the token read from {source or 'this environment'} "
               "(HTTP 403: wrong token, e.g. one from another cluster or from a local `ray.init()`)")
    elif mode.lower() != "token":
        why = (f"the Ray cluster at {address} requires a token (HTTP 401) and none was sent: "
               f"{AUTH_MODE_ENV} is {mode or 'unset'} here, so Ray sends no token"
               + (f" (one is available in {source})" if source else ""))
    else:
        why = (f"the Ray cluster at {address} requires a token (HTTP 401) and none was found: "
               f"{TOKEN_ENV} and {TOKEN_PATH_ENV} are unset and {TOKEN_FILE} does not exist")
    return (
        f"{why}.\n"
        f"  Set {AUTH_MODE_ENV}=token and give the cluster's token in a file named by {TOKEN_PATH_ENV} "
        f"(default {TOKEN_FILE}) or in {TOKEN_ENV}. For a cluster from cluster.yaml, copy the head's "
        "token over SSH:\n"
        f"    export {AUTH_MODE_ENV}=token\n"
        f"    ray rsync-down cluster.yaml '{TOKEN_FILE}' {CLUSTER_TOKEN_COPY}\n"
        f"    export {TOKEN_PATH_ENV}={CLUSTER_TOKEN_COPY}\n"
        "  (on the head node `ray get-auth-token` prints it; keep it out of shell history, the "
        "repository and job arguments)."
    )


ADDRESS_ENVS = ("RAY_API_SERVER_ADDRESS", "RAY_ADDRESS")


def client(address: str):
    """A JobSubmissionClient for `address` (vlp3d.jobs.submit.resolve_address applied --address and the
    environment already: Ray's client, which lets $RAY_API_SERVER_ADDRESS / $RAY_ADDRESS override the
    address it is given, is built without them); a refused token becomes `ClusterAuthError`."""
    from ray.exceptions import AuthenticationError
    from ray.job_submission import JobSubmissionClient

    quiet_ray_client()
    saved = {name: os.environ.pop(name) for name in ADDRESS_ENVS if name in os.environ}
    try:
        return _AuthCheckingClient(JobSubmissionClient(address))
    except AuthenticationError as err:
        raise ClusterAuthError(auth_help(address, _status(err))) from None
    except ConnectionError as err:
        raise ConnectionError(f"{err} Is the cluster up and its dashboard reachable (for a cluster "
                              "from cluster.yaml: `ray dashboard cluster.yaml` keeps a tunnel to "
                              "127.0.0.1:8265 open)?") from None
    finally:
        os.environ.update(saved)


def _status(err: Exception) -> int | None:
    text = str(err)
    if text.startswith("Authentication failed"):
        return 403
    if text.startswith("Authentication required"):
        return 401
    return None


class _AuthCheckingClient:
    """Forwards to the JobSubmissionClient; auth errors of any call become `ClusterAuthError`."""

    def __init__(self, inner):
        self._inner = inner

    def __getattr__(self, name):
        attr = getattr(self._inner, name)
        if not callable(attr) or name == "tail_job_logs":
            return attr

        def call(*args, **kwargs):
            from ray.exceptions import AuthenticationError

            try:
                return attr(*args, **kwargs)
            except AuthenticationError as err:
                raise ClusterAuthError(auth_help(self._inner._address, _status(err))) from None
            except RuntimeError as err:
                if "status code 404" in str(err):  # an unknown job id
                    raise InputError(str(err).removeprefix("Request failed with status code 404: ")) from None
                raise

        return call


def default_working_dir() -> Path:
    """The vlp3d checkout this command runs from (the folder holding pyproject.toml and vlp3d/)."""
    import vlp3d

    checkout = Path(vlp3d.__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file():
        return checkout
    raise InputError("vlp3d is not running from a source checkout: pass --working-dir DIR "
                     "(the folder whose vlp3d/, configs/ and --include files are uploaded)")


def load_runtime_env(value: str | None, json_value: str | None = None) -> dict:
    """`--runtime-env` (a YAML/JSON file, or for compatibility a JSON object) and `--runtime-env-json`
    (a JSON object), as `ray job submit` takes them; the JSON's keys win."""
    loaded: dict = {}
    if value:
        path = Path(value).expanduser()
        if path.is_file():
            import yaml

            loaded = yaml.safe_load(path.read_text())
        else:
            loaded = json_object(value, "--runtime-env", "neither a file nor a JSON object")
        if not isinstance(loaded, dict):
            raise InputError(f"--runtime-env {value!r}: expected a mapping (working_dir, env_vars, pip, ...)")
    if json_value:
        loaded = {**loaded, **json_object(json_value, "--runtime-env-json", "not a JSON object")}
    return loaded


def json_object(text: str, option: str, why: str) -> dict:
    try:
        loaded = json.loads(text)
    except json.JSONDecodeError:
        raise InputError(f"{option} {text!r}: {why}") from None
    if not isinstance(loaded, dict):
        raise InputError(f"{option} {text!r}: expected a JSON object")
    return loaded


def passed_env(names: Sequence[str], environ: dict | None = None) -> dict[str, str]:
    """MLFLOW_TRACKING_URI (when set) and each `--env NAME` from the submitting environment."""
    environ = os.environ if environ is None else environ
    missing = [n for n in names if n not in environ]
    if missing:
        raise InputError(f"--env {', '.join(missing)}: not set in this environment")
    wanted = [*([TRACKING_ENV] if TRACKING_ENV in environ else []), *names]
    return {name: environ[name] for name in dict.fromkeys(wanted)}


@dataclass(frozen=True)
class Submission:
    """What `submit` sends: the entrypoint, the runtime environment (its working_dir is the staged
    upload, set at submission), the allow-listed files and `ray job submit`'s other options
    (submission_id, metadata, entrypoint_num_cpus/gpus/memory/resources)."""

    entrypoint: str
    runtime_env: dict
    upload: Upload
    options: dict = field(default_factory=dict)

    @property
    def env_names(self) -> list[str]:
        return sorted(self.runtime_env.get("env_vars", {}))


def entrypoint(command: Sequence[str], cli_commands: Iterable[str]) -> str:
    """`pretrain cfg.toml ...` -> `python -m vlp3d.cli pretrain cfg.toml ...`; any other command
    (`python script.py`, `bash -c ...`) runs as given."""
    if not command:
        raise InputError("nothing to run: give the command after --, e.g. `vlp3d submit -- pretrain configs/demo.toml`")
    command = list(command)
    if command[0] in set(cli_commands):
        command = ["python", "-m", "vlp3d.cli", *command]
    return shlex.join(command)


def code_version_env(working_dir: Path) -> dict[str, str]:
    """The uploaded working directory's git commit and dirty flag (it travels without .git), for the
    runs the job tracks (`vlp3d.git_commit` / `vlp3d.git_dirty` tags); {} outside a git checkout."""
    from vlp3d.platform.runtime import GIT_COMMIT_ENV, GIT_DIRTY_ENV, git_state

    commit, dirty = git_state(working_dir)
    return {} if commit == "unknown" else {GIT_COMMIT_ENV: commit, GIT_DIRTY_ENV: dirty}


# `ray job stop` sends SIGTERM and, 3 s later by default, SIGKILL: a training run needs longer to write its
# final checkpoint (vlp3d.platform.launch); the job's supervisor reads this from the job's environment
STOP_WAIT_ENV, STOP_WAIT_S = "RAY_JOB_STOP_WAIT_TIME_S", "120"


def build_submission(command: Sequence[str], cli_commands: Iterable[str], working_dir: Path | None = None,
                     runtime_env: dict | None = None, env_names: Sequence[str] = (), include: Sequence[str] = (),
                     options: dict | None = None) -> Submission:
    """The job's entrypoint, runtime environment and upload: the allow-listed files of the working dir
    (`vlp3d.platform.upload`; a denied file is an InputError naming it), its env vars."""
    env = dict(runtime_env or {})
    if working_dir is None:
        working_dir = Path(env["working_dir"]) if "working_dir" in env else default_working_dir()
    working_dir = Path(working_dir).expanduser().resolve()
    if not working_dir.is_dir():
        raise FileNotFoundError(f"--working-dir {working_dir}: no such folder")
    upload = plan_upload(working_dir, include, env.pop("excludes", ()))
    env_vars = {STOP_WAIT_ENV: STOP_WAIT_S, **env.get("env_vars", {}), **passed_env(env_names),
                **code_version_env(working_dir)}
    env.pop("working_dir", None)
    if env_vars:
        env["env_vars"] = env_vars
    return Submission(entrypoint(command, cli_commands), env, upload, dict(options or {}))


def submit(address: str, submission: Submission) -> str:
    """Stage the upload in a temporary folder (Ray zips it as the job's working directory), submit,
    and return the job id (its submission id)."""
    jobs = client(address)
    with tempfile.TemporaryDirectory(prefix="vlp3d-upload-") as tmp:
        working_dir = submission.upload.stage(Path(tmp))
        return jobs.submit_job(entrypoint=submission.entrypoint,
                               runtime_env={**submission.runtime_env, "working_dir": str(working_dir)},
                               **submission.options)


def follow(address: str, job_id: str, out=None, poll_s: float = 1.0) -> str:
    """Stream the job's logs to `out` (stdout) until it ends; returns its final status."""
    out = out or sys.stdout
    jobs = client(address)

    async def tail():
        async for chunk in jobs.tail_job_logs(job_id):
            out.write(redact(chunk))
            out.flush()

    try:
        asyncio.run(tail())
    except Exception as err:  # noqa: BLE001 - the connection may drop; the status below decides
        from ray.exceptions import AuthenticationError

        if isinstance(err, AuthenticationError):
            raise ClusterAuthError(auth_help(address, _status(err))) from None
        log.warning("log stream of %s ended early (%s); waiting for the job to finish", job_id, err)
    return wait(jobs, job_id, poll_s)


def wait(jobs, job_id: str, poll_s: float = 1.0) -> str:
    while True:
        status = str(jobs.get_job_status(job_id).value)
        if status in TERMINAL:
            return status
        time.sleep(poll_s)


def exit_code(status: str) -> int:
    return 0 if status == "SUCCEEDED" else 1


def list_jobs(address: str) -> list:
    return client(address).list_jobs()


def logs(address: str, job_id: str) -> str:
    return redact(client(address).get_job_logs(job_id))


def status(address: str, job_id: str) -> str:
    return str(client(address).get_job_status(job_id).value)


def stop(address: str, job_id: str) -> bool:
    return client(address).stop_job(job_id)
