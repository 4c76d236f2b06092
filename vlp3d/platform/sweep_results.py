"""What a sweep leaves: every trial evaluated on the selection split (for Tune, the best trial, early
stopping) and on the report split (every figure the sweep reports), the trial table, the scaling laws
with their intervals, extrapolation check and allocation, the plots, and all of it on the sweep's MLflow
parent run. `report` does the same from what a finished sweep stored, without running a trial."""

from __future__ import annotations

import json
import logging
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from vlp3d import storage
from vlp3d.config import ExperimentConfig, get_key
from vlp3d.data.shards import count_rows, resolve_shard_dir, spec_from_config
from vlp3d.data.splits import parse_split
from vlp3d.evaluation.metrics import macro_auroc_replicates
from vlp3d.evaluation.scaling import (
    REPLICATES_COLUMN,
    add_data_columns,
    fits_table,
    scaling_results,
)
from vlp3d.objectives import objective_class
from vlp3d.platform.evaluate import evaluate_as_configured
from vlp3d.platform.mlflow import models, runs, store
from vlp3d.platform.runtime import checkpoint_location
from vlp3d.redact import scrub
from vlp3d.search_space import VARIANT, SearchSpace, apply_params, trial_label

log = logging.getLogger(__name__)

# what a trial reports (besides its train metrics): its evaluation on the selection split as eval/<metric>
# (what tune.metric names), on the report split as report/<metric>
EVAL_PREFIX = "eval/"
REPORT_PREFIX = "report/"
# trial table column <- evaluation metric (MLflow child runs hold them as eval/<split>/<metric>)
EVAL_COLUMNS = {
    "macro_auroc": "macro_auroc", "macro_auroc_ci_low": "macro_auroc_ci_low",
    "macro_auroc_ci_high": "macro_auroc_ci_high", "macro_f1": "macro_f1",
    "v2r_r1": "v2r/recall_at_1", "v2r_r5": "v2r/recall_at_5", "v2r_r10": "v2r/recall_at_10", "v2r_map": "v2r/map",
    "r2v_r1": "r2v/recall_at_1", "r2v_r5": "r2v/recall_at_5", "r2v_r10": "r2v/recall_at_10", "r2v_map": "r2v/map",
    "retrieval_pool": "retrieval_pool",
}
SELECT_PREFIX = "select_"  # trial-table columns of the selection split's evaluation
ALWAYS_COLUMNS = ("model.image_encoder", "model.size", "data.fraction", "train.seed")
REPLICATES_FILE = "macro_auroc_replicates"  # eval/<report split>_macro_auroc_replicates.csv on a child run


@dataclass
class SweepResult:
    name: str
    parent_run_id: str
    tracking_uri: str
    folder: Path
    table: pd.DataFrame
    fits: pd.DataFrame
    varied: list[str]
    display_keys: list[str] = field(default_factory=list)  # the columns a terminal summary shows
    figures: list[Path] = field(default_factory=list)
    best_trial: str = ""
    elapsed_s: float = 0.0
    laws: list = field(default_factory=list)  # vlp3d.evaluation.scaling.ScalingResult
    select_split: str = ""
    report_split: str = ""
    report: str = ""  # the text of report.txt: trials, laws with intervals, extrapolation, allocation


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def final_metrics(train_metrics: dict, evaluation: dict, run_id: str, reported: dict | None = None) -> dict:
    """What a trial reports to Tune at its end: train metrics, eval/<metric> of the selection split,
    report/<metric> of the report split (with the evaluation's bootstrap replicates), its run id."""
    out = {k: v for k, v in train_metrics.items() if isinstance(v, int | float)}
    out.update({EVAL_PREFIX + k: v for k, v in evaluation.items()})
    out.update(reported or {})
    out["mlflow_run_id"] = run_id
    return out


def evaluate_for_report(cfg: ExperimentConfig, model_uri: str, run_id: str, split: str) -> dict:
    """The trial's model on the report split, logged to its run as eval/<split>/..., with the macro AUROC
    of `eval.bootstrap` patient resamples (the same resamples for every trial: the fit's bootstrap redraws
    the evaluation set through them) logged as a table: report/<metric> for Tune."""
    report = evaluate_as_configured(cfg, model_uri, split=split)
    result = report.result
    replicates: list[float] = []
    if result.targets is not None and report.patients is not None and cfg.eval.bootstrap > 0:
        replicates = macro_auroc_replicates(result.targets, result.probabilities, report.patients,
                                            cfg.eval.bootstrap, seed=0).tolist()
        runs.log_evaluation(run_id, store.uri(cfg), {}, {
            f"{parse_split(split).key}_{REPLICATES_FILE}": pd.DataFrame({"macro_auroc": replicates})})
    return {**{REPORT_PREFIX + k: v for k, v in result.metrics.items()}, REPORT_PREFIX + REPLICATES_COLUMN: replicates}


