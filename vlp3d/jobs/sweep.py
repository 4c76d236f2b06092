"""Job: a Ray Tune sweep over config keys, scaling-law fits and plots, tracked in MLflow."""

from __future__ import annotations

import argparse
import math
import os

from vlp3d.errors import InputError
from vlp3d.jobs.common import (
    add_config_arguments,
    config_keys_epilog,
    resolve_config,
    resolve_config_with_sources,
    run_main,
    run_store,
)
from vlp3d.jobs.plan import add_dry_run_argument, config_text, print_plan, resources, training_rows
from vlp3d.table import format_table


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.description = (
        "Sweep the [tune] section of CONFIG with Ray Tune: tune.space gives config keys and their values "
        "(data.fraction, model.size, model.image_encoder, objective.align_weight, objective.mg3d.mim_weight, train.lr, train.seed, ...), "
        "tune.variants named groups of keys set together. Each trial pretrains on Ray Train (cluster.* "
        "workers), reports its validation loss every train.val_every steps (tune.scheduler = 'asha' stops "
        "poor trials on it) and is evaluated on data.eval_split like `vlp3d evaluate`. MLflow: one parent "
        "run per sweep (search space, trial table, fits, plots), one child run per trial. Trials are selected on "
        "data.eval_split and every reported figure is on tune.report_split ('test'; carved from data.eval_split's "
        "patients when the shards have none). At the end, 1 - AUROC = E + A/x^alpha is fitted in log space (Huber "
        "loss; 95% bootstrap intervals over trials and evaluation examples) over trained parameters N, volumes seen "
        "D and FLOPs C, jointly over N and D with the compute-optimal allocation, each with an extrapolation check. "
        "Output: <tracking.workdir>/sweeps/NAME/ (report.txt, trials.csv/.parquet, fits.csv, plots/*.png). "
        "`vlp3d sweep report NAME` re-fits a finished sweep from what it stored, without running a trial."
    )
    parser.epilog = config_keys_epilog()
    add_config_arguments(parser, config_required=False)
    parser.add_argument("--name", help="sweep name (default: <config name>-sweep-<date-time>); names its folder "
                                       "and MLflow parent run")
    parser.add_argument("--resume", metavar="NAME",
                        help="continue the interrupted sweep NAME (in tracking.workdir; or give its folder, "
                             "<workdir>/sweeps/NAME) with the config it started with: finished trials are kept, "
                             "unfinished ones resume from their last checkpoint")
    add_dry_run_argument(parser, help="print the resolved config (where each value came from) and the plan (the "
                                      "search space, the number of trials, each trial's steps, epochs and FLOPs, "
                                      "Ray resources, the sweep folder and MLflow store) and exit: nothing is "
                                      "started, written or logged")
    return parser


def _fmt(value, digits: int = 3) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"


def render(result) -> str:
    """The summary a user reads at the end of `vlp3d sweep` (and `vlp3d sweep report`): the sweep's report
    (trials, laws with intervals, extrapolation, allocation), then where everything is."""
    table = result.table
    keys = [k for k in result.display_keys if k in table]
    if "finetune.init" in table:  # a label-efficiency sweep (tune.trial = 'finetune')
        return render_finetune(result, keys)
    rows = []
    for record in table.to_dict("records"):
        auroc = record.get("macro_auroc", math.nan)
        interval = (f"{_fmt(auroc)} [{_fmt(record.get('macro_auroc_ci_low'))}, "
                    f"{_fmt(record.get('macro_auroc_ci_high'))}]")
        epochs = record.get("epochs", math.nan)
        rows.append([record["trial_id"], record["status"], *(record[k] for k in keys), record["n_train"],
                     f"{_fmt(epochs, 1)}{' (repeated)' if record.get('repeated') else ''}",
                     _fmt(record.get("trainable_params", math.nan) / 1e6, 2), f"{record['train_flops']:.2e}",
                     _fmt(record.get("select_macro_auroc")), interval, _fmt(record.get("v2r_r5")),
                     f"{record['wall_s']:.0f} s"])
    lines = [format_table(rows, ["trial", "status", *keys, "unique vols", "epochs", "trained M", "FLOPs",
                                 f"AUROC {result.select_split}", f"AUROC {result.report_split} [95% CI]",
                                 "v->r R@5", "wall"],
                          title=f"sweep {result.name}: trials (selected on '{result.select_split}', reported on "
                                f"'{result.report_split}'; retrieval pool {_pool(table)})")]
    laws = [line for law in result.laws for line in law.lines()]
    lines.append("\n".join([f"scaling laws of 1 - macro AUROC on '{result.report_split}' (95% bootstrap intervals):",
                             *laws]) if laws else
                 "scaling laws: none (tune.space varies neither model.size nor train.max_steps / train.global_batch)")
    return "\n\n".join(lines + _footer(result, table))


