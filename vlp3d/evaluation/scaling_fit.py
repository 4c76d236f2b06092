"""Scaling-law fits: `L = E + sum_j A_j / x_j^alpha_j` in log space with a robust loss, bootstrap
intervals over trials and evaluation examples, identification checks, extrapolation, allocation.

Pure numpy. The method follows Hoffmann et al. 2022 (Chinchilla), approach 3:

- Fit in log space: the residual of a point is `log y - log L(x)`, so every point weighs by its
  relative error (a loss of 4.0 and one of 0.4 count alike) and `E, A_j` stay positive
  (`E = exp(e)`, `A_j = exp(a_j)`; `log L = logsumexp(e, a_j - alpha_j log x_j)`).
- Huber loss on those residuals, so that one diverged or mis-evaluated trial does not bend the law.
  Chinchilla's fixed delta (1e-3) is below the noise of any sweep here, which turns Huber into least
  absolute deviations: with few points such a fit passes exactly through some of them and the
  bootstrap degenerates. Here delta = 1.345 x a robust scale of the residuals (the median absolute
  residual of a least-squares fit, corrected for the parameters fitted), Huber's classical choice
  (95% efficiency on Gaussian noise, robust to the rest).
- A grid of starting points (exponents x irreducible share), each refined, the best kept.
  The refinement is a damped Gauss-Newton (Levenberg-Marquardt) on the iteratively reweighted form
  of the Huber loss, vectorised over many fits at once: a bootstrap refits thousands of
  resamples in one pass. tests/unit/test_evaluation/test_scaling_fit.py checks that it reaches the
  optimum scipy.optimize.least_squares(loss="huber") finds.

Intervals (`bootstrap`): each resample adds to the fitted curve (1) the trials' residuals drawn with
replacement (leverage-adjusted: raw residuals of a fit are too small by the parameters it used),
which carries the trial-to-trial noise of seeds and anything else the law does not explain, and
(2) one bootstrap replicate of the evaluation (a resample of the evaluation examples, the same
resample for every trial, since all trials are scored on the same examples), which carries the
evaluation noise — correlated across trials, so residuals alone would miss it. Where several seeds
ran per design point, their scatter is in the residuals. 95% percentile intervals; calibration by
simulation in tests/unit/test_evaluation/test_scaling_calibration.py and docs/sweeps.md.

Identification (`Identification`): a parameter whose estimate or 95% interval reaches the edge of
its range (an exponent at 0.01 or 3, `E` at 0) is not determined by the design; the result says so
in words instead of giving a number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

EXPONENT_RANGE = (0.01, 3.0)
E_FLOOR = 1e-4  # E below this share of the smallest observed value counts as 0 (the floor of its range)
LOG_COEF_RANGE = (-60.0, 60.0)
HUBER_K = 1.345
MIN_DISTINCT = 3
STARTING_EXPONENTS = (0.1, 0.3, 0.6, 1.2)
STARTING_E_SHARES = (0.02, 0.4, 0.8)  # E as a share of the smallest observed value
LEVEL = 0.95


# --- the batched robust solver ---------------------------------------------------------------------

def _log_law(theta: np.ndarray, log_x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log L and its Jacobian for parameters theta [P, 1 + 2k] = (e, a_1, alpha_1, ..., a_k, alpha_k)
    at log x [n, k] (scaled to ~0): ([P, n], [P, n, 1 + 2k])."""
    k = log_x.shape[1]
    terms = [np.broadcast_to(theta[:, :1], (len(theta), len(log_x)))]
    terms += [theta[:, 1 + 2 * j, None] - theta[:, 2 + 2 * j, None] * log_x[None, :, j] for j in range(k)]
    stacked = np.stack(terms, axis=-1)  # [P, n, 1 + k]
    top = stacked.max(axis=-1, keepdims=True)
    weights = np.exp(stacked - top)
    total = weights.sum(axis=-1, keepdims=True)
    share = weights / total
    jacobian = np.empty((*stacked.shape[:2], 1 + 2 * k))
    jacobian[..., 0] = share[..., 0]
    for j in range(k):
        jacobian[..., 1 + 2 * j] = share[..., 1 + j]
        jacobian[..., 2 + 2 * j] = -share[..., 1 + j] * log_x[None, :, j]
    return top[..., 0] + np.log(total[..., 0]), jacobian


