"""Job: list, read and stop the Ray jobs of a cluster (`vlp3d jobs list|logs|stop`)."""

from __future__ import annotations

import argparse
import datetime

from vlp3d.jobs.common import add_logging_arguments, formatter, run_main
from vlp3d.jobs.submit import AUTH_EPILOG, add_address_argument, follow_to_the_end, resolve_address
from vlp3d.redact import redact
from vlp3d.table import format_table

EXIT_CODES = """exit codes:
  0  done (logs --follow: the job SUCCEEDED)
  1  logs --follow: the job FAILED or was STOPPED
  2  bad input (an unknown job id), the cluster unreachable, or the cluster refused the token
  3  an internal error (a bug in vlp3d): the traceback goes to a log file, the terminal says where"""


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = "The Ray jobs of a cluster (submitted with `vlp3d submit` or `ray job submit`)."
    parser.epilog = AUTH_EPILOG
    sub = parser.add_subparsers(dest="jobs_command", required=True, metavar="SUBCOMMAND")
    listing = sub.add_parser("list", help="every job: id, status, start, entrypoint", formatter_class=formatter())
    logs = sub.add_parser("logs", help="a job's logs so far, or --follow until it ends", formatter_class=formatter())
    logs.add_argument("job_id", metavar="JOB_ID")
    logs.add_argument("--follow", action="store_true", help="stream until the job ends; exit with its status")
    stop = sub.add_parser("stop", help="stop a running job", formatter_class=formatter())
    stop.add_argument("job_id", metavar="JOB_ID")
    for each in (listing, logs, stop):
        add_address_argument(each)
        add_logging_arguments(each, top_level=False)
        each.epilog = f"{AUTH_EPILOG}\n\n{EXIT_CODES}"
    return parser


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return datetime.datetime.fromtimestamp(ms / 1000).strftime("%Y-%m-%d %H:%M:%S")


def _short(text: str, width: int = 70) -> str:
    return text if len(text) <= width else text[: width - 1] + "…"


def run(args: argparse.Namespace) -> int:
    from vlp3d.platform import jobs

    address = resolve_address(args)
    if args.jobs_command == "list":
        rows = [[job.submission_id or job.job_id or "-", str(job.status.value), _when(job.start_time),
                 _short(redact(job.entrypoint or ""))]
                for job in sorted(jobs.list_jobs(address), key=lambda j: j.start_time or 0)]
        print(format_table(rows, ["job", "status", "started", "entrypoint"], title=redact(f"jobs at {address}")))
        return 0
    if args.jobs_command == "logs":
        if args.follow:
            return follow_to_the_end(address, args.job_id)
        print(jobs.logs(address, args.job_id), end="")
        return 0
    stopped = jobs.stop(address, args.job_id)
    print(f"job {args.job_id}: {'stop requested' if stopped else 'not running (nothing to stop)'}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
