"""`vlp3d sweep`: Ray Tune over config keys, the Ray Train V2 way (each trial is a function that
launches its own TorchTrainer; TuneReportCallback carries its reports to Tune). Every trial is
evaluated like `vlp3d evaluate` and tracked as an MLflow child run of one parent run per sweep;
the trial table, scaling-law fits and plots land on the parent run and in the sweep folder
(`<tracking.workdir>/sweeps/<name>/`), which also holds Tune's state for `--resume`.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from vlp3d import logs, storage
from vlp3d.config import (
    ConfigError,
    ExperimentConfig,
    from_dict,
    load_stored_config,
    replace,
    to_dict,
    to_toml,
)
from vlp3d.data.shards import read_manifest, resolve_shard_dir, spec_from_config
from vlp3d.data.splits import carve, parse_split
from vlp3d.platform.evaluate import evaluate_as_configured
from vlp3d.platform.mlflow import runs, store
from vlp3d.platform.runtime import init_ray
from vlp3d.platform.sweep_results import (
    EVAL_PREFIX,
    SweepResult,
    collect,
    evaluate_for_report,
    final_metrics,
    publish,
    replicates_as_lists,
    stored_table,
    stored_trial,
    trial_run_name,
)
from vlp3d.search_space import (
    VARIANT,
    SearchSpace,
    apply_params,
    check_selection,
    parse_space,
    planned_trials,
    trial_label,
)

log = logging.getLogger(__name__)

SWEEPS_DIR = "sweeps"
CONFIG_FILE = "sweep.toml"
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


def selection_and_report_splits(cfg: ExperimentConfig) -> tuple[str, str]:
    """(split trials are selected on, split their figures are reported on): data.eval_split and
    tune.report_split when the shards hold it; else the two parts of data.eval_split's patients
    (vlp3d.data.splits.carve), the report part holding tune.report_share of them."""
    shard_dir = resolve_shard_dir(cfg.data.shards, spec_from_config(cfg).hash)
    stored = read_manifest(shard_dir)["counts"]["by_split"]
    if cfg.tune.report_split in stored or not parse_split(cfg.tune.report_split).whole:
        return cfg.data.eval_split, cfg.tune.report_split
    return carve(cfg.data.eval_split, cfg.tune.report_share)


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
    if cfg.tune.scheduler != "none":
        _check_metric(cfg.tune.asha_metric, "tune.asha_metric")
        if cfg.tune.asha_metric.startswith("val/") and not cfg.train.val_every:
            raise ConfigError(f"tune.scheduler = {cfg.tune.scheduler!r} compares trials on tune.asha_metric = "
                              f"{cfg.tune.asha_metric!r} during training, but train.val_every = 0 computes it only "
                              "at the end; set train.val_every (e.g. train.max_steps // 8).")
    check_selection(cfg, space)
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
            budgets = "train.max_steps" in space.keys  # a budget axis: every budget its own full schedule
            if budgets and cfg.tune.trial == "pretrain" and trial_cfg.train.warmup_steps >= trial_cfg.train.max_steps:
                raise ConfigError(f"its schedule cannot reach its budget: train.warmup_steps = "
                                  f"{trial_cfg.train.warmup_steps} >= train.max_steps = {trial_cfg.train.max_steps} "
                                  "(every budget gets its own warm-up and decay; lower train.warmup_steps)")
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


def run_finetune_trial(trial_cfg: ExperimentConfig, run_name: str, sweep: dict, tags: dict[str, str]) -> None:
    """A fine-tuning trial (tune.trial = 'finetune'): `vlp3d finetune` as a child run, its evaluation on
    data.eval_split reported to Tune as eval/<metric> (eval/mean_dice, eval/dice/<class>, eval/macro_auroc)."""
    from ray import tune

    from vlp3d.platform.finetune import finetune

    result = finetune(trial_cfg, run_name=run_name, progress=None, **_training_kwargs(trial_cfg),
                      parent_run_id=sweep["parent_run_id"], register=False, tags=tags)
    prefix = f"eval/{trial_cfg.data.eval_split}/"
    runs.end_run(sweep["tracking_uri"], result.run_id, "FINISHED", {runs.TRIAL_STATUS_TAG: "finished"})
    tune.report(final_metrics(result.train_metrics, {k.removeprefix(prefix): v for k, v in result.metrics.items()},
                               result.run_id))


def run_trial(params: dict, base: dict, sweep: dict) -> None:
    """One trial, in a Tune actor: pretrain (reports reach Tune through TuneReportCallback), evaluate
    exactly as `vlp3d evaluate` does on the selection split (data.eval_split: what Tune sees as eval/...)
    and on the report split (report/...), report the final metrics to Tune."""
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
    stored = None if trial_cfg.tune.trial == "finetune" else stored_trial(
        trial_cfg, store.find_run(trial_cfg, store.RUN_NAME_TAG, run_name), sweep["report_split"])
    if stored is not None:  # finished before the driver died: report it again, do not retrain
        tune.report(stored)
        return
    tags = {runs.SWEEP_TAG: sweep["name"], runs.TRIAL_TAG: trial_id, VARIANT: str(params.get(VARIANT, ""))}
    if trial_cfg.tune.trial == "finetune":
        run_finetune_trial(trial_cfg, run_name, sweep, tags)
        return
    started = time.time()
    result = pretrain(trial_cfg, run_name=run_name, progress=None, **_training_kwargs(trial_cfg),
                      parent_run_id=sweep["parent_run_id"], register=False, tags=tags)
    trained = time.time()
    selected = evaluate_as_configured(trial_cfg, result.model_uri)  # data.eval_split: the selection split
    reported = evaluate_for_report(trial_cfg, result.model_uri, result.run_id, sweep["report_split"])
    runs.end_run(sweep["tracking_uri"], result.run_id, "FINISHED", {runs.TRIAL_STATUS_TAG: "finished"})
    # where a trial's time goes (benchmarks/bench_sweep.py splits pretrain_s into start-up, data and steps)
    timing = {"time/pretrain_s": trained - started, "time/evaluate_s": time.time() - trained}
    tune.report(final_metrics({**result.metrics, **timing}, selected.result.metrics, result.run_id, reported))


class SweepProgress(Callback):
    """A Tune callback printing one line per trial event and validation (Tune's own tables are off)."""

    def __init__(self, planned: int, cfg: ExperimentConfig, space: SearchSpace, metric: str = "eval/macro_auroc"):
        self.planned, self.cfg, self.space, self.metric = planned, cfg, space, metric
        self.keys = [d.key for d in space.dimensions]
        self.started = time.time()

    def _steps(self, trial) -> int:
        """The trial's own budget, as its trial function resolves it (an axis or a variant may set it)."""
        trial_cfg = apply_params(self.cfg, trial.config, self.space)
        return trial_cfg.finetune.max_steps if trial_cfg.tune.trial == "finetune" else trial_cfg.train.max_steps

    def _label(self, trial) -> str:
        return trial_label({k: trial.config.get(k) for k in self.keys if k in trial.config})

    def _done(self, trials) -> str:
        done = sum(t.status in ("TERMINATED", "ERROR") for t in trials)
        return f"[{done}/{self.planned} done, {time.time() - self.started:.0f} s]"

    def on_trial_start(self, iteration, trials, trial, **info):
        log.info(f"{self._done(trials)} trial {trial.trial_id} started: {self._label(trial)}")

    def on_trial_result(self, iteration, trials, trial, result, **info):
        if "val/loss" in result and "eval/macro_auroc" not in result:
            log.info(f"{self._done(trials)} trial {trial.trial_id} step {result.get('step', '?')}/"
                     f"{self._steps(trial)} val/loss {result['val/loss']:.4f}")

    def on_trial_complete(self, iteration, trials, trial, **info):
        result = trial.last_result or {}
        if "eval/macro_auroc" in result:
            log.info(f"{self._done(trials)} trial {trial.trial_id} finished: AUROC {result['eval/macro_auroc']:.3f} "
                   f"(selection split), {result.get('report/macro_auroc', math.nan):.3f} "
                   f"[{result.get('report/macro_auroc_ci_low', math.nan):.3f}, "
                   f"{result.get('report/macro_auroc_ci_high', math.nan):.3f}] (report split)  val/loss "
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

        class FinalResultOptuna(OptunaSearch):
            """TPE on each trial's final result: intermediate reports (validation loss, checkpoints) carry no
            evaluation metric, and OptunaSearch would raise a KeyError on them (Ray issue #15876); they
            would only feed Optuna's pruning, which a sweep does not use."""

            def on_trial_result(self, trial_id: str, result: dict) -> None:
                if self.metric in result:
                    super().on_trial_result(trial_id, result)

        return FinalResultOptuna(metric=cfg.tune.metric, mode=cfg.tune.mode, seed=cfg.tune.seed)
    if cfg.tune.search == "random" or any(d.kind != "grid" for d in space.dimensions):
        from ray.tune.search.basic_variant import BasicVariantGenerator

        return BasicVariantGenerator(random_state=cfg.tune.seed)
    return None  # Tune's default: the plain grid


def _tuner(cfg: ExperimentConfig, space: SearchSpace, name: str, folder: Path, trainable, workers: int,
           progress_callback):
    from ray import tune

    search_alg = search_algorithm(cfg, space)
    scheduler = None
    if cfg.tune.scheduler == "median":
        from ray.tune.schedulers import MedianStoppingRule

        scheduler = MedianStoppingRule(time_attr="step", metric=cfg.tune.asha_metric, mode=cfg.tune.asha_mode,
                                       grace_period=cfg.tune.asha_grace_steps or max(1, cfg.train.max_steps // 4))
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
                                    max_concurrent_trials=workers,
                                    # one-worker trials run their loop in the trial actor: reusing it keeps its
                                    # imports and the shards it read (vlp3d.train.feed) for the next trial
                                    reuse_actors=runs_locally(cfg)),
        run_config=tune.RunConfig(name=name, storage_path=str(folder.parent), verbose=0,
                                  callbacks=[progress_callback], failure_config=tune.FailureConfig(max_failures=0)),
    )


def run_sweep(cfg: ExperimentConfig, name: str | None = None, resume: bool = False,
              progress=log.info) -> SweepResult:
    """Run (or, with `resume`, continue) the sweep `cfg.tune` describes; returns its table and fits."""
    logs.ensure_configured()
    from ray import tune


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
    select_split, report_split = cfg.data.eval_split, cfg.tune.report_split
    if cfg.tune.trial == "pretrain":  # fine-tuning trials evaluate on data.eval_split as `vlp3d finetune` does
        select_split, report_split = selection_and_report_splits(configs[0])
    trial_base = replace(cfg, data={"eval_split": select_split})
    uri = store.uri(cfg)
    store.check_server(uri)  # an unreachable or refusing server: one line before Ray starts
    init_ray(cfg)
    parent_run_id = runs.start_or_resume_sweep_run(cfg, name, {"space": cfg.tune.space,
                                                               "variants": cfg.tune.variants})
    planned = planned_trials(cfg, space)
    workers = concurrency(cfg, configs)
    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(trial_base),
                             sweep={"name": name, "parent_run_id": parent_run_id, "tracking_uri": uri,
                                    "report_split": report_split}),
        lambda params: tune.PlacementGroupFactory([trial_resources(apply_params(cfg, params, space))]),
    )
    axes = ", ".join(f"{d.key} ({len(d.values)})" if d.enumerable else f"{d.key} ({d.kind})" for d in space.dimensions)
    progress(f"sweep {name}: {planned} trials over {axes}, {workers} at a time; selection on split "
             f"'{select_split}', figures on '{report_split}'; folder {folder}; MLflow parent run {parent_run_id}")
    if resume:
        tuner = tune.Tuner.restore(str(folder), trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = _tuner(cfg, space, name, folder, trainable, workers, SweepProgress(planned, cfg, space, cfg.tune.metric))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / CONFIG_FILE).write_text(to_toml(cfg))
    grid = tuner.fit()
    table, curves = collect(grid, trial_base, space, name, report_split)
    # keys that really differ between trials (a one-value axis is a constant, not a dimension)
    varied = [k for k in space.keys if len(table) and table[k].nunique(dropna=False) > 1]
    laws, fits, figures, best, text = publish(trial_base, table, curves, varied, folder, uri, parent_run_id,
                                              report_split)
    summary = {s: float((table["status"] == s).sum()) if len(table) else 0.0 for s in ("finished", "error")}
    failed = bool(summary["error"]) and not summary["finished"]
    runs.end_run(uri, parent_run_id, "FAILED" if failed else "FINISHED", {"vlp3d.best_trial": best})
    display = [d.key for d in space.dimensions if d.key == VARIANT or d.key in varied]
    return SweepResult(name, parent_run_id, uri, folder, table, fits, varied, display, figures, best,
                       time.time() - started, laws, select_split, report_split, text)


