"""Job: give a registered model version an alias (champion/challenger by a metric)."""

from __future__ import annotations

import argparse

from vlp3d.config import DataConfig
from vlp3d.jobs.common import add_tracking_arguments, run_main, tracking_uri_from


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "Point an alias (default 'champion') at a registered model version if it beats the current holder "
        "on --metric (higher is better), so downstream code can load models:/NAME@champion."
    )
    parser.add_argument("--model", required=True, help="registered version, models:/NAME/VERSION")
    parser.add_argument("--alias", default="champion", help="alias to set (default: champion)")
    metric = f"eval/{DataConfig().eval_split}/macro_auroc"
    parser.add_argument("--metric", default=metric,
                        help=f"run metric compared with the current holder, higher is better (default: {metric}, "
                             "i.e. data.eval_split's zero-shot macro AUROC as `vlp3d evaluate` logs it)")
    parser.add_argument("--force", action="store_true", help="set the alias whatever the metric says")
    add_tracking_arguments(parser)
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
