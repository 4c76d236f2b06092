"""A sweep's trial table -> its scaling laws: which trials enter which fit (finished ones, repeated data
left out), the laws its design supports, the allocation of a joint fit, the compute frontier."""

import numpy as np
import pandas as pd
import pytest

from vlp3d.evaluation.scaling import add_data_columns, compute_frontier, fits_table, scaling_results

SIZES = {"tiny": 0.9e6, "small": 3.4e6, "base": 7.3e6, "large": 29e6}
STEPS = (25, 50, 100, 200)


def sweep_table(rng, fraction=1.0, n_train=404, batch=8):
    rows = []
    for size, params in SIZES.items():
        for steps in STEPS:
            samples = steps * batch
            law = 0.10 + 9.2 * params**-0.3 + 2.83 * samples**-0.5
            y = law * np.exp(0.01 * rng.standard_normal())
            replicates = y * np.exp(0.01 * rng.standard_normal(50))
            rows.append({"trial_id": f"{size}-{steps}", "status": "finished", "model.size": size,
                         "train.max_steps": steps, "data.fraction": fraction, "steps": steps, "global_batch": batch,
                         "n_train": n_train, "trainable_params": params, "train_flops": 6 * params * samples,
                         "macro_auroc": 1 - y, "macro_auroc_replicates": list(1 - replicates)})
    return add_data_columns(pd.DataFrame(rows))


def test_a_size_by_budget_sweep_gives_every_law_and_the_allocation():
    table = sweep_table(np.random.default_rng(0))
    table.loc[len(table)] = {**table.iloc[0].to_dict(), "trial_id": "stopped", "status": "stopped", "macro_auroc": 0.9}
    results = scaling_results(table, ["model.size", "train.max_steps"], n_boot=200, fit_repeated_data=True)
    laws = [(r.law, r.group) for r in results]
    assert laws[:4] == [("L(N)", f"train.max_steps={s}") for s in STEPS]
    assert [law for law, _ in laws].count("L(D)") == 4 and laws[-2:] == [("L(C)", "all trials"),
                                                                          ("L(N, D)", "all trials")]
    joint = results[-1]
    assert joint.fit.ok and joint.fit.n == 16  # the stopped trial is not a point of the law
    assert joint.design.replicates.shape == (16, 50)
    assert joint.fit.params["alpha_N"].covers(0.3) and joint.fit.params["alpha_D"].covers(0.5)
    assert joint.allocation["a"].covers(0.5 / 0.8) and joint.allocation["b"].covers(0.3 / 0.8)
    assert joint.extrapolation is not None and joint.extrapolation.x == 1600
    frontier = next(r for r in results if r.law == "L(C)")
    assert np.all(np.diff(frontier.design.x[:, 0]) > 0) and np.all(np.diff(frontier.design.y) < 0)
    rows = fits_table(results)
    assert {"alpha_N", "alpha_D", "a", "b", "E"} <= set(rows.loc[rows["law"] == "L(N, D)", "parameter"])
    assert any(p.startswith("extrapolation to D=1600") for p in rows["parameter"])
    text = "\n".join(line for r in results for line in r.lines())
    assert "compute-optimal allocation (C = 6 N D)" in text and "extrapolation: fitted without D = 1600" in text


def test_repeated_data_is_flagged_and_left_out_unless_asked():
    table = sweep_table(np.random.default_rng(1), n_train=200)  # 200 volumes: 1600 samples = 8 epochs
    assert table["epochs"].max() == pytest.approx(8.0) and table["repeated"].sum() == 4
    joint = scaling_results(table, ["model.size", "train.max_steps"], n_boot=50)[-1]
    assert joint.fit.n == 12 and joint.left_out.startswith("4 trial(s) beyond 4 epochs")
    assert scaling_results(table, ["model.size", "train.max_steps"], n_boot=50, fit_repeated_data=True)[-1].fit.n == 16


def test_a_design_that_identifies_nothing_says_why():
    table = sweep_table(np.random.default_rng(2))
    two_sizes = table[table["model.size"].isin(["tiny", "small"]) & (table["train.max_steps"] == 100)]
    [by_size, by_compute] = scaling_results(two_sizes, ["model.size"], n_boot=50)
    assert by_size.law == "L(N)" and not by_size.fit.ok
    assert by_size.fit.reason == ("too few distinct points: N has 2 (a power law with an offset needs >= 3 per axis)")
    assert "no fit: too few distinct points" in "\n".join(by_size.lines())
    # without a bootstrap (tune.fit_bootstrap = 0): estimates without intervals, said so, no traceback
    text = "\n".join(line for r in scaling_results(table, ["model.size", "train.max_steps"], n_boot=0) for line in r.lines())
    assert "(no interval: no bootstrap)" in text and "no extrapolation check: no bootstrap refits" in text
    # data.fraction at fixed steps moves the unique volumes, not the volumes seen: no law to fit
    assert scaling_results(table.assign(**{"data.fraction": 0.5}), ["data.fraction"]) == []


def test_compute_frontier_keeps_points_better_than_all_cheaper_ones():
    compute = [1, 2, 2, 4, 8, 16, 3]
    loss = [5.0, 4.0, 4.5, 4.2, 3.0, 3.5, 3.9]
    # by compute: 1 (5.0), 2 (4.0 beats 5.0; 4.5 does not), 3 (3.9), 4 (4.2 no), 8 (3.0), 16 (3.5 no)
    assert compute_frontier(compute, loss).tolist() == [0, 1, 6, 4]


def test_every_law_is_drawn_with_its_band():
    from vlp3d.evaluation.plots import scaling_figures

    table = sweep_table(np.random.default_rng(3))
    results = scaling_results(table, ["model.size", "train.max_steps"], n_boot=50, fit_repeated_data=True)
    figures = scaling_figures(results)
    assert set(figures) == {"scaling_N", "scaling_D", "scaling_C", "scaling_N_D"}
    joint = figures["scaling_N_D"].axes[0]
    assert len(joint.collections) >= 8  # per model size: its points and its fitted curve's 95% band
    assert "N=9e+05" in [t.get_text().split(";")[0] for t in joint.get_legend().get_texts()]
