import numpy as np

from vlp3d.evaluation.probe import (
    ProbeSplit,
    choose_c,
    compare_probes,
    fraction_rows,
    linear_probe,
    validation_rows,
)


def _split(rng, n, signal, prevalence=(0.3, 0.1)):
    labels = (rng.random((n, len(prevalence))) < prevalence).astype(int)
    features = rng.normal(size=(n, 16))
    features[:, :labels.shape[1]] += signal * labels
    patients = np.array([f"p{i // 2}" for i in range(n)])  # two scans per patient
    unique, inverse = np.unique(patients, return_inverse=True)
    return ProbeSplit(features, labels, patients, rng.random(len(unique))[inverse])


def test_probe_tells_informative_features_from_noise_and_skips_with_a_reason():
    rng = np.random.default_rng(0)
    train, test = _split(rng, 300, 2.5), _split(rng, 120, 2.5)
    smallest = fraction_rows(train.fraction_rank, 0.02)
    train.labels[smallest, 0], train.labels[smallest, 1] = [1, 0, 0, 1, 0, 0], 0  # no nodule in the 2% subset
    noise = ProbeSplit(rng.normal(size=(300, 16)), train.labels, train.patients, train.fraction_rank)
    names = ["effusion", "nodule"]
    good = linear_probe(train, test, names, fractions=(0.02, 1.0), n_boot=100)
    bad = linear_probe(noise, ProbeSplit(rng.normal(size=(120, 16)), test.labels, test.patients), names,
                       fractions=(0.02, 1.0), n_boot=100)
    full = good[(good.fraction == 1.0) & (good.label == "macro")].iloc[0]
    assert full.auroc > 0.9 and full.auroc_ci_low <= full.auroc <= full.auroc_ci_high and full.labels == 2
    chance = bad[(bad.fraction == 1.0) & (bad.label == "macro")].iloc[0]
    assert chance.auroc_ci_low < 0.5 + 0.1 and chance.auroc < full.auroc_ci_low
    # 2% of 150 patients: 3 patients, 6 scans; the rare finding has no positive there
    small = good[good.fraction == 0.02].set_index("label")
    assert small.loc["effusion", "train_volumes"] == 6 and small.loc["effusion", "positives"] == 2
    assert small.loc["nodule", "positives"] == 0 and "0 positives in 6 training volumes" in small.loc["nodule", "skipped"]
    assert np.isnan(small.loc["nodule", "auroc"]) and small.loc["macro", "labels"] == 1
    table = compare_probes({"pretrained": good, "random init": bad})
    assert list(table["features"]) == ["pretrained", "pretrained", "random init", "random init"]


def test_fractions_are_nested_and_the_validation_fold_holds_whole_patients():
    rank = np.random.default_rng(1).random(100)
    small, large = fraction_rows(rank, 0.1), fraction_rows(rank, 0.5)
    assert not (small & ~large).any() and fraction_rows(rank, 1.0).all()
    patients = np.repeat(np.arange(40), 2)
    y = np.repeat((np.arange(40) % 4 == 0).astype(int), 2)
    held = validation_rows(patients, y, 0.25, seed=0)
    assert all(held[patients == p].all() or not held[patients == p].any() for p in range(40))
    assert y[held].sum() == 2 * round(0.25 * 10) and (1 - y[held]).sum() == 2 * round(0.25 * 30)


def test_regularisation_falls_back_when_the_fold_cannot_rank():
    rng = np.random.default_rng(2)
    x, y = rng.normal(size=(8, 4)), np.array([1, 0, 0, 0, 0, 0, 0, 0])
    c, how = choose_c(x, y, np.arange(8))
    assert c == 1.0 and how.startswith("default")
    y = (rng.random(200) < 0.5).astype(int)
    x = rng.normal(size=(200, 4)) + 3 * y[:, None]
    c, how = choose_c(x, y, np.arange(200), cs=(0.001, 1.0))
    assert how.startswith("validation fold") and c in (0.001, 1.0)



def test_a_fraction_with_no_training_volume_is_skipped_not_a_crash():
    """0.1 of a tiny split can hold no patient at all (the tiny demo's 10%): every label is skipped
    with its reason; before, the empty fit reached scikit-learn (a ValueError, exit 3 from `probe`)."""
    rng = np.random.default_rng(1)
    train, test = _split(rng, 20, 2.5), _split(rng, 20, 2.5)
    train = ProbeSplit(train.features, train.labels, train.patients, np.maximum(train.fraction_rank, 0.5))
    table = linear_probe(train, test, ["effusion", "nodule"], fractions=(0.1, 1.0), n_boot=10).set_index(
        ["fraction", "label"])
    assert table.loc[(0.1, "effusion"), "train_volumes"] == 0
    assert "0 positives in 0 training volumes" in table.loc[(0.1, "effusion"), "skipped"]
    assert table.loc[(0.1, "macro"), "skipped"] == "no label could be probed"
    assert table.loc[(1.0, "macro"), "auroc"] > 0.5