def _logged(run, split: str) -> dict:
    prefix = f"eval/{parse_split(split).key}/"
    return {k.removeprefix(prefix): v for k, v in run.data.metrics.items() if k.startswith(prefix)}


def _logged_replicates(uri: str, run_id: str, split: str) -> list[float]:
    name = f"eval/{parse_split(split).key}_{REPLICATES_FILE}.csv"
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = store.client(uri).download_artifacts(run_id, name, tmp)
            return pd.read_csv(path)["macro_auroc"].astype(float).tolist()
    except Exception:  # noqa: BLE001 - a run evaluated before replicates were kept: the fit goes without them
        return []


def stored_trial(cfg: ExperimentConfig, run, report_split: str) -> dict | None:
    """The final metrics of a trial whose child run already finished and was evaluated on both splits (a
    trial that Tune reruns because the driver died before recording its end), else None."""
    if run is None or run.info.status != "FINISHED":
        return None
    selected, reported = _logged(run, cfg.data.eval_split), _logged(run, report_split)
    if "macro_auroc" not in selected or "macro_auroc" not in reported:
        return None
    metrics = run.data.metrics
    train = {k: v for k, v in metrics.items() if k.startswith("val/")}
    train.update({k.removeprefix("compute/"): float(v) for k, v in run.data.params.items() if k.startswith("compute/")})
    train["step"] = cfg.train.max_steps
    replicates = _logged_replicates(store.uri(cfg), run.info.run_id, report_split)
    return final_metrics(train, selected, run.info.run_id,
                         {**{REPORT_PREFIX + k: v for k, v in reported.items()},
                          REPORT_PREFIX + REPLICATES_COLUMN: replicates})


def _cell(value: Any) -> Any:
    """Config values as table cells: sequences as JSON text, so every column groups and sorts."""
    return json.dumps(list(value)) if isinstance(value, list | tuple) else value


def table_column(metric: str) -> str:
    """The trial-table column of a reported metric: eval/v2r/recall_at_5 -> v2r_r5, val/loss -> val_loss."""
    columns = {EVAL_PREFIX + key: column for column, key in EVAL_COLUMNS.items()}
    return columns.get(metric, metric.replace("/", "_"))


def selection_column(metric: str) -> str:
    """The column the best trial is picked on: an evaluation metric's selection-split column."""
    column = table_column(metric)
    return SELECT_PREFIX + column if metric.startswith(EVAL_PREFIX) and column in EVAL_COLUMNS else column


def _row_metrics(metrics: dict, prefix: str) -> dict:
    return {column: metrics.get(prefix + key, math.nan) for column, key in EVAL_COLUMNS.items()}


def _finish_stopped(cfg: ExperimentConfig, run_name: str, history: pd.DataFrame | None,
                    report_split: str) -> tuple[str, dict, dict]:
    """A trial the scheduler stopped: log its last checkpoint as the child run's model, evaluate it on both
    splits (once: a resumed sweep finds the evaluation in MLflow) and close the run as KILLED.
    Returns (child run id, selection-split evaluation, report-split metrics as report/<metric>)."""
    run = store.find_run(cfg, store.RUN_NAME_TAG, run_name)
    if run is None:
        return "", {}, {}
    run_id = run.info.run_id
    selected, reported = _logged(run, cfg.data.eval_split), _logged(run, report_split)
    if "macro_auroc" in selected and "macro_auroc" in reported:
        return run_id, selected, {REPORT_PREFIX + k: v for k, v in reported.items()}
    paths = history["checkpoint_path"].dropna() if history is not None and "checkpoint_path" in history else []
    selected, reported = {}, {}
    if len(paths):
        # the path on tracking.storage's filesystem (a remote checkpoint is logged from a download)
        with storage.local_folder(checkpoint_location(cfg, paths.iloc[-1])) as local:
            model_uri = models.finish_training(run_id, cfg, local, {}, register=False, status="KILLED")
        selected = evaluate_as_configured(cfg, model_uri).result.metrics
        reported = evaluate_for_report(cfg, model_uri, run_id, report_split)
    runs.end_run(store.uri(cfg), run_id, "KILLED", {runs.TRIAL_STATUS_TAG: "stopped"})
    return run_id, selected, reported


