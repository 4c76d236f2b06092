"""Scaling-law fits in log space with a Huber loss: known laws recovered, the optimum scipy finds, one
bad trial resisted, what a design cannot identify said in words, allocation and extrapolation."""

import math

import numpy as np
import pytest

from vlp3d.evaluation.scaling_fit import (
    Design,
    allocation,
    extrapolation_check,
    fit_batch,
    fit_law,
    optimal_split,
)

N = np.array([0.9e6, 2.5e6, 7e6, 25e6])
D = np.array([200.0, 400.0, 800.0, 1600.0])
GRID = np.array([(n, d) for n in N for d in D])
LAW = {"E": 0.12, "A_N": 30.0, "alpha_N": 0.3, "A_D": 8.0, "alpha_D": 0.5}


def joint(x, p=LAW):
    return p["E"] + p["A_N"] * x[:, 0] ** -p["alpha_N"] + p["A_D"] * x[:, 1] ** -p["alpha_D"]


def test_exact_laws_are_recovered():
    fit = fit_law(Design(("N", "D"), GRID, joint(GRID)), n_boot=0)
    assert fit.ok and {k: e.value for k, e in fit.params.items()} == pytest.approx(LAW, rel=1e-3)
    x = np.geomspace(50, 5000, 6)[:, None]
    one = fit_law(Design(("D",), x, 0.4 + 20 * x[:, 0] ** -0.45), n_boot=0)
    assert (one.params["E"].value, one.params["A_D"].value, one.params["alpha_D"].value) == pytest.approx(
        (0.4, 20, 0.45), rel=1e-3)
    assert one.predict(x) == pytest.approx(0.4 + 20 * x[:, 0] ** -0.45, rel=1e-6)


def test_the_optimum_is_the_one_scipy_least_squares_finds():
    """Same Huber loss on log residuals, same delta: the batched solver and scipy's trust-region solver agree."""
    from scipy.optimize import least_squares

    rng = np.random.default_rng(3)
    y = joint(GRID) * np.exp(0.05 * rng.standard_normal(len(GRID)))
    x_ref = np.exp(np.log(GRID).mean(axis=0))
    log_x = np.log(GRID / x_ref)
    theta, loss, converged, delta = fit_batch(y[None], log_x)

    def residuals(t):
        terms = np.stack([np.full(len(y), t[0]), t[1] - t[2] * log_x[:, 0], t[3] - t[4] * log_x[:, 1]])
        return np.log(y) - np.logaddexp.reduce(terms, axis=0)

    best = min((least_squares(residuals, start, loss="huber", f_scale=delta[0], method="trf", x_scale="jac")
                for start in (theta[0] + s for s in (0, 0.3, -0.3))), key=lambda r: r.cost)
    # scipy's huber cost is delta^2 * (our loss) / delta^2 up to the factor it uses: compare the minimisers
    assert converged[0]
    ours = np.log(y) - residuals(theta[0])
    theirs = np.log(y) - best.fun
    assert ours == pytest.approx(theirs, abs=2e-4)
    assert theta[0][[2, 4]] == pytest.approx(best.x[[2, 4]], abs=5e-3)


def test_one_bad_trial_does_not_bend_the_law():
    x = np.geomspace(10, 1e5, 8)[:, None]
    rng = np.random.default_rng(0)
    y = (0.5 + 10 * x[:, 0] ** -0.4) * np.exp(0.01 * rng.standard_normal(8))
    y[3] *= 1.5  # a mis-evaluated or diverged trial
    robust = fit_law(Design(("D",), x, y), n_boot=0)
    assert robust.params["alpha_D"].value == pytest.approx(0.4, abs=0.015)
    assert robust.params["E"].value == pytest.approx(0.5, abs=0.02)
    assert robust.delta < 0.06  # Huber's delta from the noise (1%), not from the outlier (40%)
    # least squares on the same points (a delta no residual reaches) is pulled away
    theta, *_ = fit_batch(y[None], np.log(x / np.exp(np.log(x).mean())), delta=np.array([1e6]))
    assert abs(theta[0, 2] - 0.4) > 0.06 and abs(math.exp(theta[0, 0]) - 0.5) > 0.1


