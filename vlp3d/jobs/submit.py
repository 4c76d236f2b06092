"""Job: submit a vlp3d command to a Ray cluster's Jobs API (`vlp3d submit -- pretrain ...`)."""

from __future__ import annotations

import argparse
import logging
import os

from vlp3d.errors import InputError
from vlp3d.jobs.commands import COMMANDS
from vlp3d.jobs.common import run_main
from vlp3d.redact import redact

log = logging.getLogger(__name__)
DEFAULT_ADDRESS = "http://127.0.0.1:8265"
PLANNED = ("pretrain", "finetune", "sweep")  # commands whose --dry-run plan `submit --dry-run` prints too  # = vlp3d.platform.jobs.DEFAULT_ADDRESS (no Ray import here)


API_SERVER_ENV, RAY_ADDRESS_ENV = "RAY_API_SERVER_ADDRESS", "RAY_ADDRESS"


def add_address_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", default=None,
                        help=f"the cluster's Jobs API (dashboard) URL (default: ${API_SERVER_ENV}, else "
                             f"${RAY_ADDRESS_ENV} as `ray job submit` reads it, else {DEFAULT_ADDRESS}, where "
                             "`ray dashboard cluster.yaml` tunnels it)")


def resolve_address(args: argparse.Namespace) -> str:
    """The Jobs API address, as `ray job submit` finds it: --address, else $RAY_API_SERVER_ADDRESS (the
    API server itself), else $RAY_ADDRESS (an http(s) URL is the dashboard; a cluster address, `auto`
    or `ray://...` is what ray.init() reads, and Ray's job client asks that cluster for its dashboard),
    else the local tunnel."""
    if args.address:
        address = args.address
        if "://" not in address and (address == "auto" or address.endswith(":6379")):
            raise InputError(f"--address {address!r}: give the Jobs API (dashboard) URL, e.g. "
                             "http://127.0.0.1:8265, not the cluster (GCS) address")
    elif os.environ.get(API_SERVER_ENV):
        address = os.environ[API_SERVER_ENV]
    elif os.environ.get(RAY_ADDRESS_ENV):
        return os.environ[RAY_ADDRESS_ENV]  # Ray's own rules resolve it (ray.dashboard.utils)
    else:
        return DEFAULT_ADDRESS
    return address if "://" in address else f"http://{address}"


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
        "Run a vlp3d command on a Ray cluster as a Ray job. Uploaded as the job's working directory: "
        "the package (vlp3d/), configs/, pyproject.toml, README.md and the files named with --include, "
        "nothing else; a file among them that looks like a secret or patient data (keys, credentials, "
        "DICOM, NIfTI, arrays, CSV/Parquet tables, stores) refuses the upload with its name. The upload is "
        "first on the job's PYTHONPATH, so the cluster runs the code you have here; the cluster needs "
        "vlp3d's dependencies installed (cluster.yaml does it). "
        "MLFLOW_TRACKING_URI and every --env NAME are passed from this environment (names are "
        "shown, values never). COMMAND is a vlp3d command (`pretrain configs/demo.toml ...`, run "
        "as `python -m vlp3d.cli ...`) or any other command line."
    )
    parser.epilog = AUTH_EPILOG
    add_address_argument(parser)
    parser.add_argument("--follow", action="store_true",
                        help="stream the job's logs until it ends and exit with its status")
    parser.add_argument("--runtime-env", metavar="FILE",
                        help="extra Ray runtime environment, a YAML/JSON file (a JSON object is also taken); its "
                             "env_vars add to vlp3d's, its excludes (name patterns) leave files out of the upload")
    parser.add_argument("--runtime-env-json", metavar="JSON",
                        help="extra Ray runtime environment as a JSON object (its keys win over --runtime-env's)")
    parser.add_argument("--include", metavar="PATH", action="append", default=[],
                        help="a file or folder of the working directory to upload too (repeatable), e.g. "
                             "benchmarks/bench_step.py; the deny-list applies to it")
    parser.add_argument("--submission-id", help="the job's id (default: Ray picks raysubmit_...)")
    parser.add_argument("--metadata-json", metavar="JSON", help="job metadata, a JSON object of strings")
    parser.add_argument("--entrypoint-num-cpus", type=float, metavar="N",
                        help="CPUs reserved for the entrypoint (the job's driver); default 0")
    parser.add_argument("--entrypoint-num-gpus", type=float, metavar="N",
                        help="GPUs reserved for the entrypoint; default 0")
    parser.add_argument("--entrypoint-memory", type=int, metavar="BYTES",
                        help="memory reserved for the entrypoint, in bytes")
    parser.add_argument("--entrypoint-resources", metavar="JSON",
                        help='custom resources for the entrypoint, a JSON object, e.g. \'{"head": 1}\'')
    parser.add_argument("--dry-run", action="store_true",
                        help="list the files that would be uploaded (and their total size), the entrypoint, the "
                             "address and the environment names, and exit without contacting the cluster")
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
                                       runtime_env=jobs.load_runtime_env(args.runtime_env, args.runtime_env_json),
                                       env_names=args.env, include=args.include, options=submit_options(args))
    upload = submission.upload
    if args.dry_run:
        for name in upload.files:
            print(f"  upload  {name}")
        print(f"dry run: would upload {len(upload.files)} files ({upload.size / 1024:.1f} KiB) from {upload.root} "
              f"to {address} and run: {submission.entrypoint}")
        print(f"  environment passed (values not shown): {', '.join(submission.env_names) or 'none'}")
        if submission.options:
            print(f"  options: {', '.join(f'{k}={v}' for k, v in submission.options.items())}")
        if command[:1] and command[0] in PLANNED:  # the job's own plan (as resolved on this machine)
            import importlib

            from vlp3d.jobs.commands import JOBS

            job = importlib.import_module(JOBS[command[0]][0])
            print("\nthe job's plan, resolved on this machine (paths as the cluster's nodes see them may differ):")
            return run_main(job.add_arguments, job.run, [*command[1:], "--dry-run"])
        return 0
    log.info("uploading %s: %d files, %.1f KiB (allow-list; --dry-run lists them)", upload.root,
             len(upload.files), upload.size / 1024)
    if submission.env_names:
        log.info("environment passed to the job (values not shown): %s", ", ".join(submission.env_names))
    else:
        log.warning("MLFLOW_TRACKING_URI is not set here: the job tracks into a local sqlite store "
                    "on the head node (set it to your MLflow server, reachable from the cluster)")
    job_id = jobs.submit(address, submission)
    print(redact(f"submitted job {job_id} to {address}: {submission.entrypoint}"))
    print(redact(f"  follow: vlp3d jobs logs {job_id} --follow --address {address}"))
    print(redact(f"  stop:   vlp3d jobs stop {job_id} --address {address}"))
    if not args.follow:
        return 0
    return follow_to_the_end(address, job_id)


