"""`vlp3d sweep`: Ray Tune over config keys, the Ray Train V2 way (each trial is a function that
launches its own TorchTrainer; TuneReportCallback carries its reports to Tune). Every trial is
evaluated like `vlp3d evaluate` and tracked as an MLflow child run of one parent run per sweep;
the trial table, scaling-law fits and plots land on the parent run and in the sweep folder
(`<tracking.workdir>/sweeps/<name>/`), which also holds Tune's state for `--resume`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
from ray.tune import Callback

from vlp3d import logs, storage
from vlp3d.config import (
    ConfigError,
    ExperimentConfig,
    from_dict,
    get_key,
    load_stored_config,
    replace,
    to_dict,
    to_toml,
)
from vlp3d.data.shards import count_rows, resolve_shard_dir, spec_from_config
from vlp3d.objectives import objective_class
from vlp3d.platform.evaluate import evaluate_as_configured
from vlp3d.platform.mlflow import models, runs, store
from vlp3d.platform.runtime import checkpoint_location, init_ray
from vlp3d.redact import scrub
from vlp3d.search_space import (
    VARIANT,
    SearchSpace,
    apply_params,
    parse_space,
    planned_trials,
    trial_label,
)

log = logging.getLogger(__name__)

SWEEPS_DIR = "sweeps"
CONFIG_FILE = "sweep.toml"
# what a trial reports (besides its train metrics), for checking tune.metric before the sweep
EVAL_PREFIX = "eval/"
# trial table column <- evaluation metric (MLflow child runs hold them as eval/<split>/<metric>)
EVAL_COLUMNS = {
    "macro_auroc": "macro_auroc", "macro_auroc_ci_low": "macro_auroc_ci_low",
    "macro_auroc_ci_high": "macro_auroc_ci_high", "macro_f1": "macro_f1",
    "v2r_r1": "v2r/recall_at_1", "v2r_r5": "v2r/recall_at_5", "v2r_r10": "v2r/recall_at_10", "v2r_map": "v2r/map",
    "r2v_r1": "r2v/recall_at_1", "r2v_r5": "r2v/recall_at_5", "r2v_r10": "r2v/recall_at_10", "r2v_map": "r2v/map",
    "retrieval_pool": "retrieval_pool",
}
ALWAYS_COLUMNS = ("model.image_encoder", "model.size", "data.fraction", "train.seed")


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


def sweep_folder(cfg: ExperimentConfig, name: str) -> Path:
    return Path(cfg.tracking.workdir).resolve() / SWEEPS_DIR / name


def stored_config(workdir: str | Path, name: str) -> tuple[ExperimentConfig, str]:
    """(the config a sweep was started with, its name), to resume it: `name` is a sweep name in
    `<workdir>/sweeps/`, or the sweep's folder itself."""
    if (Path(name) / CONFIG_FILE).is_file():
        return load_stored_config(Path(name) / CONFIG_FILE), Path(name).resolve().name
    path = Path(workdir).resolve() / SWEEPS_DIR / name / CONFIG_FILE
    if not path.is_file():
        folder = path.parent.parent
        known = sorted(p.parent.name for p in folder.glob(f"*/{CONFIG_FILE}")) if folder.is_dir() else []
        raise FileNotFoundError(f"no sweep '{name}' under {folder} (sweeps there: {known or 'none'}); pass the "
                                "sweep's folder (--resume vlp3d-runs/demo/sweeps/NAME) or the tracking.workdir "
                                "it ran in (tracking.workdir=vlp3d-runs/demo).")
    return load_stored_config(path), name


def _absolute(cfg: ExperimentConfig) -> ExperimentConfig:
    """Trials run in Tune actors whose working directory is not the caller's: absolute paths only."""
    data = {k: str(Path(v).resolve()) for k, v in (("shards", cfg.data.shards), ("corpus", cfg.data.corpus))
            if v and not storage.is_uri(v)}
    tracking_keys = {"workdir": str(Path(cfg.tracking.workdir).resolve())}
    if cfg.tracking.storage and not storage.is_uri(cfg.tracking.storage):
        tracking_keys["storage"] = str(Path(cfg.tracking.storage).resolve())
    return replace(cfg, tracking=tracking_keys, data=data)


