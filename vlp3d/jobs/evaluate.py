"""Job: zero-shot classification and retrieval of a registered model on held-out shards."""

from __future__ import annotations

import argparse
import math

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
        "Evaluate a model on a held-out split: zero-shot multi-label AUROC per finding and macro (prompts "
        "'There is a X.' / 'There is no X.'), F1, bootstrap 95% CIs, and volume<->report Recall@1/5/10 and "
        "MAP with the pool size. Metrics and tables are logged to the model's MLflow run; a registered model also "
        "gets ROC and reliability plots and its model card (version description and tags) rewritten. A split "
        "holding any patient the model pretrained on is refused."
    )
    parser.add_argument("--model", required=True, help="MLflow model URI, e.g. models:/vlp3d-clip@champion or runs:/ID/model")
    parser.add_argument("--shards",
                        help="shards root written by `vlp3d prepare`: a folder or a URI (s3://bucket/shards) "
                             "(default: the config's data.shards)")
    data, evaluation = DataConfig(), EvalConfig()
    parser.add_argument("--split",
                        help=f"split to evaluate (default: the config's data.eval_split, {data.eval_split})")
    add_tracking_arguments(parser)
    parser.add_argument("--bootstrap", type=int,
                        help=f"bootstrap resamples for CIs (default: the config's eval.bootstrap, {evaluation.bootstrap}; "
                             "0 disables)")
    parser.add_argument("--labels", nargs="*",
                        help="labels to evaluate (default: the config's eval.labels, empty = all with both classes)")
    parser.add_argument("--prompts", metavar="FILE",
                        help="TOML file of extra prompt sets (default: the config's eval.prompts, empty = the built-in "
                             "sets single, report, heldout)")
    parser.add_argument("--prompt-ensemble", nargs="+", metavar="SET",
                        help=f"prompt sets averaged for the reported zero-shot scores (default: the config's "
                             f"eval.prompt_ensemble, {' '.join(evaluation.prompt_ensemble)}); every set is also scored alone")
    parser.add_argument("--no-log", action="store_true", help="do not log to MLflow")
    return parser


def render(report) -> str:
    r = report.result
    rows = [[row.label, row.auroc, f"[{row.auroc_ci_low:.3f}, {row.auroc_ci_high:.3f}]", row.f1, row.positives]
            for row in r.per_label.itertuples()]
    ci = ""
    if not math.isnan(r.metrics.get("macro_auroc_ci_low", math.nan)):
        ci = f"[{r.metrics['macro_auroc_ci_low']:.3f}, {r.metrics['macro_auroc_ci_high']:.3f}]"
    rows.append(["macro", r.metrics["macro_auroc"], ci, r.metrics["macro_f1"], ""])
    text = format_table(rows, ["finding", "AUROC", "95% CI", "F1", "positives"],
                        title=f"zero-shot classification, split '{report.split}' (n={r.n})")
    if r.prompt_sets is not None:
        text += "\n\n" + format_table(r.prompt_sets[["prompts", "macro_auroc"]].values.tolist(),
                                      ["prompts", "macro AUROC"], title="zero-shot macro AUROC by prompt set")
    retrieval = r.retrieval[["direction", "R@1", "R@5", "R@10", "MAP"]].values.tolist()
    text += "\n\n" + format_table(retrieval, ["retrieval", "R@1", "R@5", "R@10", "MAP"],
                                  title=f"retrieval, pool size {int(r.metrics['retrieval_pool'])}")
    return text


def run(args: argparse.Namespace) -> int:
    from vlp3d.platform.evaluate import evaluate

    cfg = store_config(args)
    report = evaluate(args.model, shards_from(args, cfg), tracking_uri_from(args),
                      split=given(args.split, cfg.data.eval_split), n_boot=given(args.bootstrap, cfg.eval.bootstrap),
                      labels=tuple(given(args.labels, cfg.eval.labels)), log=not args.no_log,
                      prompts=given(args.prompts, cfg.eval.prompts),
                      prompt_ensemble=tuple(given(args.prompt_ensemble, cfg.eval.prompt_ensemble)))
    print(render(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