def test_what_the_design_cannot_identify_is_said_in_words():
    two = fit_law(Design(("D",), np.array([[100.0], [100.0], [400.0], [400.0]]), np.array([3.0, 3.1, 2.0, 2.1])))
    assert not two.ok and two.reason.startswith("too few distinct points: D has 2")
    exact = fit_law(Design(("D",), np.array([[100.0], [200.0], [400.0]]), np.array([3.0, 2.5, 2.2])))
    assert not exact.ok and "3 points for 3 parameters" in exact.reason
    # a pure power law without a floor: nothing shows where the metric flattens, E is at 0
    rng = np.random.default_rng(0)
    x = np.repeat([100.0, 200.0, 400.0, 800.0], 2)[:, None]
    pure = fit_law(Design(("D",), x, 5 * x[:, 0] ** -0.5 * np.exp(0.02 * rng.standard_normal(8))), n_boot=200)
    assert pure.ok and not pure.params["E"].identified
    assert pure.params["E"].describe().startswith("not identified (E reaches 0")
    # a flat metric: the exponent runs to the edge of its range
    flat = fit_law(Design(("D",), x, 2.0 * np.exp(0.02 * rng.standard_normal(8))), n_boot=200)
    assert flat.ok and not flat.params["alpha_D"].identified
    assert "reaches the edge of its range [0.01, 3]" in flat.params["alpha_D"].describe()
    assert "not identified" in flat.params["A_D"].describe()  # a coefficient without its exponent


def test_compute_optimal_allocation_of_a_known_law():
    fit = fit_law(Design(("N", "D"), GRID, joint(GRID) * np.exp(0.01 * np.random.default_rng(1).standard_normal(16))),
                  n_boot=100)
    alloc = allocation(fit)
    a, b = LAW["alpha_D"] / (LAW["alpha_N"] + LAW["alpha_D"]), LAW["alpha_N"] / (LAW["alpha_N"] + LAW["alpha_D"])
    assert alloc["a"].value + alloc["b"].value == pytest.approx(1.0)
    assert alloc["a"].covers(a) and alloc["b"].covers(b)
    # N_opt at C = 6 N D: the minimum of the exact law along N * D = C / 6, found by brute force
    exact = fit_law(Design(("N", "D"), GRID, joint(GRID)), n_boot=20)
    compute = 6 * 5e6 * 1000
    n_grid = np.geomspace(1e4, 1e10, 20001)
    brute = n_grid[np.argmin(joint(np.column_stack([n_grid, compute / 6 / n_grid])))]
    split = optimal_split(exact, compute)
    assert split["N_opt"].value == pytest.approx(brute, rel=2e-3)
    assert split["N_opt"].value * split["D_opt"].value == pytest.approx(compute / 6)


def test_extrapolation_to_the_largest_point():
    rng = np.random.default_rng(2)
    y = joint(GRID) * np.exp(0.01 * rng.standard_normal(16))
    check = extrapolation_check(Design(("N", "D"), GRID, y), "D", n_boot=200)
    assert check.ok and check.x == 1600 and check.inside and "inside the interval" in check.describe()
    assert check.low < check.predicted < check.high
    y[GRID[:, 1] == 1600] *= 1.5  # the largest budget did far worse than the law of the others says
    check = extrapolation_check(Design(("N", "D"), GRID, y), "D", n_boot=200)
    assert check.ok and not check.inside and "OUTSIDE" in check.describe()
    few = extrapolation_check(Design(("D",), np.array([[1.0], [2.0], [4.0], [8.0]]), np.ones(4)), "D")
    assert not few.ok and few.describe().startswith("no extrapolation check: 3 points for 3 parameters")
    assert math.isnan(few.low)