TRAIN_METRICS = ("loss", "lr", "grad_norm", "temperature", "samples_per_s")


def _check_metric(name: str, key: str) -> None:
    if not (name.startswith(("eval/", "val/loss", "loss/", "weighted/")) or name in TRAIN_METRICS):
        raise ConfigError(f"{key} = {name!r} is not a metric trials report; use an evaluation metric "
                          "(eval/macro_auroc, eval/macro_f1, eval/v2r/recall_at_5, eval/r2v/map, ...), the validation "
                          "loss (val/loss, val/loss/<term>) or a training metric (loss, loss/<term>, "
                          f"{', '.join(TRAIN_METRICS[1:])}).")


def check_sweep(cfg: ExperimentConfig) -> tuple[SearchSpace, list[ExperimentConfig]]:
    """Everything that would make a trial fail, checked before any starts: the space's keys and
    values, and every configuration it can produce (shards, objective, encoder input, weights)."""
    from vlp3d.train.tasks.pretrain import preflight

    space = parse_space(cfg.tune.space, cfg.tune.variants)
    _check_metric(cfg.tune.metric, "tune.metric")
    if cfg.tune.trial == "finetune":
        from vlp3d.platform.finetune import plan as preflight  # noqa: F811 - a fine-tuning trial's checks

        if cfg.tune.scheduler != "none":
            raise ConfigError("tune.trial = 'finetune' runs every trial to finetune.max_steps; set tune.scheduler = "
                              "'none' (fine-tuning reports no validation loss to stop trials on).")
        if not cfg.tune.metric.startswith(EVAL_PREFIX):
            raise ConfigError(f"tune.metric = {cfg.tune.metric!r}: a fine-tuning trial reports its evaluation, e.g. "
                              "eval/mean_dice, eval/dice/lung (segmentation) or eval/macro_auroc (classification).")
    if cfg.tune.scheduler == "asha":
        _check_metric(cfg.tune.asha_metric, "tune.asha_metric")
        if cfg.tune.asha_metric.startswith("val/") and not cfg.train.val_every:
            raise ConfigError("tune.scheduler = 'asha' compares trials on tune.asha_metric = "
                              f"{cfg.tune.asha_metric!r} during training, but train.val_every = 0 computes it only "
                              "at the end; set train.val_every (e.g. train.max_steps // 8).")
    if cfg.tune.search == "optuna":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise ConfigError("tune.search = 'optuna' needs the optional package optuna: "
                              "pip install 'vlp3d[optuna]' (or use 'grid' / 'random').") from None
    if cfg.tune.trial_runtime == "local" and cfg.cluster.num_workers != 1:
        raise ConfigError(f"tune.trial_runtime = 'local' runs a trial's loop in one process, but cluster.num_workers = "
                          f"{cfg.cluster.num_workers}; set cluster.num_workers = 1 or tune.trial_runtime = 'auto'.")
    configs, seen = [], set()
    for params in space.representative_params():
        try:
            trial_cfg = apply_params(cfg, params, space)
            key = to_toml(trial_cfg)
            if key in seen:
                continue
            seen.add(key)
            preflight(trial_cfg)
        except (ConfigError, ValueError, FileNotFoundError, KeyError) as err:
            raise ConfigError(f"tune.space: the trial {trial_label(params)} cannot run: {err}") from None
        configs.append(trial_cfg)
    return space, configs


def runs_locally(cfg: ExperimentConfig) -> bool:
    """Whether a trial of `cfg` runs its loop in the trial process (`tune.trial_runtime`)."""
    if cfg.tune.trial_runtime == "auto":
        return cfg.cluster.num_workers == 1
    return cfg.tune.trial_runtime == "local"


