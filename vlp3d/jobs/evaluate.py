"""Job: zero-shot classification and retrieval of a registered model on held-out shards."""

from __future__ import annotations

import argparse
import math

from vlp3d.config import DataConfig, EvalConfig
from vlp3d.jobs.common import add_tracking_arguments, run_main, tracking_uri_from
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
    parser.add_argument("--shards", required=True,
                        help="shards root written by `vlp3d prepare`: a folder or a URI (s3://bucket/shards)")
    data, evaluation = DataConfig(), EvalConfig()
    parser.add_argument("--split", default=data.eval_split,
                        help=f"split to evaluate (default: data.eval_split = {data.eval_split})")
    add_tracking_arguments(parser)
    parser.add_argument("--bootstrap", type=int, default=evaluation.bootstrap,
                        help=f"bootstrap resamples for CIs (default: eval.bootstrap = {evaluation.bootstrap}; 0 disables)")
    parser.add_argument("--labels", nargs="*", default=evaluation.labels,
                        help="labels to evaluate (default: eval.labels, empty = all with both classes)")
    parser.add_argument("--prompts", default=evaluation.prompts, metavar="FILE",
                        help="TOML file of extra prompt sets (default: eval.prompts, empty = the built-in sets "
                             "single, report, heldout)")
    parser.add_argument("--prompt-ensemble", nargs="+", default=list(evaluation.prompt_ensemble), metavar="SET",
                        help=f"prompt sets averaged for the reported zero-shot scores (default: eval.prompt_ensemble "
                             f"= {' '.join(evaluation.prompt_ensemble)}); every set is also scored alone")
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

    report = evaluate(args.model, args.shards, tracking_uri_from(args), split=args.split,
                      n_boot=args.bootstrap, labels=tuple(args.labels), log=not args.no_log,
                      prompts=args.prompts, prompt_ensemble=tuple(args.prompt_ensemble))
    print(render(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
