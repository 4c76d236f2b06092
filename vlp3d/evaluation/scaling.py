"""Scaling laws: fit `y = a * x^(-alpha) + c` with bootstrap 95% intervals, and the compute frontier.

Pure numpy. For a fixed exponent the model is linear in (a, c), so the fit profiles the exponent:
for every candidate alpha the best (a, c >= 0) is a closed-form least-squares solution, a
log-spaced grid finds the basin and a golden-section search refines it. That is fast and has
no starting-point trouble, which matters because intervals come from refitting hundreds of
bootstrap resamples.

Intervals: residual bootstrap (resample the fit's leverage-adjusted residuals onto the fitted
curve; refit; 2.5th and 97.5th percentiles). Case resampling is not used: with a handful of sweep
points most resamples would lose a design point. With as few as 5-6 points the intervals still
cover somewhat less often than 95% (tests/unit/test_evaluation/test_scaling.py measures it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

MIN_POINTS = 4  # three parameters need at least one residual degree of freedom
MIN_DISTINCT_X = 3
ALPHA_RANGE = (1e-3, 4.0)
_GRID = np.geomspace(*ALPHA_RANGE, 241)
_GOLDEN = (math.sqrt(5) - 1) / 2


@dataclass
class PowerLawFit:
    """`y = a * x^(-alpha) + c`; `ok` is False (with `reason`) when there were too few points."""

    n: int
    distinct_x: int
    ok: bool
    reason: str = ""
    a: float = math.nan
    alpha: float = math.nan
    c: float = math.nan
    r2: float = math.nan
    alpha_ci: tuple[float, float] = (math.nan, math.nan)
    c_ci: tuple[float, float] = (math.nan, math.nan)
    x_range: tuple[float, float] = (math.nan, math.nan)
    n_boot: int = 0
    extra: dict = field(default_factory=dict)

    def predict(self, x) -> np.ndarray:
        return self.a * np.asarray(x, dtype=float) ** (-self.alpha) + self.c

    def as_row(self) -> dict:
        """Flat columns for a fits table."""
        return {"n": self.n, "distinct_x": self.distinct_x, "ok": self.ok, "reason": self.reason,
                "a": self.a, "alpha": self.alpha, "alpha_low": self.alpha_ci[0], "alpha_high": self.alpha_ci[1],
                "c": self.c, "c_low": self.c_ci[0], "c_high": self.c_ci[1], "r2": self.r2,
                "x_min": self.x_range[0], "x_max": self.x_range[1], "n_boot": self.n_boot, "note": self.note,
                **self.extra}

    @property
    def note(self) -> str:
        """What a reader should know about a fit that worked: an exponent at the edge of its range
        means the points do not pin it down (flat, rising, or saturated within the sampled x)."""
        if not self.ok:
            return ""
        if self.alpha >= ALPHA_RANGE[1] * 0.999 or self.alpha <= ALPHA_RANGE[0] * 1.001:
            return f"alpha at the edge of [{ALPHA_RANGE[0]:g}, {ALPHA_RANGE[1]:g}]: not determined by these points"
        if self.a < 0:
            return "the metric grows with x (a < 0)"
        return ""

    def describe(self) -> str:
        if not self.ok:
            return self.reason
        return (f"alpha {self.alpha:.3f} [{self.alpha_ci[0]:.3f}, {self.alpha_ci[1]:.3f}], "
                f"c {self.c:.4g} [{self.c_ci[0]:.4g}, {self.c_ci[1]:.4g}], R2 {self.r2:.3f} (n={self.n})")


def _least_squares(u: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least-squares (a, c) of y ~ a*u + c with c >= 0 (refit through the origin where the free
    optimum has c < 0), and the residual sum of squares. `u`, `y` broadcast; the last axis holds
    the n points; a, c and rss have the broadcast shape without it."""
    u, y = np.broadcast_arrays(u, y)
    u_mean, y_mean = u.mean(axis=-1), y.mean(axis=-1)
    du = u - u_mean[..., None]
    var = (du**2).sum(axis=-1)
    a = (du * (y - y_mean[..., None])).sum(axis=-1) / np.where(var > 0, var, 1.0)
    c = y_mean - a * u_mean
    through_origin = c < 0
    uu = (u**2).sum(axis=-1)
    a = np.where(through_origin, (u * y).sum(axis=-1) / np.where(uu > 0, uu, 1.0), a)
    c = np.where(through_origin, 0.0, c)
    rss = ((a[..., None] * u + c[..., None] - y) ** 2).sum(axis=-1)
    return a, c, rss


