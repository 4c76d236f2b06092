"""Job: move a registered model's `champion` alias to a version only if it is better beyond chance."""

from __future__ import annotations

import argparse

from vlp3d.config import DataConfig
from vlp3d.jobs.common import (
    add_tracking_arguments,
    given,
    run_main,
    store_config,
    tracking_uri_from,
)

PROMOTION_BOOTSTRAP = 1000


def add_comparison_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of a promotion (shared by `promote` and `register`)."""
    from vlp3d.evaluation.zeroshot import PAIRED_METRICS

    data = DataConfig()
    parser.add_argument("--shards",
                        help="shards root written by `vlp3d prepare`, where both versions are evaluated (default: "
                             "the config's data.shards; needed unless nobody holds the alias yet or with --force)")
    parser.add_argument("--split",
                        help=f"split both versions are scored on (default: the config's data.eval_split, "
                             f"{data.eval_split}); patients either model pretrained on are refused")
    parser.add_argument("--metric", default="macro_auroc", choices=PAIRED_METRICS, metavar="METRIC",
                        help="what is compared, higher is better: zero-shot macro_auroc (default) or a retrieval "
                             f"metric ({', '.join(PAIRED_METRICS[1:])})")
    parser.add_argument("--alias", default="champion", help="alias to move (default: champion)")
    parser.add_argument("--bootstrap", type=int, default=PROMOTION_BOOTSTRAP,
                        help=f"paired bootstrap resamples of the patients (default {PROMOTION_BOOTSTRAP})")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed (default 0)")
    parser.add_argument("--batch-size", type=int, help="volumes per forward pass (default: the config's "
                                                       "eval.batch_size, 32)")
    parser.add_argument("--force", action="store_true",
                        help="move the alias without comparing (recorded as forced on the version)")
    add_tracking_arguments(parser)


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "Evaluate a challenger version and the version holding the alias (default 'champion') on the same "
        "split, and move the alias only if the challenger is better beyond the 95% paired bootstrap interval "
        "of the difference (patients resampled together for both models; the lower bound must be above 0). "
        "With no holder, the challenger gets the alias. The decision (both figures, the difference and its "
        "interval, the split and its hash) is recorded as tags vlp3d.promotion.* of the challenger version "
        "and in its model card. Exit code 0 whether the alias moved or stayed (the decision is the result: "
        "printed and recorded), 2 for bad input (an unknown model or version, shards that do not fit)."
    )
    parser.add_argument("name", help="registered model name, e.g. vlp3d-clip")
    parser.add_argument("--challenger", required=True, metavar="VERSION", help="version to promote, e.g. 2")
    add_comparison_arguments(parser)
    return parser


def decide(args: argparse.Namespace, name: str, version: str) -> int:
    from vlp3d.platform.evaluate import promote

    cfg = store_config(args)
    moved, message = promote(tracking_uri_from(args), name, version, shards=given(args.shards, cfg.data.shards),
                             split=given(args.split, cfg.data.eval_split), metric=args.metric, alias=args.alias,
                             batch_size=given(args.batch_size, cfg.eval.batch_size), n_boot=args.bootstrap,
                             seed=args.seed, force=args.force, prompts=cfg.eval.prompts,
                             prompt_ensemble=cfg.eval.prompt_ensemble)
    print(message)
    return 0  # keeping the champion is a decision, not a failure


def run(args: argparse.Namespace) -> int:
    return decide(args, args.name, args.challenger)


def main(argv: list[str] | None = None) -> int:
    return run_main(add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
