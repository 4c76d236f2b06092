"""`[tune]`: `vlp3d sweep`, Ray Tune over config keys (the search space itself is checked by
vlp3d.search_space)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from vlp3d.config.fields import _f, table_setting


@dataclass(frozen=True)
class TuneConfig:
    """`vlp3d sweep`: Ray Tune over config keys; every trial pretrains, is evaluated and logged as a
    child run of one MLflow parent run, and scaling laws are fitted over the finished trials."""

    space: dict[str, Any] = table_setting(
        "Search space: config key -> values. A list (or {grid = [...]}) tries every value; {choice = [...]} "
        "samples one; {uniform = [lo, hi]}, {loguniform = [lo, hi]} (floats) and {randint = [lo, hi]} "
        "(ints, hi exclusive) sample a range. E.g. \"data.fraction\" = [0.25, 0.5, 1.0].",
    )
    variants: dict[str, Any] = table_setting(
        "Named groups of keys set together, tried as one more grid axis (column 'variant'), e.g. "
        "[tune.variants.no_mim] \"objective.mg3d.mim_weight\" = 0.0; an empty table keeps the base config.",
    )
    search: Literal["grid", "random", "optuna"] = _f(
        "grid", "'grid': every grid value (sampled keys drawn per grid point); 'random': every key sampled, "
        "lists as choices; 'optuna': Optuna's TPE over the space (pip install optuna), guided by tune.metric.",
    )
    trial: Literal["pretrain", "finetune"] = _f(
        "pretrain", "What a trial runs: 'pretrain' (pretraining, then zero-shot evaluation) or 'finetune' (`vlp3d "
        "finetune` of finetune.model, evaluated on data.eval_split: label-efficiency sweeps over "
        "finetune.label_fraction x finetune.init, plotted as label_efficiency.png on the parent run).",
    )
    num_samples: int = _f(1, "Trials per grid point ('grid') or in all ('random', 'optuna').", ge=1)
    metric: str = _f("eval/macro_auroc", "Trial metric that ranks trials and guides Optuna (reported at the end of a trial).")
    mode: Literal["max", "min"] = _f("max", "Optimisation direction of `tune.metric`.")
    scheduler: Literal["none", "asha", "median"] = _f(
        "none", "'asha' (successive halving) or 'median' (median stopping rule): stop poor trials early on "
        "tune.asha_metric, reported every train.val_every steps. For loss-weight and hyperparameter searches only: "
        "refused when tune.space varies a key a scaling fit pools over (data.fraction, model.size, train.max_steps, "
        "train.global_batch), whose points must each run to their budget.")
    asha_metric: str = _f("val/loss", "Metric ASHA compares at its rungs (reported during training).")
    asha_mode: Literal["max", "min"] = _f("min", "Direction of tune.asha_metric.")
    asha_grace_steps: int = _f(0, "Steps every trial runs before ASHA may stop it (0: train.max_steps // 4).", ge=0)
    asha_reduction_factor: int = _f(2, "ASHA keeps 1/reduction_factor of the trials at each rung.", ge=2)
    max_concurrent_trials: int = _f(
        0, "Trials run at once (0: as many as the cluster's CPUs/GPUs hold, keeping one CPU for Ray Data; set "
        "it on an autoscaling cluster, whose resources grow only once trials ask).",
        ge=0,
    )
    trial_runtime: Literal["auto", "local", "ray_train"] = _f(
        "auto", "Where a trial's training loop runs: 'local' in the trial's own process (LocalRuntime: no worker "
        "group to start, the same losses as one Ray Train worker; one worker only), 'ray_train' on "
        "cluster.num_workers Ray Train workers (restarts after worker failures), 'auto': local for one-worker "
        "trials, else Ray Train.",
    )
    trial_cpus: float = _f(0.1, "CPUs of each trial's driver process (its Train workers take cluster.* resources).", gt=0)
    seed: int = _f(0, "Seed of random/Optuna sampling and of the scaling-fit bootstrap.", ge=0, le=2**32 - 1)
    fit_bootstrap: int = _f(
        1000, "Bootstrap resamples for the 95% intervals of the scaling fits (trials' residuals and the evaluation's "
        "replicates drawn together).", ge=0)
    report_split: str = _f(
        "test", "Split every reported figure of the sweep is on (trial table, fits, plots, the best trial's score); "
        "selection (tune.metric, the best trial, early stopping, the validation loss) uses data.eval_split. Shards "
        "without this split get it carved from data.eval_split's patients (tune.report_share of them, by their "
        "stratified rank; the rest stay for selection).")
    report_share: float = _f(
        0.5, "Share of data.eval_split's patients carved out as tune.report_split when the shards hold no such split.",
        gt=0, le=1)
    fit_repeated_data: bool = _f(
        False, "Let trials that saw their unique training volumes more than 4 times (epochs > 4: repeated data, worth "
        "less than new data) into the scaling fits; they are flagged in the trial table either way.")
