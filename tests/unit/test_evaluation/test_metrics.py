import numpy as np
import pytest
import torch

from vlp3d.evaluation.metrics import (
    retrieval_metrics,
    zero_shot_classification,
    zero_shot_probabilities,
)


def test_retrieval_recall_by_hand():
    # query 0 ranks its match first, query 1 second, query 2 third
    query = torch.eye(3)
    gallery = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.5, 0.0], [0.9, 0.8, 0.1]])
    # similarities: q0 -> [1, .9, .9] rank 0; q1 -> [0, .5, .8] rank 1; q2 -> [0, 0, .1] rank 0
    out = retrieval_metrics(query, gallery, ks=(1, 2))
    assert out["R@1"] == pytest.approx(2 / 3)
    assert out["R@2"] == pytest.approx(1.0)
    assert out["MAP"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert out["pool"] == 3


def test_collapsed_embeddings_score_no_better_than_chance():
    e = torch.ones(10, 4) / 2
    out = retrieval_metrics(e, e, ks=(1, 5))
    assert out["R@1"] == 0.0 and out["R@5"] == 0.0


def test_zero_shot_probabilities_and_auroc():
    image = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6], [0.6, 0.8]])
    positive = torch.tensor([[1.0, 0.0]])
    negative = torch.tensor([[0.0, 1.0]])
    p = zero_shot_probabilities(image, positive, negative, logit_scale=10.0)
    assert p[0, 0] == pytest.approx(1 / (1 + np.exp(-10)))
    labels = np.array([[1], [0], [1], [0]])
    results, summary = zero_shot_classification(labels, p, ["finding"], n_boot=50)
    assert results[0].auroc == 1.0 and summary["macro_auroc"] == 1.0
    assert results[0].f1 == 1.0


def test_single_class_labels_are_skipped():
    labels = np.array([[1, 0], [0, 0], [1, 0]])
    p = np.array([[0.9, 0.1], [0.2, 0.3], [0.7, 0.2]])
    results, summary = zero_shot_classification(labels, p, ["a", "b"], n_boot=0)
    assert [r.label for r in results] == ["a"] and summary["labels_evaluated"] == 1


def test_auroc_equals_scikit_learn_with_ties():
    from sklearn.metrics import roc_auc_score

    from vlp3d.evaluation.metrics import auroc

    rng = np.random.default_rng(0)
    for _ in range(20):
        y = rng.integers(0, 2, 40)
        y[:2] = [0, 1]
        s = rng.integers(0, 5, 40) / 4  # many ties
        assert auroc(y, s) == pytest.approx(roc_auc_score(y, s))
    assert auroc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.75)  # by hand: 3 of 4 pairs ordered


def test_retrieval_ranks_by_hand():
    from vlp3d.evaluation.metrics import retrieval_ranks

    query = torch.eye(3)
    gallery = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.5, 0.0], [0.9, 0.8, 0.1]])
    assert retrieval_ranks(query, gallery).tolist() == [0, 1, 0]


def test_patient_resamples_keep_a_patients_scans_together():
    from vlp3d.evaluation.metrics import patient_resamples

    patients = np.array(["a", "b", "a", "c", "b", "a"])
    for idx in patient_resamples(patients, 20, seed=1):
        drawn = patients[idx]
        draws = 0
        for p in set(drawn):  # every drawn patient comes with all its rows, once per draw
            assert (drawn == p).sum() % (patients == p).sum() == 0
            draws += (drawn == p).sum() // (patients == p).sum()
        assert draws == 3  # as many patients drawn as there are


def _scores(rng, y, shift, patient_effect):
    return shift * y + patient_effect + rng.normal(size=len(y))


def test_paired_bootstrap_covers_the_true_difference():
    """Two simulated models whose population AUROCs are known (Gaussian scores with patient
    effects): the 95% paired patient-bootstrap interval of the difference holds the true one in
    about 95% of 200 simulated evaluations."""
    from scipy.stats import norm

    from vlp3d.evaluation.metrics import auroc, paired_bootstrap

    rng = np.random.default_rng(0)
    sd_patient, shift_a, shift_b = 0.5, 1.0, 1.4
    scale = np.sqrt(2 * (1 + sd_patient**2))  # two volumes of different patients
    truth = norm.cdf(shift_b / scale) - norm.cdf(shift_a / scale)
    covered = 0
    for _ in range(200):
        patients = np.repeat(np.arange(60), rng.integers(1, 4, 60))
        y = (rng.random(len(patients)) < 0.4).astype(int)
        effect = rng.normal(scale=sd_patient, size=60)[patients]
        a, b = _scores(rng, y, shift_a, effect), _scores(rng, y, shift_b, effect)
        result = paired_bootstrap(auroc, y, a, b, patients, n_boot=200, seed=int(rng.integers(1 << 30)))
        covered += result.ci_low <= truth <= result.ci_high
    assert 0.89 <= covered / 200 <= 0.99


def test_promotion_refuses_a_challenger_inside_the_interval():
    from vlp3d.evaluation.metrics import macro_auroc, paired_bootstrap

    rng = np.random.default_rng(3)
    patients = np.arange(150)
    y = (rng.random((150, 2)) < 0.3).astype(int)
    champion = y + rng.normal(size=(150, 2))
    close = champion + 0.05 * rng.normal(size=(150, 2))  # better or worse by chance only
    tie = paired_bootstrap(macro_auroc, y, champion, close, patients, n_boot=300)
    assert tie.ci_low <= 0 <= tie.ci_high and not tie.better
    same = paired_bootstrap(macro_auroc, y, champion, champion.copy(), patients, n_boot=50)
    assert same.difference == 0 and same.ci_low == 0 and not same.better  # equal is not better
    clearly = paired_bootstrap(macro_auroc, y, champion, 3 * y + rng.normal(size=(150, 2)), patients, n_boot=300)
    assert clearly.ci_low > 0 and clearly.better
