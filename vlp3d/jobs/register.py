"""Job: `vlp3d promote` for a model URI (models:/NAME/VERSION): the same comparison and rule."""

from __future__ import annotations

import argparse

from vlp3d.errors import InputError
from vlp3d.jobs.common import run_main
from vlp3d.jobs.promote import add_comparison_arguments, decide


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "Point an alias (default 'champion') at a registered model version: `vlp3d promote NAME --challenger "
        "VERSION` for a model URI. The version must beat the current holder on --metric beyond the 95% paired "
        "bootstrap interval of the difference on --split of --shards (or nobody holds the alias, or --force)."
    )
    parser.add_argument("--model", required=True, help="registered version, models:/NAME/VERSION")
    add_comparison_arguments(parser)
    return parser


def run(args: argparse.Namespace) -> int:
    reference = args.model.removeprefix("models:/")
    if "/" not in reference or not args.model.startswith("models:/"):
        raise InputError(f"--model {args.model}: give a registered version as models:/NAME/VERSION")
    name, version = reference.rsplit("/", 1)
    return decide(args, name, version)


def main(argv: list[str] | None = None) -> int:
    return run_main(add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