def render_finetune(result, keys: list[str]) -> str:
    """Summary of a fine-tuning sweep: per trial its evaluation (Dice per class or AUROC), then where the
    label-efficiency plot is."""
    table = result.table
    scores = [c for c in table.columns if c.startswith("eval_") and "hd95" not in c and "_atlas" not in c
              and "_everywhere" not in c] or [c for c in ("macro_auroc",) if c in table]
    rows = [[r["trial_id"], r["status"], *(r[k] for k in keys), r["n_train"], *(_fmt(r.get(c)) for c in scores),
             f"{r['wall_s']:.0f} s"] for r in table.to_dict("records")]
    lines = [format_table(rows, ["trial", "status", *keys, "labelled volumes",
                                 *(c.removeprefix("eval_") for c in scores), "wall"],
                          title=f"sweep {result.name}: fine-tuning trials (held-out split)")]
    return "\n\n".join(lines + _footer(result, table))


def _footer(result, table) -> list[str]:
    """The end of a sweep summary: failed trials, the best one, timing, where plots and runs are."""
    lines = []
    failed = table[table["status"] == "error"] if len(table) else table
    if len(failed):
        lines.append(format_table(failed[["trial_id", "label", "error"]].values.tolist(), ["trial", "config", "error"],
                                  title="failed trials (their Ray logs are in the sweep folder's trial folders)"))
    if result.best_trial:
        where = f" (selected on '{result.select_split}')" if getattr(result, "select_split", "") else ""
        lines.append(f"best trial{where}: {result.best_trial}")
    lines.append(f"{len(table)} trials in {result.elapsed_s:.0f} s; folder {result.folder}")
    lines.append("plots:   " + ", ".join(str(p.name) for p in result.figures) + f" (in {result.folder / 'plots'})")
    lines.append(f"mlflow:  parent run {result.parent_run_id}; mlflow ui --backend-store-uri {result.tracking_uri}")
    return lines


def _pool(table) -> str:
    pools = sorted({int(p) for p in table.get("retrieval_pool", []) if p == p})
    return ", ".join(map(str, pools)) or "-"


REPORT = "report"  # `vlp3d sweep report NAME [overrides]`: re-fit a finished sweep from what it stored


def run(args: argparse.Namespace) -> int:
    if args.config == REPORT and not os.path.exists(REPORT):
        from vlp3d.platform.sweep import report_sweep, stored_config

        if not args.overrides or "=" in args.overrides[0]:
            raise InputError("vlp3d sweep report NAME: give the sweep's name (or its folder, "
                             "<tracking.workdir>/sweeps/NAME), e.g. vlp3d sweep report scaling-demo "
                             "tracking.workdir=vlp3d-runs/demo")
        name, overrides = args.overrides[0], args.overrides[1:]
        workdir = resolve_config(argparse.Namespace(config=None, overrides=overrides)).tracking.workdir
        cfg, name = stored_config(workdir, name)
        result = report_sweep(cfg, name)
        print("\n" + render(result))
        return 0
    cfg, sources = resolve_config_with_sources(args)
    if args.dry_run and not args.resume:
        return dry_run(args, cfg, sources)
    from vlp3d.platform.sweep import run_sweep, stored_config

    name = args.name
    if args.resume:
        if args.name:
            raise InputError(f"--name {args.name} and --resume {args.resume}: pass only --resume NAME.")
        cfg, name = stored_config(cfg.tracking.workdir, args.resume)
        print(f"resuming sweep {name} with the config it started with")
    if args.dry_run:
        return dry_run(args, cfg, {})
    run_store(cfg, args, sources)
    result = run_sweep(cfg, name=name, resume=bool(args.resume))
    print("\n" + render(result))
    finished = (result.table["status"] == "finished").sum() if len(result.table) else 0
    return 0 if finished else 1  # a sweep in which no trial finished is a failed job


def dry_run(args: argparse.Namespace, cfg, sources: dict[str, str]) -> int:
    """The sweep's config and plan; nothing started (no Ray, no MLflow run, no folder)."""
    from pathlib import Path

    from vlp3d.search_space import parse_space, planned_trials

    print(config_text(cfg, sources, args.config))
    space = parse_space(cfg.tune.space, cfg.tune.variants)
    axes = [[d.key, f"{d.kind} {list(d.values)}"] for d in space.dimensions]
    trials = planned_trials(cfg, space)
    steps_key, batch_key = ("finetune.max_steps", "finetune.global_batch") if cfg.tune.trial == "finetune" else \
        ("train.max_steps", "train.global_batch")
    trial = cfg.finetune if cfg.tune.trial == "finetune" else cfg.train
    rows = training_rows(cfg, trial.max_steps, trial.global_batch, cfg.data.fraction, steps_key, batch_key)
    folder = Path(cfg.tracking.workdir, "sweeps", args.resume or args.name or f"{cfg.name}-sweep-<date-time>")
    print_plan("sweep", [
        *([f"space: {key}", values] for key, values in axes),
        ["trials", f"{trials} ({cfg.tune.search} search, tune.num_samples = {cfg.tune.num_samples}), "
                   f"each {cfg.tune.trial}s then is evaluated on {cfg.data.eval_split}"],
        *([f"per trial: {k}", v] for k, v in rows if k != "Ray resources"),
        ["Ray resources", f"per trial {resources(cfg)}, + {cfg.tune.trial_cpus:g} CPU for its driver; "
                          f"{cfg.tune.max_concurrent_trials or 'as many as fit'} at once"],
        ["sweep folder", str(folder)],
        *run_store(cfg, args, sources, dry_run=True),
    ])
    return 0


def main(argv: list[str] | None = None) -> int:
    return run_main(add_arguments, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
