"""Job: submit a vlp3d command to a Ray cluster's Jobs API (`vlp3d submit -- pretrain ...`)."""

from __future__ import annotations

import argparse
import logging
import os

from vlp3d.errors import InputError
from vlp3d.jobs.commands import COMMANDS
from vlp3d.jobs.common import run_main

log = logging.getLogger(__name__)
DEFAULT_ADDRESS = "http://127.0.0.1:8265"  # = vlp3d.platform.jobs.DEFAULT_ADDRESS (no Ray import here)


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help="the cluster's Jobs API (dashboard) URL (default: $RAY_ADDRESS, else "
                             "http://127.0.0.1:8265, where `ray dashboard cluster.yaml` tunnels it)")


def resolve_address(args: argparse.Namespace) -> str:
    address = args.address or os.environ.get("RAY_ADDRESS") or DEFAULT_ADDRESS
    if "://" not in address:
        if address == "auto" or address.endswith(":6379"):
            raise InputError(f"--address {address!r}: give the Jobs API (dashboard) URL, e.g. "
                             "http://127.0.0.1:8265, not the GCS address")
        address = f"http://{address}"
    return address


AUTH_EPILOG = """token authentication (clusters from cluster.yaml require it):
  export RAY_AUTH_MODE=token
  ray rsync-down cluster.yaml '~/.ray/auth_token' ~/.ray/vlp3d-cluster-token   # the head's token, over SSH
  export RAY_AUTH_TOKEN_PATH=~/.ray/vlp3d-cluster-token
  (or the token itself in RAY_AUTH_TOKEN, or in ~/.ray/auth_token; `ray get-auth-token` prints it on the head)"""
EXIT_CODES = """exit codes:
  0  submitted (with --follow: the job SUCCEEDED; with --dry-run: the upload would be accepted)
  1  with --follow: the job FAILED or was STOPPED
  2  bad input, a file the deny-list refuses, the cluster unreachable, or the cluster refused the token
     (the message says what to set)
  3  an internal error (a bug in vlp3d): the traceback goes to a log file, the terminal says where"""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "Run a vlp3d command on a Ray cluster as a Ray job. The checkout is uploaded as the job's "
        "working directory (without data, shards, runs, MLflow stores, virtualenvs, .git, caches "
        "and credential files) and is first on the job's PYTHONPATH, so the cluster runs the code "
        "you have here; the cluster needs vlp3d's dependencies installed (cluster.yaml does it). "
        "MLFLOW_TRACKING_URI and every --env NAME are passed from this environment (names are "
        "shown, values never). COMMAND is a vlp3d command (`pretrain configs/demo.toml ...`, run "
        "as `python -m vlp3d.cli ...`) or any other command line."
    )
    parser.epilog = AUTH_EPILOG
    add_address_argument(parser)
    parser.add_argument("--follow", action="store_true",
                        help="stream the job's logs until it ends and exit with its status")
    parser.add_argument("--runtime-env", metavar="FILE_OR_JSON",
                        help="extra Ray runtime environment (YAML/JSON file or a JSON object); "
                             "its excludes and env_vars add to vlp3d's")
    parser.add_argument("--env", metavar="NAME", action="append", default=[],
                        help="pass this environment variable's value to the job (repeatable), "
                             "e.g. MLFLOW_TRACKING_TOKEN or AWS_PROFILE")
    parser.add_argument("--working-dir", metavar="DIR",
                        help="folder uploaded as the job's working directory (default: this vlp3d checkout)")
    parser.add_argument("command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                        help="what the job runs, after --")
    return parser


def run(args: argparse.Namespace) -> int:
    from vlp3d.platform import jobs

    command = list(args.command)
    if command[:1] == ["--"]:
        command = command[1:]
    address = resolve_address(args)
    submission = jobs.build_submission(command, list(COMMANDS), working_dir=args.working_dir,
                                       runtime_env=jobs.load_runtime_env(args.runtime_env),
                                       env_names=args.env)
    log.info("uploading %s: %d files, %.1f MiB zipped", submission.runtime_env["working_dir"],
             submission.files, submission.zipped_bytes / 2**20)
    if submission.env_names:
        log.info("environment passed to the job (values not shown): %s", ", ".join(submission.env_names))
    else:
        log.warning("MLFLOW_TRACKING_URI is not set here: the job tracks into a local sqlite store "
                    "on the head node (set it to your MLflow server, reachable from the cluster)")
    job_id = jobs.submit(address, submission)
    print(f"submitted job {job_id} to {address}: {submission.entrypoint}")
    print(f"  follow: vlp3d jobs logs {job_id} --follow --address {address}")
    print(f"  stop:   vlp3d jobs stop {job_id} --address {address}")
    if not args.follow:
        return 0
    return follow_to_the_end(address, job_id)


def follow_to_the_end(address: str, job_id: str) -> int:
    """Stream the logs; exit with the job's status. Ctrl-C stops following, not the job."""
    from vlp3d.platform import jobs

    try:
        status = jobs.follow(address, job_id)
    except KeyboardInterrupt:
        print(f"\nstopped following; job {job_id} keeps running (vlp3d jobs stop {job_id} --address {address})")
        return 1
    print(f"job {job_id} {status}")
    return jobs.exit_code(status)


def main(argv: list[str] | None = None) -> int:
    return run_main(add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