def submit_options(args: argparse.Namespace) -> dict:
    """`ray job submit`'s options given on the command line, as JobSubmissionClient.submit_job kwargs."""
    from vlp3d.platform.jobs import json_object

    options = {"submission_id": args.submission_id, "entrypoint_num_cpus": args.entrypoint_num_cpus,
               "entrypoint_num_gpus": args.entrypoint_num_gpus, "entrypoint_memory": args.entrypoint_memory}
    for key, option, value in (("metadata", "--metadata-json", args.metadata_json),
                               ("entrypoint_resources", "--entrypoint-resources", args.entrypoint_resources)):
        if value is not None:
            options[key] = json_object(value, option, "not JSON; give an object, e.g. '{\"team\": \"ct\"}'")
    for key in ("entrypoint_num_cpus", "entrypoint_num_gpus", "entrypoint_memory"):
        if options[key] is not None and options[key] < 0:
            raise InputError(f"--{key.replace('_', '-')} {options[key]}: must be >= 0")
    return {key: value for key, value in options.items() if value is not None}


def follow_to_the_end(address: str, job_id: str) -> int:
    """Stream the logs; exit with the job's status. Ctrl-C stops following, not the job."""
    from vlp3d.platform import jobs

    try:
        status = jobs.follow(address, job_id)
    except KeyboardInterrupt:
        print(redact(f"\nstopped following; job {job_id} keeps running (vlp3d jobs stop {job_id} --address {address})"))
        return 1
    print(f"job {job_id} {status}")
    return jobs.exit_code(status)


def main(argv: list[str] | None = None) -> int:
    return run_main(add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