def _huber(residuals: np.ndarray, delta: np.ndarray, mask: np.ndarray) -> np.ndarray:
    size = np.abs(residuals)
    d = delta[:, None]
    return (np.where(size <= d, 0.5 * residuals**2, d * (size - 0.5 * d)) * mask).sum(axis=-1)


def _bounds(k: int, log_y_min: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Lower and upper bounds per problem [P, 1 + 2k]: E in [E_FLOOR * min y, 10 * min y]."""
    lower = np.tile([0.0, *([LOG_COEF_RANGE[0], EXPONENT_RANGE[0]] * k)], (len(log_y_min), 1))
    upper = np.tile([0.0, *([LOG_COEF_RANGE[1], EXPONENT_RANGE[1]] * k)], (len(log_y_min), 1))
    lower[:, 0] = log_y_min + math.log(E_FLOOR)
    upper[:, 0] = log_y_min + math.log(10.0)
    return lower, upper


def solve(theta: np.ndarray, log_x: np.ndarray, log_y: np.ndarray, mask: np.ndarray, delta: np.ndarray,
          lower: np.ndarray, upper: np.ndarray, iterations: int = 150, tol: float = 1e-5
          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Minimise the Huber loss of log residuals for P independent problems at once (bound-projected
    Levenberg-Marquardt on the IRLS normal equations). Returns (theta [P, p], loss [P], converged [P])."""
    theta = np.clip(theta, lower, upper)
    pred, jacobian = _log_law(theta, log_x)
    residuals = log_y - pred
    loss = _huber(residuals, delta, mask)
    damping = np.full(len(theta), 1e-3)
    converged = np.zeros(len(theta), dtype=bool)
    eye = np.eye(theta.shape[1])
    for _ in range(iterations):
        active = ~converged
        if not active.any():
            break
        idx = np.flatnonzero(active)
        r, jac, m, d = residuals[idx], jacobian[idx], mask[idx], delta[idx, None]
        size = np.abs(r)
        weight = np.where(size <= d, 1.0, d / np.maximum(size, 1e-300)) * m
        jac_t = jac.transpose(0, 2, 1)
        gradient = (jac_t @ (np.clip(r, -d, d) * m)[..., None])[..., 0]
        hessian = (jac_t * weight[:, None, :]) @ jac
        diagonal = np.einsum("pkk->pk", hessian)
        system = hessian + damping[idx, None, None] * (diagonal[:, :, None] * eye + 1e-9 * eye)
        # a parameter at a bound that the gradient pushes outwards stays there (active set): without this,
        # E at 0 or an exponent at its edge makes every later step a clipped, useless one
        free = ~(((theta[idx] <= lower[idx]) & (gradient < 0)) | ((theta[idx] >= upper[idx]) & (gradient > 0)))
        system = system * (free[:, :, None] & free[:, None, :]) + eye * ~free[:, :, None]
        step = np.linalg.solve(system, (gradient * free)[..., None])[..., 0]
        candidate = np.clip(theta[idx] + step, lower[idx], upper[idx])
        cand_pred, cand_jac = _log_law(candidate, log_x)
        cand_res = log_y[idx] - cand_pred
        cand_loss = _huber(cand_res, delta[idx], m)
        better = cand_loss < loss[idx]
        moved = np.abs(candidate - theta[idx]).max(axis=1)
        gain = (loss[idx] - cand_loss) / np.maximum(loss[idx], 1e-300)
        accept = idx[better]
        theta[accept], pred[accept], jacobian[accept] = candidate[better], cand_pred[better], cand_jac[better]
        residuals[accept], loss[accept] = cand_res[better], cand_loss[better]
        damping[idx] = np.where(better, np.maximum(damping[idx] / 3, 1e-12), damping[idx] * 4)
        converged[idx] = (better & ((gain < tol) | (moved < tol))) | (damping[idx] > 1e8)
    return theta, loss, converged


def _starts(k: int, y_min: float, y_ref: float) -> np.ndarray:
    """Chinchilla-style grid of starting points: exponents x E's share; A_j split the rest evenly
    (at x = the geometric mean of the design, every term of the law is A_j)."""
    rows = []
    for share in STARTING_E_SHARES:
        e = share * y_min
        a = math.log(max(y_ref - e, 0.05 * y_ref) / k)
        for exponents in np.array(np.meshgrid(*[STARTING_EXPONENTS] * k)).reshape(k, -1).T:
            rows.append([math.log(e), *np.column_stack([np.full(k, a), exponents]).ravel()])
    return np.array(rows)


# --- one law on one design ----------------------------------------------------------------------

@dataclass
class Design:
    """What a fit is given: per trial its x on each axis [n, k], the metric y [n] (lower is better), the
    design point it belongs to (trials that differ only by seed share one), and optionally
    `replicates` [n, R]: the metric on R bootstrap resamples of the evaluation examples, resample r the
    same examples for every trial."""

    axes: tuple[str, ...]
    x: np.ndarray
    y: np.ndarray
    replicates: np.ndarray | None = None

    @property
    def distinct(self) -> dict[str, int]:
        return {axis: len(np.unique(self.x[:, j])) for j, axis in enumerate(self.axes)}


@dataclass
class Estimate:
    """A parameter: its estimate and 95% interval, or why the design does not identify it."""

    value: float
    low: float = math.nan
    high: float = math.nan
    identified: bool = True
    reason: str = ""

    def covers(self, truth: float) -> bool:
        return bool(self.low <= truth <= self.high)

    def describe(self, digits: int = 3) -> str:
        if not self.identified:
            return f"not identified ({self.reason})"
        if not (math.isfinite(self.low) and math.isfinite(self.high)):
            return f"{self.value:.{digits}g} (no interval: no bootstrap)"
        return f"{self.value:.{digits}g} [{self.low:.{digits}g}, {self.high:.{digits}g}]"


@dataclass
class LawFit:
    """`L = E + sum_j A_j / x_j^alpha_j` over `axes`; `ok` False (with `reason`) when no fit was made."""

    axes: tuple[str, ...]
    n: int
    ok: bool
    reason: str = ""
    params: dict[str, Estimate] = field(default_factory=dict)  # E, A_<axis>, alpha_<axis>
    derived: dict[str, Estimate] = field(default_factory=dict)  # allocation exponents etc. (joint fits)
    delta: float = math.nan
    n_boot: int = 0
    converged: bool = True
    x_range: dict[str, tuple[float, float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    samples: np.ndarray | None = None  # the bootstrap's parameter vectors [B, 1 + 2k] (natural units)
    theta: np.ndarray | None = None  # the estimate as (E, A_1, alpha_1, ...)

    def predict(self, x: np.ndarray, theta: np.ndarray | None = None) -> np.ndarray:
        """L at x [m, k] (or [m] for one axis); with `theta` [B, 1 + 2k]: [B, m]."""
        x = np.asarray(x, dtype=float).reshape(-1, len(self.axes))
        params = (self.theta[None] if theta is None else theta)
        value = params[:, :1] + sum(params[:, 1 + 2 * j, None] * x[None, :, j] ** -params[:, 2 + 2 * j, None]
                                    for j in range(len(self.axes)))
        return value[0] if theta is None else value

    def band(self, x: np.ndarray, level: float = LEVEL) -> tuple[np.ndarray, np.ndarray]:
        """Pointwise bootstrap interval of the fitted curve at x."""
        if self.samples is None or not len(self.samples):
            nan = np.full(len(np.asarray(x).reshape(-1, len(self.axes))), np.nan)
            return nan, nan
        values = self.predict(x, self.samples)
        tail = 100 * (1 - level) / 2
        return np.percentile(values, tail, axis=0), np.percentile(values, 100 - tail, axis=0)


def _refused(axes, n, reason) -> LawFit:
    return LawFit(axes=tuple(axes), n=n, ok=False, reason=reason)


def check_design(design: Design) -> str:
    """Why a design cannot be fitted ('' when it can): fewer than 3 distinct values on an axis, or no
    more points than parameters (no residual left to measure the noise with)."""
    n, k = len(design.y), len(design.axes)
    few = {a: d for a, d in design.distinct.items() if d < MIN_DISTINCT}
    if few:
        listing = ", ".join(f"{a} has {d}" for a, d in few.items())
        return f"too few distinct points: {listing} (a power law with an offset needs >= {MIN_DISTINCT} per axis)"
    if n <= 1 + 2 * k:
        return (f"{n} points for {1 + 2 * k} parameters: no residual left to measure the noise (add seeds or "
                "design points)")
    return ""


def _natural(theta: np.ndarray, x_ref: np.ndarray) -> np.ndarray:
    """(e, a_j, alpha_j) on scaled x -> (E, A_j, alpha_j) on the original x."""
    out = np.empty_like(theta)
    out[:, 0] = np.exp(theta[:, 0])
    for j, ref in enumerate(x_ref):
        out[:, 2 + 2 * j] = theta[:, 2 + 2 * j]
        out[:, 1 + 2 * j] = np.exp(theta[:, 1 + 2 * j] + theta[:, 2 + 2 * j] * math.log(ref))
    return out


def _leverage_adjusted(residuals: np.ndarray, jacobian: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Residuals / sqrt(1 - leverage) of the weighted Gauss-Newton hat matrix, centred."""
    root = np.sqrt(weight)[:, None]
    scaled = jacobian * root
    leverage = np.einsum("ij,jk,ik->i", scaled, np.linalg.pinv(scaled.T @ scaled), scaled)
    adjusted = residuals / np.sqrt(np.clip(1 - leverage, 0.05, None))
    return adjusted - adjusted.mean()


def fit_batch(designs_y: np.ndarray, log_x: np.ndarray, mask: np.ndarray | None = None,
              delta: np.ndarray | None = None, start: np.ndarray | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Point estimates of many problems sharing one design: y [P, n] -> (theta [P, p] on scaled x, loss,
    converged, delta). Every starting point of the grid is refined and the best kept, or with `start`
    [P, p] (bootstrap refits: the original estimate) only that one. Without `delta` it is set per problem
    from a least-squares fit (Huber's k x robust residual scale)."""
    log_y = np.log(designs_y)
    P, n = log_y.shape
    k = log_x.shape[1]
    mask = np.ones_like(log_y) if mask is None else mask
    y_min = np.where(mask > 0, designs_y, np.inf).min(axis=1)
    y_ref = np.exp((log_y * mask).sum(axis=1) / mask.sum(axis=1))
    if start is None:
        starts = np.stack([_starts(k, float(lo), float(ref)) for lo, ref in zip(y_min, y_ref, strict=True)])
    else:
        starts = np.asarray(start, dtype=float).reshape(P, 1, -1)  # [P, S, p]
    lower, upper = _bounds(k, np.log(y_min))
    rep = np.repeat
    points = mask.sum(axis=1)

    def refine(first: np.ndarray, width: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        count = first.shape[1]
        theta, loss, converged = solve(first.reshape(P * count, -1), log_x, rep(log_y, count, 0),
                                       rep(mask, count, 0), rep(width, count), rep(lower, count, 0),
                                       rep(upper, count, 0))
        flat = np.arange(P) * count + loss.reshape(P, count).argmin(axis=1)
        return theta[flat], loss[flat], converged[flat]

    def robust_scale(theta: np.ndarray) -> np.ndarray:
        residuals = np.where(mask > 0, np.abs(log_y - _log_law(theta, log_x)[0]), np.nan)
        scale = 1.4826 * np.nanmedian(residuals, axis=1) * np.sqrt(points / np.maximum(points - (1 + 2 * k), 1))
        return HUBER_K * np.maximum(scale, 1e-6)

    if delta is None:
        # Huber's scale is that of the noise, not of an outlier: start from least squares (a delta no
        # residual reaches), then alternate the robust scale of the residuals and the Huber fit
        best, _, _ = refine(starts, np.full(P, 1e6))
        for round_ in range(3):
            delta = robust_scale(best)
            best, _, _ = refine(starts if round_ == 0 else best[:, None], delta)
        delta = robust_scale(best)
    return (*refine(starts, delta), delta)


def _interval(values: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """Percentile interval of the finite values (NaN, NaN when there are none: no bootstrap was run)."""
    values = np.asarray(values, dtype=float)
    values = values[np.isfinite(values)]
    if not len(values):
        return math.nan, math.nan
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def _at_edge(values: np.ndarray, lo: float, hi: float) -> np.ndarray:
    span = hi - lo
    return (values <= lo + 1e-3 * span) | (values >= hi - 1e-3 * span)


def fit_law(design: Design, n_boot: int = 400, seed: int = 0, level: float = LEVEL) -> LawFit:
    """Fit `L = E + sum_j A_j / x_j^alpha_j` to a design, with bootstrap intervals (see the module doc).

    Never raises on bad input: a design it cannot fit, or a fit that does not converge, comes back with
    `ok=False` and a one-line `reason`."""
    axes, k = design.axes, len(design.axes)
    x = np.asarray(design.x, dtype=float).reshape(len(design.y), k)
    y = np.asarray(design.y, dtype=float)
    keep = np.isfinite(y) & (y > 0) & np.isfinite(x).all(axis=1) & (x > 0).all(axis=1)
    replicates = None if design.replicates is None else np.asarray(design.replicates, dtype=float)[keep]
    x, y = x[keep], y[keep]
    reason = check_design(Design(axes, x, y, replicates))
    if reason:
        return _refused(axes, len(y), reason)
    return fit_laws(axes, x, y[None], None if replicates is None else replicates[None], n_boot, seed, level)[0]


def fit_laws(axes: tuple[str, ...], x: np.ndarray, ys: np.ndarray, replicates: np.ndarray | None = None,
             n_boot: int = 400, seed: int = 0, level: float = LEVEL) -> list[LawFit]:
    """`fit_law` for P data sets on one design at once (simulations; a metric measured several ways):
    x [n, k] (positive, finite), ys [P, n] (positive, finite), replicates [P, n, R] or None."""
    k, (P, n) = len(axes), ys.shape
    x_ref = np.exp(np.log(x).mean(axis=0))
    log_x = np.log(x / x_ref)
    theta, _, converged, delta = fit_batch(ys, log_x)
    pred, jacobian = _log_law(theta, log_x)
    residuals = np.log(ys) - pred
    weight = np.where(np.abs(residuals) <= delta[:, None], 1.0, delta[:, None] / np.abs(residuals))
    rng = np.random.default_rng(seed)
    samples = np.full((P, n_boot, 1 + 2 * k), np.nan)
    if n_boot > 0:
        adjusted = np.stack([_leverage_adjusted(residuals[i], jacobian[i], weight[i]) for i in range(P)])
        noise = np.take_along_axis(adjusted[:, None, :], rng.integers(0, n, size=(P, n_boot, n)), axis=2)
        if replicates is not None and replicates.shape[2]:
            for i in range(P):  # one evaluation resample per bootstrap draw, the same for every trial
                usable = np.flatnonzero(np.isfinite(replicates[i]).all(axis=0) & (replicates[i] > 0).all(axis=0))
                if len(usable):
                    drawn = usable[rng.integers(0, len(usable), n_boot)]
                    noise[i] += np.log(replicates[i][:, drawn].T) - np.log(ys[i])[None]
        resampled = np.exp(pred[:, None, :] + noise).reshape(P * n_boot, n)
        boot, _, boot_converged, _ = fit_batch(resampled, log_x, delta=np.repeat(delta, n_boot),
                                               start=np.repeat(theta, n_boot, axis=0))
        natural = _natural(boot, x_ref)
        natural[~boot_converged] = np.nan
        samples = natural.reshape(P, n_boot, -1)
    estimates = _natural(theta, x_ref)
    names = ["E", *[f"{p}_{a}" for a in axes for p in ("A", "alpha")]]
    fits = []
    for i in range(P):
        if not converged[i]:
            fits.append(_refused(axes, n, "the fit did not converge (the points may not follow a power law: "
                                          "check the trial table for a failed or diverged trial)"))
            continue
        kept = samples[i][np.isfinite(samples[i]).all(axis=1)]
        y_min = float(ys[i].min())
        ranges = {"E": (E_FLOOR * y_min, 10 * y_min), **{f"alpha_{a}": EXPONENT_RANGE for a in axes}}
        params = {name: _estimate(name, estimates[i, j], kept[:, j], ranges.get(name), level)
                  for j, name in enumerate(names)}
        for j, name in enumerate(names):  # a coefficient means something only with its exponent
            if name.startswith("A_") and not params[f"alpha_{name[2:]}"].identified:
                params[name] = Estimate(estimates[i, j], params[name].low, params[name].high, identified=False,
                                        reason=f"its exponent alpha_{name[2:]} is not identified")
        fit = LawFit(axes=tuple(axes), n=n, ok=True, params=params, delta=float(delta[i]), n_boot=len(kept),
                     x_range={a: (float(x[:, j].min()), float(x[:, j].max())) for j, a in enumerate(axes)},
                     samples=kept, theta=estimates[i])
        if len(kept) < n_boot:
            fit.notes.append(f"{n_boot - len(kept)} of {n_boot} bootstrap refits did not converge and are left out")
        fits.append(fit)
    return fits


def _estimate(name: str, value: float, values: np.ndarray, bounds, level: float) -> Estimate:
    if not len(values):
        return Estimate(float(value))
    low, high = _interval(values, level)
    if bounds is None:
        return Estimate(float(value), low, high)
    lo, hi = bounds
    if name == "E":  # judged in log space: E's range spans orders of magnitude
        at_edge = _at_edge(np.log(values), math.log(lo), math.log(hi))
        at_point = bool(_at_edge(np.log([value]), math.log(lo), math.log(hi))[0])
        what = "E reaches 0: the points do not show where the metric flattens"
    else:
        at_edge, at_point = _at_edge(values, lo, hi), bool(_at_edge(np.array([value]), lo, hi)[0])
        what = f"{name} reaches the edge of its range [{lo:g}, {hi:g}]"
    share = float(at_edge.mean())
    if at_point or share > (1 - level) / 2:  # the interval's tail lies on the bound
        where = "at the estimate" if at_point else f"in {share:.0%} of bootstrap refits"
        return Estimate(float(value), low, high, identified=False, reason=f"{what} {where}")
    return Estimate(float(value), low, high)


# --- what a joint fit implies ---------------------------------------------------------------------

FLOPS_PER_PARAM_SAMPLE = 6.0  # C = 6 N D: forward (2 N D) + backward (4 N D) of the trained parameters


def allocation(fit: LawFit, n_axis: str = "N", d_axis: str = "D", level: float = LEVEL) -> dict[str, Estimate]:
    """Compute-optimal allocation of a joint `L(N, D) = E + A/N^alpha + B/D^beta` under C = 6 N D:
    minimising L at fixed C gives N_opt = G (C/6)^a and D_opt = (C/6)^b / G with a = beta/(alpha+beta),
    b = alpha/(alpha+beta), G = (alpha A / (beta B))^(1/(alpha+beta)); along that path
    L_opt(C) - E falls as C^-(alpha beta / (alpha+beta)). Returns a, b and that compute exponent."""
    alpha, beta = fit.params[f"alpha_{n_axis}"], fit.params[f"alpha_{d_axis}"]
    j_n, j_d = fit.axes.index(n_axis), fit.axes.index(d_axis)

    def exponents(al, be):
        return {"a": be / (al + be), "b": al / (al + be), "compute_exponent": al * be / (al + be)}

    point = exponents(alpha.value, beta.value)
    samples = exponents(fit.samples[:, 2 + 2 * j_n], fit.samples[:, 2 + 2 * j_d])
    missing = " and ".join(p for p, e in ((f"alpha_{n_axis}", alpha), (f"alpha_{d_axis}", beta)) if not e.identified)
    return {name: Estimate(value, *_interval(samples[name], level), identified=not missing,
                           reason=f"{missing} not identified" if missing else "")
            for name, value in point.items()}


def optimal_split(fit: LawFit, compute: float, n_axis: str = "N", d_axis: str = "D",
                  level: float = LEVEL) -> dict[str, Estimate]:
    """N_opt and D_opt at `compute` FLOPs (C = 6 N D), with bootstrap intervals."""
    j_n, j_d = fit.axes.index(n_axis), fit.axes.index(d_axis)

    def split(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        a_n, al, a_d, be = theta[:, 1 + 2 * j_n], theta[:, 2 + 2 * j_n], theta[:, 1 + 2 * j_d], theta[:, 2 + 2 * j_d]
        g = (al * a_n / (be * a_d)) ** (1 / (al + be))
        base = compute / FLOPS_PER_PARAM_SAMPLE
        return g * base ** (be / (al + be)), base ** (al / (al + be)) / g

    n_opt, d_opt = (float(v[0]) for v in split(fit.theta[None]))
    n_s, d_s = split(fit.samples)
    weak = [p for p in (f"A_{n_axis}", f"alpha_{n_axis}", f"A_{d_axis}", f"alpha_{d_axis}")
            if not fit.params[p].identified]
    reason = f"{', '.join(weak)} not identified" if weak else ""
    return {"N_opt": Estimate(n_opt, *_interval(n_s, level), identified=not weak, reason=reason),
            "D_opt": Estimate(d_opt, *_interval(d_s, level), identified=not weak, reason=reason)}


@dataclass
class Extrapolation:
    """A law fitted without the largest point of an axis, asked to predict it."""

    axis: str
    x: float
    measured: float
    predicted: float = math.nan
    low: float = math.nan
    high: float = math.nan
    ok: bool = True
    reason: str = ""
    note: str = ""  # what the fit without the point could not identify (the interval carries it)

    @property
    def inside(self) -> bool:
        return bool(self.ok and self.low <= self.measured <= self.high)

    def describe(self) -> str:
        if not self.ok:
            return f"no extrapolation check: {self.reason}"
        verdict = "inside" if self.inside else "OUTSIDE"
        return (f"fitted without {self.axis} = {self.x:.4g}: predicted {self.predicted:.4g} "
                f"[{self.low:.4g}, {self.high:.4g}], measured {self.measured:.4g} ({verdict} the interval)"
                + (f"; {self.note}" if self.note else ""))


def extrapolation_check(design: Design, axis: str, n_boot: int = 400, seed: int = 0,
                        level: float = LEVEL) -> Extrapolation:
    """Fit on every point but those at the largest value of `axis`, predict that value (at each held-out
    trial's other coordinates, averaged) with a prediction interval: the bootstrap spread of the curve
    plus the trials' own noise (a resampled residual of the fit), and compare it with the measured mean."""
    j = design.axes.index(axis)
    x = np.asarray(design.x, dtype=float).reshape(len(design.y), -1)
    y = np.asarray(design.y, dtype=float)
    finite = np.isfinite(y) & np.isfinite(x).all(axis=1)
    if not finite.any():
        return Extrapolation(axis, math.nan, math.nan, ok=False, reason="no finished points")
    top = x[finite, j].max()
    held = finite & (x[:, j] == top)
    measured = float(y[held].mean())
    train = finite & ~held
    replicates = None if design.replicates is None else np.asarray(design.replicates)[train]
    fit = fit_law(Design(design.axes, x[train], y[train], replicates), n_boot=n_boot, seed=seed, level=level)
    if not fit.ok:
        return Extrapolation(axis, float(top), measured, ok=False, reason=fit.reason)
    weak = [name for name, e in fit.params.items() if not e.identified]
    predicted = float(fit.predict(x[held]).mean())
    if not len(fit.samples):
        return Extrapolation(axis, float(top), measured, predicted, ok=False, reason="no bootstrap refits to give an "
                             "interval (tune.fit_bootstrap = 0, or none converged)")
    curves = fit.predict(x[held], fit.samples).mean(axis=1)  # [B]
    rng = np.random.default_rng(seed + 1)
    log_res = np.log(y[train]) - np.log(fit.predict(x[train]))
    # the mean of the held-out trials: each carries its own noise, which averages over them
    noise = log_res[rng.integers(0, len(log_res), size=(len(curves), int(held.sum())))].mean(axis=1)
    draws = curves * np.exp(noise)
    low, high = _interval(draws, level)
    note = f"without it, {', '.join(weak)} not identified" if weak else ""
    return Extrapolation(axis, float(top), measured, predicted, low, high, note=note)
