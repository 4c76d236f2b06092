"""A sweep's trial table -> the scaling laws it supports: which trials enter which fit, on which axes,
and the fits themselves (vlp3d.evaluation.scaling_fit) with their extrapolation check and the
compute-optimal allocation, as table rows and as text.

The axes (one column of the trial table each):

- N: trained parameters (`trainable_params`), moved by `model.size`;
- D: training volumes seen, `steps x global_batch` (Chinchilla's D), moved by `train.max_steps` and
  `train.global_batch`; a trial that saw its unique volumes more than 4 times (`epochs > 4`) saw repeated
  data, worth less than new data (Muennighoff et al. 2023): flagged, and left out of the fits unless
  `tune.fit_repeated_data`. `data.fraction` sets the unique volumes (how often the data repeats), not D;
- C: the trial's model FLOPs (`train_flops`); every trial is a full schedule of its own budget, so each is
  a point of L(C); L(C) is fitted to the lower envelope (the best trial per compute).

The metric is 1 - zero-shot macro AUROC on the sweep's report split, with the evaluation's bootstrap
replicates (`macro_auroc_replicates`) so that the fit's intervals carry the evaluation noise. Only trials
that finished their schedule enter a fit (a stopped trial is a point inside a schedule, not of the law).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from vlp3d.evaluation.scaling_fit import (
    Design,
    Estimate,
    Extrapolation,
    LawFit,
    allocation,
    extrapolation_check,
    fit_law,
    optimal_split,
)

AXES = {
    "N": ("trainable_params", "trained parameters"),
    "D": ("samples_seen", "training volumes seen (steps x global batch)"),
    "C": ("train_flops", "training FLOPs (model FLOPs)"),
}
AXIS_KEYS = {"N": ("model.size",), "D": ("train.max_steps", "train.global_batch")}
REPLICATE_KEYS = ("train.seed",)  # trials that differ only here are repeats of one design point
REPEATED_EPOCHS = 4.0
METRIC = "1 - macro AUROC"
REPLICATES_COLUMN = "macro_auroc_replicates"


def add_data_columns(table):
    """`samples_seen` (steps x global batch), `epochs` (over the trial's unique volumes `n_train`) and
    `repeated` (epochs > 4) for every trial of a table with `steps`, `global_batch`, `n_train`."""
    table = table.copy()
    table["samples_seen"] = table["steps"].astype(float) * table["global_batch"].astype(float)
    table["epochs"] = table["samples_seen"] / table["n_train"].astype(float).where(table["n_train"] > 0)
    table["repeated"] = table["epochs"] > REPEATED_EPOCHS
    return table


@dataclass
class ScalingResult:
    """One fitted law over one group of trials (the trials equal in every other varied key)."""

    law: str  # "L(N)", "L(D)", "L(C)", "L(N, D)"
    group: str
    design: Design
    fit: LawFit
    trial_ids: list[str] = field(default_factory=list)
    extrapolation: Extrapolation | None = None
    allocation: dict[str, Estimate] = field(default_factory=dict)
    optimal: dict[str, Estimate] = field(default_factory=dict)  # N_opt, D_opt at `compute`
    compute: float = math.nan
    left_out: str = ""  # trials kept out of this fit, and why

    def rows(self) -> list[dict]:
        """fits.csv: one row per parameter (and derived quantity) with its interval or why it has none."""
        base = {"law": self.law, "group": self.group, "metric": METRIC, "points": self.fit.n, "ok": self.fit.ok,
                "reason": self.fit.reason, "huber_delta": self.fit.delta, "n_boot": self.fit.n_boot,
                "left_out": self.left_out}
        if not self.fit.ok:
            return [{**base, "parameter": "", "value": math.nan, "low": math.nan, "high": math.nan,
                     "identified": False, "note": ""}]
        named = {**self.fit.params, **self.allocation,
                 **{f"{k} at C={self.compute:.3g}": v for k, v in self.optimal.items()}}
        rows = [{**base, "parameter": name, "value": e.value, "low": e.low, "high": e.high,
                 "identified": e.identified, "note": e.reason} for name, e in named.items()]
        if self.extrapolation is not None:
            check = self.extrapolation
            rows.append({**base, "parameter": f"extrapolation to {check.axis}={check.x:.4g}",
                         "value": check.predicted, "low": check.low, "high": check.high, "identified": check.ok,
                         "note": check.describe(), "measured": check.measured, "inside": check.inside})
        return rows

    def lines(self) -> list[str]:
        """What `vlp3d sweep report` prints for this law."""
        title = f"{self.law}, {self.group}: {METRIC} = E + " + " + ".join(
            f"A_{a}/{a}^alpha_{a}" for a in self.fit.axes)
        if not self.fit.ok:
            return [title, f"  no fit: {self.fit.reason}"] + ([f"  {self.left_out}"] if self.left_out else [])
        out = [title + f"  ({self.fit.n} trials; Huber delta {self.fit.delta:.3g} on log residuals; "
                       f"{self.fit.n_boot} bootstrap refits)"]
        out += [f"  {name}: {e.describe()}" for name, e in self.fit.params.items()]
        if self.allocation:
            out.append("  compute-optimal allocation (C = 6 N D): N_opt ~ C^a, D_opt ~ C^b")
            out += [f"    {name}: {e.describe()}" for name, e in self.allocation.items()]
            out += [f"    {name} at C = {self.compute:.3g} FLOPs: {e.describe()}" for name, e in self.optimal.items()]
        if self.extrapolation is not None:
            out.append(f"  extrapolation: {self.extrapolation.describe()}")
        out += [f"  {note}" for note in self.fit.notes] + ([f"  {self.left_out}"] if self.left_out else [])
        return out


def _groups(rows, keys: list[str]):
    """(label, rows) per combination of `keys` ('all trials' when none varies)."""
    if not keys:
        yield "all trials", rows
        return
    for values, group in rows.groupby(keys, sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        yield " ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True)), group


def _design(rows, axes: tuple[str, ...]) -> Design:
    x = np.column_stack([rows[AXES[a][0]].to_numpy(dtype=float) for a in axes])
    y = 1.0 - rows["macro_auroc"].to_numpy(dtype=float)
    replicates = None
    if len(rows) and REPLICATES_COLUMN in rows and rows[REPLICATES_COLUMN].map(_length).gt(0).all():
        width = min(rows[REPLICATES_COLUMN].map(_length))
        replicates = 1.0 - np.array([np.asarray(r, dtype=float)[:width] for r in rows[REPLICATES_COLUMN]])
    return Design(axes, x, y, replicates)


def _length(value) -> int:
    return len(value) if isinstance(value, list | tuple | np.ndarray) else 0


def compute_frontier(compute, metric) -> np.ndarray:
    """Indices of the compute-optimal frontier: points whose metric (lower is better) beats every
    point that used less or equal compute, in increasing compute order."""
    compute = np.asarray(compute, dtype=float)
    metric = np.asarray(metric, dtype=float)
    order = [i for i in np.lexsort((metric, compute)) if np.isfinite(compute[i]) and np.isfinite(metric[i])]
    frontier, best = [], math.inf
    for i in order:
        if metric[i] < best:
            frontier.append(i)
            best = metric[i]
    return np.asarray(frontier, dtype=int)


def scaling_results(table, varied: list[str], n_boot: int = 1000, seed: int = 0,
                    fit_repeated_data: bool = False) -> list[ScalingResult]:
    """Every law the sweep's design supports, fitted over its finished trials: L(N) per group of the
    other varied keys when model.size varies, L(D) when train.max_steps or train.global_batch does, L(C)
    over the compute frontier and the joint L(N, D) with the allocation when both do. `varied`: the
    config keys that differ between trials (a `variant` column groups like any of them)."""
    if not len(table) or "macro_auroc" not in table:
        return []
    moving = {axis: [k for k in keys if k in varied] for axis, keys in AXIS_KEYS.items()}
    laws = [(f"L({axis})", (axis,)) for axis in ("N", "D") if moving[axis]]
    if laws:
        laws.append(("L(C)", ("C",)))
    if moving["N"] and moving["D"]:
        laws.append(("L(N, D)", ("N", "D")))
    finished = table[(table["status"] == "finished") & np.isfinite(table["macro_auroc"].to_numpy(dtype=float))]
    groupers = [*varied, *(["variant"] if "variant" in table and table["variant"].nunique() > 1 else [])]
    out = []
    for law, axes in laws:
        on_axis = {k for a in (("N", "D") if axes == ("C",) else axes) for k in moving[a]}
        keys = [k for k in groupers if k not in on_axis and k not in REPLICATE_KEYS and k in table]
        for label, rows in _groups(finished, keys):
            left_out = ""
            if not fit_repeated_data and "repeated" in rows and rows["repeated"].any():
                count = int(rows["repeated"].sum())
                left_out = (f"{count} trial(s) beyond {REPEATED_EPOCHS:g} epochs over their unique volumes left out "
                            "(repeated data; tune.fit_repeated_data = true keeps them)")
                rows = rows[~rows["repeated"].astype(bool)]
            if axes == ("C",):
                rows = rows.iloc[compute_frontier(rows[AXES["C"][0]], 1.0 - rows["macro_auroc"])]
            design = _design(rows, axes)
            fit = fit_law(design, n_boot=n_boot, seed=seed)
            result = ScalingResult(law, label, design, fit, [str(t) for t in rows["trial_id"]], left_out=left_out)
            if fit.ok:
                extrapolate = "D" if "D" in axes else axes[0]
                result.extrapolation = extrapolation_check(design, extrapolate, n_boot=n_boot, seed=seed)
                if axes == ("N", "D"):
                    result.allocation = allocation(fit)
                    result.compute = float(np.nanmax(rows[AXES["C"][0]].to_numpy(dtype=float)))
                    result.optimal = optimal_split(fit, result.compute)
            out.append(result)
    return out


FITS_COLUMNS = ["law", "group", "metric", "parameter", "value", "low", "high", "identified", "note", "points", "ok",
                "reason", "huber_delta", "n_boot", "left_out"]


def fits_table(results: list[ScalingResult]):
    """fits.csv: one row per parameter of every law (its columns even when no law was fitted)."""
    import pandas as pd

    rows = [row for result in results for row in result.rows()]
    extra = [c for row in rows for c in row if c not in FITS_COLUMNS]
    return pd.DataFrame(rows, columns=[*FITS_COLUMNS, *dict.fromkeys(extra)])
