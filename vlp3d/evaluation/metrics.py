"""Zero-shot multi-label AUROC/F1 and volume<->report retrieval, with bootstrap 95% CIs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import f1_score


def zero_shot_probabilities(image_emb: torch.Tensor, positive_emb: torch.Tensor,
                            negative_emb: torch.Tensor, logit_scale: float) -> np.ndarray:
    """P(positive) per (volume, label): softmax over the positive/negative prompt pair.

    image_emb [N, d], positive_emb/negative_emb [L, d], all L2-normalised -> [N, L].
    """
    pos = logit_scale * image_emb @ positive_emb.T
    neg = logit_scale * image_emb @ negative_emb.T
    return torch.softmax(torch.stack([neg, pos], dim=-1), dim=-1)[..., 1].cpu().numpy()


def auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve of binary `labels` (both classes present): the share of (positive,
    negative) pairs the scores order correctly, ties counted half (Mann-Whitney U). Equal to
    scikit-learn's `roc_auc_score` without its input checks, which cost more than the count inside
    the thousands of calls of a bootstrap."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores)
    negatives = np.sort(scores[~labels])
    positives = scores[labels]
    below = np.searchsorted(negatives, positives, "left")
    below_or_equal = np.searchsorted(negatives, positives, "right")
    return float((below.sum() + below_or_equal.sum()) / (2 * len(positives) * len(negatives)))


@dataclass
class LabelResult:
    label: str
    auroc: float
    auroc_ci: tuple[float, float]
    f1: float
    positives: int
    n: int


def _bootstrap(metric, y: np.ndarray, s: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    if n_boot <= 0:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(n_boot):
        idx = rng.integers(0, len(y), len(y))
        if y[idx].min() == y[idx].max():
            continue
        values.append(metric(y[idx], s[idx]))
    if not values:
        return (float("nan"), float("nan"))
    return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))


def zero_shot_classification(labels: np.ndarray, probabilities: np.ndarray, names: list[str],
                             n_boot: int = 200, seed: int = 0) -> tuple[list[LabelResult], dict[str, float]]:
    """Per-label AUROC (with CI) and F1 at p >= 0.5; labels with a single class are skipped."""
    results = []
    for j, name in enumerate(names):
        y, s = labels[:, j].astype(int), probabilities[:, j]
        if y.min() == y.max():
            continue
        results.append(LabelResult(
            label=name,
            auroc=float(auroc(y, s)),
            auroc_ci=_bootstrap(auroc, y, s, n_boot, seed + j),
            f1=float(f1_score(y, s >= 0.5, zero_division=0)),
            positives=int(y.sum()),
            n=len(y),
        ))
    summary = {
        "macro_auroc": float(np.mean([r.auroc for r in results])) if results else float("nan"),
        "macro_f1": float(np.mean([r.f1 for r in results])) if results else float("nan"),
        "labels_evaluated": len(results),
    }
    if results and n_boot > 0:
        cols = [names.index(r.label) for r in results]
        y, s = labels[:, cols].astype(int), probabilities[:, cols]
        rng = np.random.default_rng(seed)
        boots = [macro_auroc(y[idx], s[idx]) for idx in (rng.integers(0, len(y), len(y)) for _ in range(n_boot))]
        summary["macro_auroc_ci_low"], summary["macro_auroc_ci_high"] = (
            float(np.nanpercentile(boots, 2.5)), float(np.nanpercentile(boots, 97.5)))
    return results, summary


def retrieval_ranks(query_emb: torch.Tensor, gallery_emb: torch.Tensor) -> torch.Tensor:
    """0-based rank of each query's true match (gallery i for query i) among the whole gallery."""
    similarity = query_emb @ gallery_emb.T
    target = similarity.diagonal().unsqueeze(1)
    # ties count against the query (collapsed embeddings score chance, not 1)
    return (similarity >= target).sum(dim=1) - 1


