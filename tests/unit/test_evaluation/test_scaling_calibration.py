"""Calibration of the scaling-law intervals by simulation: sweeps drawn from a known law at the demo
sweep's design (configs/sweeps/demo.toml: 4 model sizes x 4 compute budgets, one seed), with the noise
of a trial's seed and of a finite evaluation set shared by every trial; the 95% intervals must hold the
true exponents and allocation exponents in at least 90% of 200 sweeps.

The same simulation with larger sizes (docs/sweeps.md gives the figures):
`python -m tests.unit.test_evaluation.test_scaling_calibration 1000 400`."""

import sys

import numpy as np

from vlp3d.evaluation.scaling_fit import allocation, fit_laws

# the demo's design: encoder parameters of resnet3d tiny/small/base/large, samples seen at 25-200 steps x 8
PARAMS = np.array([0.90e6, 3.4e6, 7.3e6, 29e6])
SAMPLES = np.array([200.0, 400.0, 800.0, 1600.0])
DESIGN = np.array([(n, d) for n in PARAMS for d in SAMPLES])
# a law in the range of 1 - zero-shot AUROC on the phantoms (0.23 - 0.45)
E, A, ALPHA, B, BETA = 0.10, 9.2, 0.3, 2.83, 0.5
TRUTH = {"alpha_N": ALPHA, "alpha_D": BETA, "a": BETA / (ALPHA + BETA), "b": ALPHA / (ALPHA + BETA)}
SEED_NOISE = 0.05  # log sd of a trial's metric between training seeds
EXAMPLES = 48  # evaluation volumes (the demo's test split)
DIFFICULTY, PER_TRIAL = 0.45, 0.25  # log sd of an example's score: shared by every trial, and the trial's own
REPLICATES = 200  # the evaluation's bootstrap replicates a trial carries (eval.bootstrap)


def simulate(sweeps: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(metric [S, n], evaluation replicates [S, n, R]) of `sweeps` simulated sweeps: each trial's
    metric is the mean of its per-example scores; replicate r of every trial is the mean over the same
    bootstrap resample r of the examples, as vlp3d.evaluation.metrics draws them."""
    law = E + A * DESIGN[:, 0] ** -ALPHA + B * DESIGN[:, 1] ** -BETA
    seed = np.exp(SEED_NOISE * rng.standard_normal((sweeps, len(DESIGN))))
    examples = np.exp(DIFFICULTY * rng.standard_normal((sweeps, 1, EXAMPLES))
                      + PER_TRIAL * rng.standard_normal((sweeps, len(DESIGN), EXAMPLES)))
    examples /= np.exp((DIFFICULTY**2 + PER_TRIAL**2) / 2)  # mean 1 over the population of examples
    scores = law[None, :, None] * seed[..., None] * examples
    weights = rng.multinomial(EXAMPLES, np.full(EXAMPLES, 1 / EXAMPLES), size=(sweeps, REPLICATES)) / EXAMPLES
    return scores.mean(axis=2), np.einsum("snm,srm->snr", scores, weights)


def coverage(sweeps: int, n_boot: int, seed: int = 0) -> tuple[dict[str, float], dict[str, float]]:
    """(share of sweeps whose 95% interval holds the truth, share that says 'not identified') per parameter."""
    rng, fits = np.random.default_rng(seed), []
    for start in range(0, sweeps, 100):  # in chunks: the bootstrap of 100 sweeps at once fits in memory
        metric, replicates = simulate(min(100, sweeps - start), rng)
        fits += fit_laws(("N", "D"), DESIGN, metric, replicates, n_boot=n_boot, seed=seed + start)
    covered = dict.fromkeys(TRUTH, 0)
    unidentified = dict.fromkeys(TRUTH, 0)
    for fit in fits:
        if not fit.ok:  # counts as a miss
            continue
        estimates = {**fit.params, **allocation(fit)}
        for name, truth in TRUTH.items():
            covered[name] += estimates[name].covers(truth)
            unidentified[name] += not estimates[name].identified
    return ({k: v / sweeps for k, v in covered.items()}, {k: v / sweeps for k, v in unidentified.items()})


def test_intervals_cover_the_true_exponents_in_at_least_90_percent_of_simulated_sweeps():
    covered, _ = coverage(sweeps=200, n_boot=100)
    assert min(covered.values()) >= 0.90, covered


if __name__ == "__main__":
    sweeps, n_boot = (int(a) for a in sys.argv[1:3])
    covered, unidentified = coverage(sweeps, n_boot, seed=1)
    for name in TRUTH:
        print(f"{name}: covered {covered[name]:.3f}, not identified {unidentified[name]:.3f}")