def trial_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """What a trial's actor asks of Ray: its driver's tune.trial_cpus, plus its worker's CPUs (and GPU)
    when the loop runs in it; a Ray Train trial's workers ask for their own."""
    if not runs_locally(cfg):
        return {"CPU": cfg.tune.trial_cpus}
    return {"CPU": cfg.tune.trial_cpus + cfg.cluster.cpus_per_worker, **({"GPU": 1.0} if cfg.cluster.use_gpu else {})}


def _training_kwargs(cfg: ExperimentConfig) -> dict:
    """How a trial hands its reports to Tune: the local loop's `on_report`, or Ray Train's callback."""
    from ray import tune

    if runs_locally(cfg):
        if not cfg.cluster.use_gpu:  # as a Ray Train worker would
            import torch

            torch.set_num_threads(max(1, math.floor(cfg.cluster.cpus_per_worker)))
        def report(metrics: dict, checkpoint=None) -> None:  # the checkpoint stays where the run keeps it
            tune.report({**metrics, **({"checkpoint_path": str(checkpoint)} if checkpoint is not None else {})})

        return {"local": True, "on_report": report}
    from ray.tune.integration.ray_train import TuneReportCallback

    return {"callbacks": [TuneReportCallback()]}


def concurrency(cfg: ExperimentConfig, configs: list[ExperimentConfig]) -> int:
    """tune.max_concurrent_trials, or as many trials as the cluster's CPUs (less one kept for Ray
    Data) and GPUs hold at once."""
    if cfg.tune.max_concurrent_trials:
        return cfg.tune.max_concurrent_trials
    import ray

    total = ray.cluster_resources()
    cpus = max(c.cluster.num_workers * c.cluster.cpus_per_worker for c in configs) + cfg.tune.trial_cpus
    trials = math.floor((total.get("CPU", 1) - 1) / cpus + 1e-9)
    gpus = max((c.cluster.num_workers if c.cluster.use_gpu else 0) for c in configs)
    if gpus:
        trials = min(trials, math.floor(total.get("GPU", 0) / gpus))
    return max(1, trials)


def param_space(space: SearchSpace, search: str) -> dict[str, Any]:
    from ray import tune

    out: dict[str, Any] = {}
    for dim in space.dimensions:
        values = list(dim.values)
        if dim.kind == "grid" and search == "grid":
            out[dim.key] = tune.grid_search(values)
        elif dim.kind in ("grid", "choice"):
            out[dim.key] = tune.choice(values)
        else:
            out[dim.key] = getattr(tune, dim.kind)(*values)
    return out


def trial_run_name(sweep: str, trial_id: str) -> str:
    return f"{sweep}-{trial_id}"


def _final_metrics(train_metrics: dict, evaluation: dict, run_id: str) -> dict:
    out = {k: v for k, v in train_metrics.items() if isinstance(v, int | float)}
    out.update({EVAL_PREFIX + k: v for k, v in evaluation.items()})
    out["mlflow_run_id"] = run_id
    return out


def _stored_trial(cfg: ExperimentConfig, run) -> dict | None:
    """The final metrics of a trial whose child run already finished and was evaluated (a trial that
    Tune reruns because the driver died before recording its end), else None."""
    prefix = f"eval/{cfg.data.eval_split}/"
    if run is None or run.info.status != "FINISHED" or prefix + "macro_auroc" not in run.data.metrics:
        return None
    metrics = run.data.metrics
    train = {k: v for k, v in metrics.items() if k.startswith("val/")}
    train.update({k.removeprefix("compute/"): float(v) for k, v in run.data.params.items() if k.startswith("compute/")})
    train["step"] = cfg.train.max_steps
    return _final_metrics(train, {k.removeprefix(prefix): v for k, v in metrics.items() if k.startswith(prefix)},
                          run.info.run_id)