def _fit_scaled(log_x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(a', alpha, c) of y = a' * exp(-alpha * log_x) + c for each row of y [B, n] (x scaled to ~1)."""
    u_grid = np.exp(-_GRID[:, None] * log_x[None])  # [K, n]
    rss = _least_squares(u_grid[None], y[:, None])[2]  # [B, K]
    best = rss.argmin(axis=1)
    lo = np.log(_GRID[np.maximum(best - 1, 0)])
    hi = np.log(_GRID[np.minimum(best + 1, len(_GRID) - 1)])

    def rss_at(log_alpha: np.ndarray) -> np.ndarray:
        return _least_squares(np.exp(-np.exp(log_alpha)[:, None] * log_x[None]), y)[2]

    # golden-section search on log(alpha) inside each row's bracketing grid cells
    p, q = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    fp, fq = rss_at(p), rss_at(q)
    for _ in range(40):
        left = fp < fq
        hi, lo = np.where(left, q, hi), np.where(left, lo, p)
        p_new, q_new = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
        p, q = np.where(left, p_new, q), np.where(left, p, q_new)
        fp, fq = np.where(left, rss_at(p), fq), np.where(left, fp, rss_at(q))
    alpha = np.exp((lo + hi) / 2)
    a, c, _ = _least_squares(np.exp(-alpha[:, None] * log_x[None]), y)
    return a, alpha, c


def _modified_residuals(residuals: np.ndarray, a: float, alpha: float, log_x: np.ndarray) -> np.ndarray:
    """Residuals divided by sqrt(1 - leverage) (leverage from the fit's Jacobian), centred: raw
    residuals of a 3-parameter fit to a few points are too small, and the intervals too narrow."""
    u = np.exp(-alpha * log_x)
    jacobian = np.stack([u, -a * u * log_x, np.ones_like(u)], axis=1)
    leverage = np.einsum("ij,jk,ik->i", jacobian, np.linalg.pinv(jacobian.T @ jacobian), jacobian)
    modified = residuals / np.sqrt(np.clip(1 - leverage, 1e-3, None))
    return modified - modified.mean()


def fit_power_law(x, y, n_boot: int = 1000, seed: int = 0) -> PowerLawFit:
    """Fit `y = a * x^(-alpha) + c` (a real, alpha in [0.001, 4], c >= 0) with bootstrap 95% intervals.

    Needs at least 4 finite points over at least 3 distinct x; otherwise returns `ok=False` with
    the reason (the caller still tabulates and plots the points).
    """
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    keep = np.isfinite(x) & np.isfinite(y) & (x > 0)
    x, y = x[keep], y[keep]
    n, distinct = len(x), len(np.unique(x))
    if n < MIN_POINTS or distinct < MIN_DISTINCT_X:
        return PowerLawFit(n=n, distinct_x=distinct, ok=False,
                           reason=f"too few points for a fit: {n} point(s) over {distinct} distinct x "
                                  f"(need >= {MIN_POINTS} points over >= {MIN_DISTINCT_X} values)")
    x_ref = float(np.exp(np.log(x).mean()))  # scale x to ~1 so x^-alpha stays well conditioned
    log_x = np.log(x / x_ref)
    a_scaled, alpha, c = (float(v[0]) for v in _fit_scaled(log_x, y[None]))
    fitted = a_scaled * np.exp(-alpha * log_x) + c
    residuals = y - fitted
    ss_tot = float(((y - y.mean()) ** 2).sum())
    r2 = 1.0 - float((residuals**2).sum()) / ss_tot if ss_tot > 0 else math.nan
    alphas = cs = np.empty(0)
    if n_boot > 0:
        rng = np.random.default_rng(seed)
        centred = _modified_residuals(residuals, a_scaled, alpha, log_x)
        resampled = fitted + centred[rng.integers(0, n, size=(n_boot, n))]
        _, alphas, cs = _fit_scaled(log_x, resampled)

    def interval(values: np.ndarray) -> tuple[float, float]:
        if not len(values):
            return (math.nan, math.nan)
        return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))

    return PowerLawFit(n=n, distinct_x=distinct, ok=True, a=a_scaled * x_ref**alpha, alpha=alpha, c=c, r2=r2,
                       alpha_ci=interval(alphas), c_ci=interval(cs), x_range=(float(x.min()), float(x.max())),
                       n_boot=n_boot)


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


# --- a sweep's trial table -> fitted series -------------------------------------------------------

METRICS = {"val_loss": "validation loss", "1-auroc": "1 - zero-shot macro AUROC"}
# axis -> (table column of x, axis label, config keys whose variation moves along the axis)
AXES = {
    "data": ("n_train", "training volumes", ("data.fraction",)),
    "params": ("encoder_params", "image-encoder parameters", ("model.size",)),
    "compute": ("train_flops", "training FLOPs", ("data.fraction", "model.size")),
}
REPLICATE_KEYS = ("train.seed",)  # trials that differ only here are repeats of one point


@dataclass
class ScalingSeries:
    """One fitted series: `metric` over one axis for one group of otherwise equal trials.
    `y_low`/`y_high`: error-bar ends per point (the AUROC interval; NaN for the loss)."""

    metric: str
    axis: str
    group: str
    x: np.ndarray
    y: np.ndarray
    y_low: np.ndarray
    y_high: np.ndarray
    fit: PowerLawFit
    curves: object = None  # compute axis: every trial's (flops, val_loss) curve, for the plot

    def as_row(self) -> dict:
        return {"metric": self.metric, "axis": self.axis, "group": self.group, **self.fit.as_row()}


def metric_values(rows, metric: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(y, error-bar low, error-bar high) of `metric` for table rows."""
    if metric == "val_loss":
        y = rows["val_loss"].to_numpy(dtype=float)
        return y, np.full_like(y, np.nan), np.full_like(y, np.nan)
    return (1 - rows["macro_auroc"].to_numpy(dtype=float), 1 - rows["macro_auroc_ci_high"].to_numpy(dtype=float),
            1 - rows["macro_auroc_ci_low"].to_numpy(dtype=float))


def _groups(rows, keys: list[str]):
    """(label, rows) per combination of `keys` ('all' when no key varies)."""
    if not keys:
        yield "all", rows
        return
    for values, group in rows.groupby(keys, sort=True, dropna=False):
        values = values if isinstance(values, tuple) else (values,)
        yield " ".join(f"{k}={v}" for k, v in zip(keys, values, strict=True)), group


def scaling_series(table, curves, varied: list[str], n_boot: int = 1000, seed: int = 0) -> list[ScalingSeries]:
    """Power-law fits over a sweep's finished trials.

    - data: each metric over training volumes, one fit per combination of the other varied keys
      (replicates, i.e. `train.seed`, are pooled as repeated points);
    - params: each metric over image-encoder parameters, per combination of the others;
    - compute: the validation loss's compute-optimal frontier (lower envelope of every trial's
      validation curve over cumulative training FLOPs) and the final 1 - AUROC frontier over each
      trial's total FLOPs, per combination of the keys other than data and model size.

    `table`: one row per trial (status, n_train, encoder_params, train_flops, val_loss, macro_auroc
    with its CI, and a column per varied key); `curves`: one row per validation (trial_id, flops,
    val_loss). An axis whose keys do not vary is skipped.
    """
    finished = table[table["status"] == "finished"]
    out: list[ScalingSeries] = []
    for axis, (column, _, axis_keys) in AXES.items():
        if not any(k in varied for k in axis_keys):
            continue
        group_keys = [k for k in varied if k not in axis_keys and k not in REPLICATE_KEYS]
        for label, rows in _groups(finished, group_keys):
            if axis == "compute":
                trial_curves = curves[curves["trial_id"].isin(rows["trial_id"])]
                keep = compute_frontier(trial_curves["flops"], trial_curves["val_loss"])
                x = trial_curves["flops"].to_numpy(dtype=float)[keep]
                y = trial_curves["val_loss"].to_numpy(dtype=float)[keep]
                nan = np.full_like(y, np.nan)
                out.append(ScalingSeries("val_loss", axis, label, x, y, nan, nan,
                                         fit_power_law(x, y, n_boot, seed), curves=trial_curves))
                y, low, high = metric_values(rows, "1-auroc")
                keep = compute_frontier(rows[column], y)
                x = rows[column].to_numpy(dtype=float)[keep]
                out.append(ScalingSeries("1-auroc", axis, label, x, y[keep], low[keep], high[keep],
                                         fit_power_law(x, y[keep], n_boot, seed)))
                continue
            x = rows[column].to_numpy(dtype=float)
            for metric in METRICS:
                y, low, high = metric_values(rows, metric)
                out.append(ScalingSeries(metric, axis, label, x, y, low, high, fit_power_law(x, y, n_boot, seed)))
    return out