def collect(grid, cfg: ExperimentConfig, space: SearchSpace, sweep_name: str, report_split: str
            ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trial table, validation curves) from Tune's results: config values, unique volumes, volumes seen and
    epochs, parameters, FLOPs, wall time, status, the report split's evaluation (with its replicates) and the
    selection split's (`select_*`) of every trial (stopped ones evaluated here)."""
    config_columns = space.keys  # every key the space or a variant sets, varied or not
    rows, curves, counts = [], [], {}
    for result in grid:
        metrics = dict(result.metrics or {})
        params = dict(result.config)
        trial_cfg = apply_params(cfg, params, space)
        trial_id = str(metrics.get("trial_id") or Path(result.path).name)
        history = result.metrics_dataframe
        evaluated = any(str(k).startswith(EVAL_PREFIX) for k in metrics)
        status = "error" if result.error else ("finished" if evaluated else "stopped")
        selected, reported = _row_metrics(metrics, EVAL_PREFIX), _row_metrics(metrics, REPORT_PREFIX)
        replicates = metrics.get(REPORT_PREFIX + REPLICATES_COLUMN) or []
        run_id = metrics.get("mlflow_run_id", "")
        if status == "stopped":
            run_id, stopped, stopped_report = _finish_stopped(trial_cfg, trial_run_name(sweep_name, trial_id),
                                                              history, report_split)
            selected, reported = _row_metrics(stopped, ""), _row_metrics(stopped_report, REPORT_PREFIX)
            replicates = stopped_report.get(REPORT_PREFIX + REPLICATES_COLUMN) or []
        elif status == "error":
            run = store.find_run(trial_cfg, store.RUN_NAME_TAG, trial_run_name(sweep_name, trial_id))
            if run is not None:
                runs.end_run(store.uri(cfg), run.info.run_id, "FAILED", {runs.TRIAL_STATUS_TAG: "error"})
        fraction = trial_cfg.finetune.label_fraction if cfg.tune.trial == "finetune" else trial_cfg.data.fraction
        fraction_key = (trial_cfg.data.shards, trial_cfg.data.train_split, fraction)
        if fraction_key not in counts:
            shard_dir = resolve_shard_dir(trial_cfg.data.shards, spec_from_config(trial_cfg).hash)
            counts[fraction_key] = count_rows(shard_dir, trial_cfg.data.train_split, fraction)
        flops_per_step = float(metrics.get("flops_per_step", math.nan))
        steps = metrics.get("step", math.nan)
        row = {"trial_id": trial_id, "status": status, "label": trial_label(params)}
        if VARIANT in params:
            row[VARIANT] = params[VARIANT]
        terms = objective_class(trial_cfg.objective.name).terms
        for key in [*config_columns, *(k for k in ALWAYS_COLUMNS if k not in config_columns)]:
            section, name = key.split(".", 1)[0], key.rsplit(".", 1)[-1]
            unused_weight = section == "objective" and name.endswith("_weight") and name[:-7] not in terms
            row[key] = math.nan if unused_weight else _cell(get_key(trial_cfg, key))
        row.update({
            "n_train": counts[fraction_key], "encoder_params": metrics.get("encoder_params", math.nan),
            "trainable_params": metrics.get("trainable_params", math.nan),
            "flops_per_step": flops_per_step, "steps": steps, "train_flops": flops_per_step * steps,
            "global_batch": trial_cfg.train.global_batch, "wall_s": metrics.get("time_total_s", math.nan),
            "pretrain_s": metrics.get("time/pretrain_s", math.nan), "evaluate_s": metrics.get("time/evaluate_s", math.nan),
            "val_loss": metrics.get("val/loss", math.nan),
            **(reported if cfg.tune.trial == "pretrain" else selected),
            **({SELECT_PREFIX + k: v for k, v in selected.items()} if cfg.tune.trial == "pretrain" else {}),
            REPLICATES_COLUMN: list(replicates),
            # every other evaluation metric (fine-tuning: mean_dice, dice_lung, hd95_mm_lung, auroc_<label>, ...)
            **{table_column(k): v for k, v in metrics.items()
               if str(k).startswith(EVAL_PREFIX) and table_column(k) not in selected},
            "mlflow_run_id": run_id,
            "error": scrub(str(result.error).strip().splitlines()[-1])[:300] if result.error else "",
        })
        rows.append(row)
        if history is not None and "val/loss" in history:
            model = f"{trial_cfg.model.image_encoder}/{trial_cfg.model.size}"
            for _, point in history[history["val/loss"].notna()].iterrows():
                curves.append({"trial_id": trial_id, "model": model, "step": point["step"],
                               "flops": flops_per_step * point["step"], "val_loss": point["val/loss"]})
    table = pd.DataFrame(rows).sort_values("trial_id", ignore_index=True) if rows else pd.DataFrame()
    if len(table):
        table = add_data_columns(table)
    curve_frame = pd.DataFrame(curves, columns=["trial_id", "model", "step", "flops", "val_loss"])
    return table, curve_frame.drop_duplicates(["trial_id", "step"], keep="last")


