"""Zero-shot multi-label AUROC/F1 and volume<->report retrieval, with bootstrap 95% CIs."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from sklearn.metrics import f1_score, roc_auc_score


def zero_shot_probabilities(image_emb: torch.Tensor, positive_emb: torch.Tensor,
                            negative_emb: torch.Tensor, logit_scale: float) -> np.ndarray:
    """P(positive) per (volume, label): softmax over the positive/negative prompt pair.

    image_emb [N, d], positive_emb/negative_emb [L, d], all L2-normalised -> [N, L].
    """
    pos = logit_scale * image_emb @ positive_emb.T
    neg = logit_scale * image_emb @ negative_emb.T
    return torch.softmax(torch.stack([neg, pos], dim=-1), dim=-1)[..., 1].cpu().numpy()


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
            auroc=float(roc_auc_score(y, s)),
            auroc_ci=_bootstrap(roc_auc_score, y, s, n_boot, seed + j),
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

        def macro(yb, sb):
            values = [roc_auc_score(yb[:, k], sb[:, k]) for k in range(yb.shape[1])
                      if yb[:, k].min() != yb[:, k].max()]
            return float(np.mean(values)) if values else float("nan")

        rng = np.random.default_rng(seed)
        boots = [macro(y[idx], s[idx]) for idx in (rng.integers(0, len(y), len(y)) for _ in range(n_boot))]
        summary["macro_auroc_ci_low"], summary["macro_auroc_ci_high"] = (
            float(np.nanpercentile(boots, 2.5)), float(np.nanpercentile(boots, 97.5)))
    return results, summary


def retrieval_metrics(query_emb: torch.Tensor, gallery_emb: torch.Tensor, ks=(1, 5, 10)) -> dict[str, float]:
    """Recall@k and MAP for paired embeddings (query i matches gallery i); pool = len(gallery)."""
    similarity = query_emb @ gallery_emb.T
    target = similarity.diagonal().unsqueeze(1)
    # rank of the true match; ties count against the query (collapsed embeddings score chance, not 1)
    rank = (similarity >= target).sum(dim=1) - 1
    out = {f"R@{k}": float((rank < k).float().mean()) for k in ks}
    # one relevant item per query: average precision = 1 / (rank + 1)
    out["MAP"] = float((1.0 / (rank.float() + 1)).mean())
    out["pool"] = int(gallery_emb.shape[0])
    return out


def chance_recall(k: int, pool: int) -> float:
    return min(1.0, k / pool)