def report_sweep(cfg: ExperimentConfig, name: str) -> SweepResult:
    """`vlp3d sweep report NAME`: re-fit the laws of a finished sweep from the trial table it stored (its
    folder, else its MLflow parent run), redraw the plots and log the report on the parent run; no trial runs."""
    logs.ensure_configured()
    started = time.time()
    cfg = _absolute(cfg)
    folder = sweep_folder(cfg, name)
    uri = store.uri(cfg)
    parent = store.find_run(cfg, runs.SWEEP_PARENT_TAG, name)
    if parent is None:
        raise FileNotFoundError(f"no MLflow parent run of sweep '{name}' in {uri} (experiment "
                                f"'{cfg.tracking.experiment or cfg.name}'); pass the config the sweep ran with.")
    space = parse_space(cfg.tune.space, cfg.tune.variants)
    table = replicates_as_lists(stored_table(folder, uri, parent.info.run_id))
    select_split, report_split = cfg.data.eval_split, cfg.tune.report_split
    if cfg.tune.trial == "pretrain":
        select_split, report_split = selection_and_report_splits(cfg)
    trial_base = replace(cfg, data={"eval_split": select_split})
    varied = [k for k in space.keys if k in table and table[k].nunique(dropna=False) > 1]
    folder.mkdir(parents=True, exist_ok=True)
    laws, fits, figures, best, text = publish(trial_base, table, None, varied, folder, uri, parent.info.run_id,
                                              report_split)
    display = [d.key for d in space.dimensions if d.key == VARIANT or d.key in varied]
    return SweepResult(name, parent.info.run_id, uri, folder, table, fits, varied, display, figures, best,
                       time.time() - started, laws, select_split, report_split, text)
