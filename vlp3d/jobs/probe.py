"""Job: linear probes on a model's frozen image features against the same architecture untrained."""

from __future__ import annotations

import argparse

from vlp3d.config import DataConfig, EvalConfig
from vlp3d.jobs.common import (
    add_tracking_arguments,
    given,
    run_main,
    shards_from,
    store_config,
    tracking_uri_from,
)
from vlp3d.table import format_table


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "Label efficiency of the pretrained image features: per finding, a logistic regression (scikit-learn, "
        "features standardised, C chosen on a validation fold of the training patients) on the frozen image "
        "embeddings of --train-split at each label fraction (nested subsets of patients, as data.fraction), "
        "tested on --split, for the model and for the same architecture randomly initialised. AUROC with 95% "
        "intervals resampled by patient; a finding without a positive or a negative in a fraction is skipped "
        "with the reason. The table, the per-finding table and the plot are logged to the model's run."
    )
    parser.add_argument("--model", required=True, help="MLflow model URI, e.g. models:/vlp3d-clip@champion")
    parser.add_argument("--shards", help="shards root written by `vlp3d prepare` (default: the config's data.shards)")
    data, evaluation = DataConfig(), EvalConfig()
    parser.add_argument("--train-split",
                        help=f"split the probes train on (default: the config's data.train_split, {data.train_split})")
    parser.add_argument("--split",
                        help=f"split the probes are tested on (default: the config's data.eval_split, {data.eval_split})")
    parser.add_argument("--fractions", type=float, nargs="+",
                        metavar="F", help="shares of the training split's labels, each in (0, 1] (default: the "
                                          "config's eval.probe_fractions, "
                                          f"{' '.join(f'{f:g}' for f in evaluation.probe_fractions)})")
    parser.add_argument("--bootstrap", type=int,
                        help=f"bootstrap resamples of the test patients (default: the config's eval.bootstrap, "
                             f"{evaluation.bootstrap})")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the random initialisation, the validation folds and the bootstrap (default 0)")
    parser.add_argument("--batch-size", type=int,
                        help=f"volumes per forward pass (default: the config's eval.batch_size, {evaluation.batch_size})")
    add_tracking_arguments(parser)
    parser.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    return parser


def render(report) -> str:
    rows = [[r.features, f"{r.fraction:.0%}", r.train_volumes, r.auroc,
             f"[{r.auroc_ci_low:.3f}, {r.auroc_ci_high:.3f}]" if r.auroc_ci_low == r.auroc_ci_low else "",
             int(r.labels), r.skipped or ""] for r in report.table.itertuples()]
    text = format_table(rows, ["features", "labels", "train volumes", "macro AUROC", "95% CI", "findings", "note"],
                        title=f"linear probe: trained on '{report.train_split}', tested on '{report.split}'")
    per_label = report.per_label[(report.per_label["label"] != "macro")
                                 & (report.per_label["features"] == report.per_label["features"].iloc[0])]
    fractions = per_label["fraction"].nunique()
    never, partly = [], []
    for label, rows in per_label.groupby("label", sort=False):
        skipped = rows[rows["skipped"] != ""]
        if len(skipped) == fractions:
            never.append(label)
        elif len(skipped):
            shares = ", ".join(f"{f:.0%}" for f in skipped["fraction"])
            partly.append(f"{label} at {shares} ({skipped['skipped'].iloc[-1]})")
    if partly:
        text += "\n\nskipped at some fractions: " + "; ".join(partly)
    if never:
        text += (f"\n\nnot probed at any fraction ({len(never)} findings without a positive or a negative in the "
                 f"training fraction or the test split): " + ", ".join(never))
    return text


def run(args: argparse.Namespace) -> int:
    from vlp3d.platform.evaluate import probe

    cfg = store_config(args)
    report = probe(args.model, shards_from(args, cfg), tracking_uri_from(args),
                   train_split=given(args.train_split, cfg.data.train_split),
                   split=given(args.split, cfg.data.eval_split),
                   fractions=tuple(given(args.fractions, cfg.eval.probe_fractions)),
                   batch_size=given(args.batch_size, cfg.eval.batch_size),
                   n_boot=given(args.bootstrap, cfg.eval.bootstrap), seed=args.seed, log=not args.no_log)
    print(render(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