def run_finetune_trial(trial_cfg: ExperimentConfig, run_name: str, sweep: dict, tags: dict[str, str]) -> None:
    """A fine-tuning trial (tune.trial = 'finetune'): `vlp3d finetune` as a child run, its evaluation on
    data.eval_split reported to Tune as eval/<metric> (eval/mean_dice, eval/dice/<class>, eval/macro_auroc)."""
    from ray import tune

    from vlp3d.platform.finetune import finetune

    result = finetune(trial_cfg, run_name=run_name, progress=None, **_training_kwargs(trial_cfg),
                      parent_run_id=sweep["parent_run_id"], register=False, tags=tags)
    prefix = f"eval/{trial_cfg.data.eval_split}/"
    runs.end_run(sweep["tracking_uri"], result.run_id, "FINISHED", {runs.TRIAL_STATUS_TAG: "finished"})
    tune.report(_final_metrics(result.train_metrics, {k.removeprefix(prefix): v for k, v in result.metrics.items()},
                               result.run_id))


def run_trial(params: dict, base: dict, sweep: dict) -> None:
    """One trial, in a Tune actor: pretrain (reports reach Tune through TuneReportCallback), evaluate
    on the held-out split exactly as `vlp3d evaluate` does, report the final metrics to Tune."""
    from ray import tune

    from vlp3d.platform.pretrain import pretrain

    os.environ["MLFLOW_TRACKING_URI"] = sweep["tracking_uri"]
    # one line per trial event comes from the driver; keep the trial's own chatter out of the log
    os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] = "false"
    logging.getLogger("mlflow").setLevel(logging.ERROR)
    cfg = from_dict(base)
    trial_cfg = apply_params(cfg, params, parse_space(cfg.tune.space, cfg.tune.variants))
    trial_id = tune.get_context().get_trial_id()
    run_name = trial_run_name(sweep["name"], trial_id)
    stored = _stored_trial(trial_cfg, store.find_run(trial_cfg, store.RUN_NAME_TAG, run_name))
    if stored is not None:  # finished before the driver died: report it again, do not retrain
        tune.report(stored)
        return
    tags = {runs.SWEEP_TAG: sweep["name"], runs.TRIAL_TAG: trial_id, VARIANT: str(params.get(VARIANT, ""))}
    if trial_cfg.tune.trial == "finetune":
        run_finetune_trial(trial_cfg, run_name, sweep, tags)
        return
    result = pretrain(trial_cfg, run_name=run_name, progress=None, **_training_kwargs(trial_cfg),
                      parent_run_id=sweep["parent_run_id"], register=False, tags=tags)
    report = evaluate_as_configured(trial_cfg, result.model_uri)
    runs.end_run(sweep["tracking_uri"], result.run_id, "FINISHED", {runs.TRIAL_STATUS_TAG: "finished"})
    tune.report(_final_metrics(result.metrics, report.result.metrics, result.run_id))


class SweepProgress(Callback):
    """A Tune callback printing one line per trial event and validation (Tune's own tables are off)."""

    def __init__(self, planned: int, max_steps: int, keys: list[str], metric: str = "eval/macro_auroc"):
        self.planned, self.max_steps, self.keys, self.metric = planned, max_steps, keys, metric
        self.started = time.time()

    def _label(self, trial) -> str:
        return trial_label({k: trial.config.get(k) for k in self.keys if k in trial.config})

    def _done(self, trials) -> str:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        return f"[{done}/{self.planned} done, {time.time() - self.started:.0f} s]"

    def on_trial_start(self, iteration, trials, trial, **info):
        log.info(f"{self._done(trials)} trial {trial.trial_id} started: {self._label(trial)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "val/loss" in result and "eval/macro_auroc" not in result:
            log.info(f"{self._done(trials)} trial {trial.trial_id} step {result.get('step', '?')}/{self.max_steps} "
                   f"val/loss {result['val/loss']:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if "eval/macro_auroc" in result:
            log.info(f"{self._done(trials)} trial {trial.trial_id} finished: AUROC {result['eval/macro_auroc']:.3f} "
                   f"[{result.get('eval/macro_auroc_ci_low', math.nan):.3f}, "
                   f"{result.get('eval/macro_auroc_ci_high', math.nan):.3f}]  val/loss "
                   f"{result.get('val/loss', math.nan):.4f}  ({result.get('time_total_s', 0):.0f} s)")
        elif self.metric in result:  # a fine-tuning trial (tune.trial = 'finetune')
            log.info(f"{self._done(trials)} trial {trial.trial_id} finished: {self.metric} {result[self.metric]:.3f}  "
                     f"({result.get('time_total_s', 0):.0f} s)")
        else:
            log.info(f"{self._done(trials)} trial {trial.trial_id} stopped early at step {result.get('step', '?')} "
                   "(scheduler)")

    def on_trial_error(self, iteration, trials, trial, **info):
        log.info(f"{self._done(trials)} trial {trial.trial_id} FAILED: {self._label(trial)} (error in {trial.path})")


def search_algorithm(cfg: ExperimentConfig, space: SearchSpace):
    """Optuna's TPE guided by tune.metric, or Tune's grid/random generator seeded by tune.seed."""
    if cfg.tune.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=cfg.tune.metric, mode=cfg.tune.mode, seed=cfg.tune.seed)
    if cfg.tune.search == "random" or any(d.kind != "grid" for d in space.dimensions):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=cfg.tune.seed)
    return None  # Tune's default: the plain grid


