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