def label_efficiency_table(table: pd.DataFrame, column: str) -> pd.DataFrame:
    """Finished fine-tuning trials -> one row per (initialisation [and pretrained model / variant when they
    vary], label fraction): mean of `column` over seeds with a 95% t-interval (NaN with one seed), the shape
    `plots.label_efficiency_figure` draws."""
    from scipy import stats

    done = table[(table["status"] == "finished") & table[column].notna()] if column in table else table.iloc[:0]
    if not {"finetune.init", "finetune.label_fraction"} <= set(done):  # a sweep that varies neither: no curve
        done = done.iloc[:0]
    keys = [k for k in ("finetune.model", VARIANT) if k in done and done[k].nunique() > 1]
    rows = []
    for (source, fraction), group in done.groupby(
            [done.apply(lambda r: " ".join([str(r["finetune.init"]), *(str(r[k]) for k in keys)]), axis=1),
             "finetune.label_fraction"], sort=True) if len(done) else []:
        values = group[column].to_numpy(dtype=float)
        mean, half = float(values.mean()), math.nan
        if len(values) > 1:
            half = float(stats.t.ppf(0.975, len(values) - 1) * values.std(ddof=1) / math.sqrt(len(values)))
        rows.append({"features": source, "fraction": float(fraction), "value": mean, "value_ci_low": mean - half,
                     "value_ci_high": mean + half, "trials": len(values)})
    return pd.DataFrame(rows, columns=["features", "fraction", "value", "value_ci_low", "value_ci_high", "trials"])


def _figures(table: pd.DataFrame, laws: list, varied: list[str], folder: Path, cfg: ExperimentConfig,
             report_split: str) -> list[Path]:
    from vlp3d.evaluation import plots

    folder.mkdir(parents=True, exist_ok=True)
    figures = {}
    if cfg.tune.trial == "finetune":
        column = table_column(cfg.tune.metric)
        efficiency = label_efficiency_table(table, column)
        if len(efficiency) and {"finetune.init", "finetune.label_fraction"} <= set(table):
            figures["label_efficiency"] = plots.label_efficiency_figure(
                efficiency, title=f"label efficiency: fine-tuning {cfg.finetune.task}, pretrained vs random init",
                value="value", ylabel=f"{cfg.tune.metric.removeprefix(EVAL_PREFIX)} on {cfg.data.eval_split} "
                                      "(mean over seeds, 95% CI)", chance=None)
    figures.update(plots.scaling_figures(laws, report_split))
    if "macro_auroc" in table and table["macro_auroc"].notna().any():
        figures["trials_auroc"] = plots.configurations_figure(table, split=report_split)
    weights = [k for k in varied if k.startswith("objective.") and k.endswith("_weight")]
    if weights and (table["status"] == "finished").any():
        figures["loss_weights"] = plots.loss_weights_figure(table, weights)
    paths = []
    for name, figure in figures.items():
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=120)
        paths.append(path)
    return paths


def publish(cfg: ExperimentConfig, table: pd.DataFrame, curves: pd.DataFrame | None, varied: list[str],
            folder: Path, uri: str, parent_run_id: str, report_split: str
            ) -> tuple[list, pd.DataFrame, list[Path], str, str]:
    """Fit the laws, draw the plots, write the tables and the report to the sweep folder and log them all on
    the parent run. Returns (laws, fits table, figure paths, best trial id, report text)."""
    laws = scaling_results(table, varied, n_boot=cfg.tune.fit_bootstrap, seed=cfg.tune.seed,
                           fit_repeated_data=cfg.tune.fit_repeated_data) if cfg.tune.trial == "pretrain" else []
    fits = fits_table(laws)
    figures = _figures(table, laws, varied, folder / "plots", cfg, report_split)
    files = []
    frames = {"trials": table.drop(columns=[REPLICATES_COLUMN], errors="ignore"), "fits": fits}
    if curves is not None:
        frames["curves"] = curves
    for stem, frame in frames.items():
        frame.to_csv(folder / f"{stem}.csv", index=False)
        files.append(folder / f"{stem}.csv")
    table.to_parquet(folder / "trials.parquet", index=False)  # with each trial's evaluation replicates
    files.append(folder / "trials.parquet")
    best, summary = best_trial(cfg, table)
    text = report_text(folder.name, table, laws, best, report_split, cfg)
    (folder / "report.txt").write_text(text + "\n")
    files.append(folder / "report.txt")
    runs.log_files(uri, parent_run_id, files, "sweep")
    runs.log_files(uri, parent_run_id, figures, "plots")
    runs.log_summary_metrics(uri, parent_run_id, summary)
    return laws, fits, figures, best, text