def retrieval_metrics(query_emb: torch.Tensor, gallery_emb: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k and MAP for paired embeddings (query i matches gallery i); pool = len(gallery)."""
    rank = retrieval_ranks(query_emb, gallery_emb)
    out = {f"R@{k}": float((rank < k).float().mean()) for k in ks}
    # one relevant item per query: average precision = 1 / (rank + 1)
    out["MAP"] = float((1.0 / (rank.float() + 1)).mean())
    out["pool"] = int(gallery_emb.shape[0])
    return out


def chance_recall(k: int, pool: int) -> float:
    return min(1.0, k / pool)


def patient_resamples(patients: np.ndarray, n_boot: int, seed: int = 0):
    """Row indices of `n_boot` bootstrap samples drawn by patient: each draws as many patients as
    there are, with replacement, and takes every row of each (a patient's scans stay together, so
    intervals are not too narrow when patients have several scans)."""
    _, inverse = np.unique(np.asarray(patients), return_inverse=True)
    order = np.argsort(inverse, kind="stable")  # rows grouped by patient
    counts = np.bincount(inverse)
    starts = np.cumsum(counts) - counts
    rng = np.random.default_rng(seed)
    for _ in range(n_boot):
        drawn = rng.integers(0, len(counts), len(counts))
        sizes = counts[drawn]
        offsets = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        yield order[np.repeat(starts[drawn], sizes) + offsets]


def macro_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """Mean AUROC over the columns of [N, L] labels/scores that hold both classes (NaN if none)."""
    labels, scores = np.asarray(labels).reshape(len(labels), -1), np.asarray(scores).reshape(len(scores), -1)
    values = [auroc(labels[:, k], scores[:, k]) for k in range(labels.shape[1])
              if labels[:, k].min() != labels[:, k].max()]
    return float(np.mean(values)) if values else float("nan")


@dataclass
class PairedDifference:
    """metric(challenger) - metric(champion) on the same rows, with its paired bootstrap interval."""

    champion: float
    challenger: float
    difference: float
    ci_low: float
    ci_high: float
    n_boot: int  # resamples where both values were defined
    level: float = 0.95

    @property
    def better(self) -> bool:
        """The promotion rule: the challenger wins only if the whole interval is above zero."""
        return bool(np.isfinite(self.ci_low) and self.ci_low > 0)


def paired_bootstrap(metric, labels: np.ndarray | None, champion: np.ndarray, challenger: np.ndarray,
                     patients: np.ndarray, n_boot: int = 1000, seed: int = 0,
                     level: float = 0.95) -> PairedDifference:
    """`metric(labels, values) -> float` of two models' per-row values (zero-shot probabilities with
    the labels, retrieval hits with labels None, ...), compared on the same patients in every
    resample: the interval is of the difference, so what both models find hard cancels out."""
    def on(idx, values):
        return metric(None if labels is None else labels[idx], values[idx])

    every = np.arange(len(champion))
    champion_value, challenger_value = float(on(every, champion)), float(on(every, challenger))
    differences = []
    for idx in patient_resamples(patients, n_boot, seed):
        difference = on(idx, challenger) - on(idx, champion)
        if np.isfinite(difference):
            differences.append(difference)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(differences, [tail, 100 - tail]) if differences else (np.nan, np.nan)
    return PairedDifference(champion_value, challenger_value, challenger_value - champion_value,
                            float(low), float(high), len(differences), level)


def macro_auroc_replicates(labels: np.ndarray, scores: np.ndarray, patients: np.ndarray, n_boot: int,
                           seed: int = 0) -> np.ndarray:
    """Macro AUROC on `n_boot` resamples of the patients (`patient_resamples` with `seed`). Models scored
    on the same rows in the same order (a sweep's trials, rows sorted by volume name) get the same
    resamples: replicate r of every model saw the same examples, which is what lets a scaling fit's
    bootstrap redraw the evaluation set for all trials at once."""
    return np.array([macro_auroc(labels[idx], scores[idx]) for idx in patient_resamples(patients, n_boot, seed)])
