"""Job: give a registered model version an alias (champion/challenger by a metric)."""

from __future__ import annotations

import argparse

from vlp3d.jobs.common import run_main
from vlp3d.jobs.evaluate import tracking_uri_from


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "Point an alias (default 'champion') at a registered model version if it beats the current holder "
        "on --metric (higher is better), so downstream code can load models:/NAME@champion."
    )
    parser.add_argument("--model", required=True, help="registered version, models:/NAME/VERSION")
    parser.add_argument("--alias", default="champion", help="alias to set (default: champion)")
    parser.add_argument("--metric", default="eval/valid/macro_auroc", help="run metric compared with the current holder")
    parser.add_argument("--force", action="store_true", help="set the alias whatever the metric says")
    parser.add_argument("--workdir", default="vlp3d-runs/default", help="workdir of the local MLflow store")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the workdir store)")
    return parser


def run(args: argparse.Namespace) -> int:
    from vlp3d.platform.tracking import promote

    changed, message = promote(tracking_uri_from(args), args.model, args.alias, args.metric, args.force)
    print(message)
    return 0 if changed else 1


def main(argv: list[str] | None = None) -> int:
    return run_main(add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