def _tuner(cfg: ExperimentConfig, space: SearchSpace, name: str, folder: Path, trainable, workers: int,
           progress_callback):
    from ray import tune

    search_alg = search_algorithm(cfg, space)
    scheduler = None
    if cfg.tune.scheduler == "asha":
        from ray.tune.schedulers import ASHAScheduler

        scheduler = ASHAScheduler(
            time_attr="step", metric=cfg.tune.asha_metric, mode=cfg.tune.asha_mode, max_t=cfg.train.max_steps,
            grace_period=cfg.tune.asha_grace_steps or max(1, cfg.train.max_steps // 4),
            reduction_factor=cfg.tune.asha_reduction_factor, stop_last_trials=False,
        )
    return tune.Tuner(
        trainable,
        param_space=param_space(space, cfg.tune.search),
        tune_config=tune.TuneConfig(num_samples=cfg.tune.num_samples, search_alg=search_alg, scheduler=scheduler,
                                    max_concurrent_trials=workers, reuse_actors=False),
        run_config=tune.RunConfig(name=name, storage_path=str(folder.parent), verbose=0,
                                  callbacks=[progress_callback], failure_config=tune.FailureConfig(max_failures=0)),
    )


def _cell(value: Any) -> Any:
    """Config values as table cells: sequences as JSON text, so every column groups and sorts."""
    return json.dumps(list(value)) if isinstance(value, list | tuple) else value


def table_column(metric: str) -> str:
    """The trial-table column of a reported metric: eval/v2r/recall_at_5 -> v2r_r5, val/loss -> val_loss."""
    columns = {EVAL_PREFIX + key: column for column, key in EVAL_COLUMNS.items()}
    return columns.get(metric, metric.replace("/", "_"))


def _row_metrics(metrics: dict, prefix: str) -> dict:
    return {column: metrics.get(prefix + key, math.nan) for column, key in EVAL_COLUMNS.items()}


def _finish_stopped(cfg: ExperimentConfig, run_name: str, history: pd.DataFrame | None) -> tuple[str, dict]:
    """A trial the scheduler stopped: log its last checkpoint as the child run's model, evaluate it
    (once: a resumed sweep finds the evaluation in MLflow) and close the run as KILLED.
    Returns (child run id, evaluation metrics)."""
    run = store.find_run(cfg, store.RUN_NAME_TAG, run_name)
    if run is None:
        return "", {}
    run_id, prefix = run.info.run_id, f"eval/{cfg.data.eval_split}/"
    if prefix + "macro_auroc" in run.data.metrics:
        return run_id, {k.removeprefix(prefix): v for k, v in run.data.metrics.items() if k.startswith(prefix)}
    paths = history["checkpoint_path"].dropna() if history is not None and "checkpoint_path" in history else []
    evaluation = {}
    if len(paths):
        # the path on tracking.storage's filesystem (a remote checkpoint is logged from a download)
        with storage.local_folder(checkpoint_location(cfg, paths.iloc[-1])) as local:
            model_uri = models.finish_training(run_id, cfg, local, {}, register=False, status="KILLED")
        evaluation = evaluate_as_configured(cfg, model_uri).result.metrics
    runs.end_run(store.uri(cfg), run_id, "KILLED", {runs.TRIAL_STATUS_TAG: "stopped"})
    return run_id, evaluation


def collect(grid, cfg: ExperimentConfig, space: SearchSpace, sweep_name: str) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(trial table, validation curves) from Tune's results: config values, data size, parameters,
    FLOPs, wall time, status and the evaluation of every trial (stopped ones evaluated here)."""
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
        evaluation = _row_metrics(metrics, EVAL_PREFIX)
        run_id = metrics.get("mlflow_run_id", "")
        if status == "stopped":
            run_id, stopped = _finish_stopped(trial_cfg, trial_run_name(sweep_name, trial_id), history)
            evaluation = _row_metrics(stopped, "")
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
            "flops_per_step": flops_per_step, "steps": steps, "train_flops": flops_per_step * steps,
            "global_batch": trial_cfg.train.global_batch, "wall_s": metrics.get("time_total_s", math.nan),
            "val_loss": metrics.get("val/loss", math.nan), **evaluation,
            # every other evaluation metric (fine-tuning: mean_dice, dice_lung, hd95_mm_lung, auroc_<label>, ...)
            **{table_column(k): v for k, v in metrics.items()
               if str(k).startswith(EVAL_PREFIX) and table_column(k) not in evaluation},
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


def _figures(table: pd.DataFrame, series, varied: list[str], folder: Path, cfg: ExperimentConfig | None = None
             ) -> list[Path]:
    from vlp3d.evaluation import plots

    folder.mkdir(parents=True, exist_ok=True)
    figures = {}
    if cfg is not None and cfg.tune.trial == "finetune":
        column = table_column(cfg.tune.metric)
        efficiency = label_efficiency_table(table, column)
        if len(efficiency) and {"finetune.init", "finetune.label_fraction"} <= set(table):
            figures["label_efficiency"] = plots.label_efficiency_figure(
                efficiency, title=f"label efficiency: fine-tuning {cfg.finetune.task}, pretrained vs random init",
                value="value", ylabel=f"{cfg.tune.metric.removeprefix(EVAL_PREFIX)} on {cfg.data.eval_split} "
                                      "(mean over seeds, 95% CI)", chance=None)
    for axis in ("data", "params"):
        if any(s.axis == axis for s in series):
            figures[f"scaling_{axis}"] = plots.scaling_figure(series, axis)
    if any(s.axis == "compute" for s in series):
        figures["compute_frontier"] = plots.frontier_figure(series)
    if "macro_auroc" in table and table["macro_auroc"].notna().any():
        figures["trials_auroc"] = plots.configurations_figure(table)
    weights = [k for k in varied if k.startswith("objective.") and k.endswith("_weight")]
    if weights and (table["status"] == "finished").any():
        figures["loss_weights"] = plots.loss_weights_figure(table, weights)
    paths = []
    for name, figure in figures.items():
        path = folder / f"{name}.png"
        figure.savefig(path, dpi=120)
        paths.append(path)
    return paths


def run_sweep(cfg: ExperimentConfig, name: str | None = None, resume: bool = False,
              progress=log.info) -> SweepResult:
    """Run (or, with `resume`, continue) the sweep `cfg.tune` describes; returns its table and fits."""
    logs.ensure_configured()
    from ray import tune

    from vlp3d.evaluation.scaling import scaling_series

    started = time.time()
    cfg = _absolute(cfg)
    space, configs = check_sweep(cfg)
    name = name or f"{cfg.name}-sweep-{time.strftime('%Y%m%d-%H%M%S')}"
    folder = sweep_folder(cfg, name)
    if resume and not tune.Tuner.can_restore(str(folder)):
        raise FileNotFoundError(f"sweep '{name}' has no Tune state in {folder}; start it without --resume.")
    if not resume and folder.exists():
        raise FileExistsError(f"sweep '{name}' already exists in {folder}: continue it with --resume {name}, or "
                              "choose another --name.")
    # intermediate results lack the end-of-trial metrics (and early ones the validation loss)
    os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"  # with verbose=0 Tune prints nothing; SweepProgress does
    # Tune saves which trials ended at most every 10 s by default: a driver killed sooner after a trial
    # ended (one-worker trials end seconds apart) would, on --resume, rerun a trial the scheduler had stopped
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    uri = store.uri(cfg)
    store.check_server(uri)  # an unreachable or refusing server: one line before Ray starts
    init_ray(cfg)
    parent_run_id = runs.start_or_resume_sweep_run(cfg, name, {"space": cfg.tune.space,
                                                               "variants": cfg.tune.variants})
    planned = planned_trials(cfg, space)
    workers = concurrency(cfg, configs)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(cfg),
                             sweep={"name": name, "parent_run_id": parent_run_id, "tracking_uri": uri}),
        lambda params: tune.PlacementGroupFactory([trial_resources(apply_params(cfg, params, space))]),
    )
    axes = ", ".join(f"{d.key} ({len(d.values)})" if d.enumerable else f"{d.key} ({d.kind})" for d in space.dimensions)
    progress(f"sweep {name}: {planned} trials over {axes}, {workers} at a time; "
             f"folder {folder}; MLflow parent run {parent_run_id}")
    if resume:
        tuner = tune.Tuner.restore(str(folder), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _tuner(cfg, space, name, folder, trainable, workers,
                       SweepProgress(planned, cfg.finetune.max_steps if cfg.tune.trial == "finetune" else cfg.train.max_steps,
                                     [d.key for d in space.dimensions], cfg.tune.metric))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(to_toml(cfg))
    grid = tuner.fit()
    table, curves = collect(grid, cfg, space, name)
    # keys that really differ between trials (a one-value axis is a constant, not a dimension)
    varied = [k for k in space.keys if len(table) and table[k].nunique(dropna=False) > 1]
    series = scaling_series(table, curves, varied, n_boot=cfg.tune.fit_bootstrap, seed=cfg.tune.seed)
    fits = pd.DataFrame([s.as_row() for s in series])
    figures = _figures(table, series, varied, folder / "plots", cfg)
    files = []
    for stem, frame in (("trials", table), ("fits", fits), ("curves", curves)):
        frame.to_csv(folder / f"{stem}.csv", index=False)
        files.append(folder / f"{stem}.csv")
    table.to_parquet(folder / "trials.parquet", index=False)
    files.append(folder / "trials.parquet")
    runs.log_files(uri, parent_run_id, files, "sweep")
    runs.log_files(uri, parent_run_id, figures, "plots")
    summary = {f"trials_{s}": float((table["status"] == s).sum()) if len(table) else 0.0
               for s in ("finished", "stopped", "error")}
    best = ""
    finished = table[table["status"] == "finished"] if len(table) else table
    column = table_column(cfg.tune.metric)
    if len(finished) and column in finished and finished[column].notna().any():
        pick = finished[column].idxmax() if cfg.tune.mode == "max" else finished[column].idxmin()
        best = str(finished.loc[pick, "trial_id"])
        summary[f"best/{cfg.tune.metric}"] = float(finished.loc[pick, column])
    runs.log_summary_metrics(uri, parent_run_id, summary)
    failed = bool(summary["trials_error"]) and not summary["trials_finished"]
    runs.end_run(uri, parent_run_id, "FAILED" if failed else "FINISHED", {"vlp3d.best_trial": best})
    display = [d.key for d in space.dimensions if d.key == VARIANT or d.key in varied]
    return SweepResult(name, parent_run_id, uri, folder, table, fits, varied, display, figures, best,
                       time.time() - started)