def best_trial(cfg: ExperimentConfig, table: pd.DataFrame) -> tuple[str, dict[str, float]]:
    """(the best finished trial, picked on the selection split, and the summary metrics: trial counts, the
    best trial's selection score and its score on the report split)."""
    summary = {f"trials_{s}": float((table["status"] == s).sum()) if len(table) else 0.0
               for s in ("finished", "stopped", "error")}
    finished = table[table["status"] == "finished"] if len(table) else table
    column = selection_column(cfg.tune.metric) if cfg.tune.trial == "pretrain" else table_column(cfg.tune.metric)
    if not (len(finished) and column in finished and finished[column].notna().any()):
        return "", summary
    pick = finished[column].idxmax() if cfg.tune.mode == "max" else finished[column].idxmin()
    summary[f"best/{cfg.tune.metric}"] = float(finished.loc[pick, column])
    reported = table_column(cfg.tune.metric)
    if cfg.tune.trial == "pretrain" and reported in finished and reported != column:
        summary[f"best/report/{cfg.tune.metric.removeprefix(EVAL_PREFIX)}"] = float(finished.loc[pick, reported])
    return str(finished.loc[pick, "trial_id"]), summary


def report_text(name: str, table: pd.DataFrame, laws: list, best: str, report_split: str,
                cfg: ExperimentConfig) -> str:
    """The sweep's report: the trials, each law with its intervals, extrapolation and allocation."""
    from vlp3d.table import format_table

    lines = []
    columns = [c for c in ("trial_id", "status", "label", "trainable_params", "n_train", "samples_seen", "epochs",
                           "train_flops", "macro_auroc", "macro_auroc_ci_low", "macro_auroc_ci_high")
               if c in table]
    rows = [[_text(r[c]) for c in columns] + (["repeated data"] if r.get("repeated") else [""])
            for r in table.to_dict("records")]
    lines.append(format_table(rows, [*columns, "flag"], title=f"sweep {name}: trials (AUROC on the report split "
                                                                f"'{report_split}'; selection on '{cfg.data.eval_split}')"))
    if best:
        lines.append(f"best trial (selected on '{cfg.data.eval_split}' by {cfg.tune.metric}): {best}")
    if laws:
        lines.append(f"scaling laws of 1 - macro AUROC on '{report_split}' (95% bootstrap intervals over trials and "
                     "evaluation examples; Huber fit in log space):")
        lines += [line for law in laws for line in law.lines()]
    else:
        lines.append("scaling laws: none (tune.space varies neither model.size nor train.max_steps / "
                     "train.global_batch; data.fraction alone sets how often the data repeats, not how much is seen)")
    return "\n".join(lines)


def _text(value) -> str:
    if isinstance(value, float):
        return "-" if math.isnan(value) else (f"{value:.3g}" if abs(value) >= 1e4 else f"{value:.3f}")
    return str(value)


def stored_table(folder: Path, uri: str, parent_run_id: str) -> pd.DataFrame:
    """The trial table a sweep stored: its folder's trials.parquet, else the parent run's artifact."""
    path = folder / "trials.parquet"
    if path.is_file():
        return pd.read_parquet(path)
    with tempfile.TemporaryDirectory() as tmp:
        local = store.client(uri).download_artifacts(parent_run_id, "sweep/trials.parquet", tmp)
        return pd.read_parquet(local)


def replicates_as_lists(table: pd.DataFrame) -> pd.DataFrame:
    """Parquet gives list columns back as numpy arrays: the fits take either."""
    if REPLICATES_COLUMN in table:
        table = table.copy()
        table[REPLICATES_COLUMN] = [list(np.asarray(v, dtype=float)) if v is not None else [] for v in
                                    table[REPLICATES_COLUMN]]
    return table
