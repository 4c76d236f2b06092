"""Zero-shot classification and retrieval of an embedding model on a held-out split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from vlp3d.data.labels import zero_shot_prompts
from vlp3d.evaluation.metrics import (
    chance_recall,
    retrieval_metrics,
    zero_shot_classification,
    zero_shot_probabilities,
)


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    per_label: pd.DataFrame
    retrieval: pd.DataFrame
    n: int


def evaluate_embeddings(image_emb: torch.Tensor, report_emb: torch.Tensor, labels: np.ndarray,
                        label_names: list[str], embed_prompts, logit_scale: float,
                        evaluate_labels: tuple[str, ...] = (), n_boot: int = 200, seed: int = 0) -> EvaluationResult:
    """`embed_prompts(list[str]) -> [L, d]` turns prompts into the shared space."""
    names = list(evaluate_labels) or label_names
    unknown = [n for n in names if n not in label_names]
    if unknown:
        raise KeyError(f"eval.labels: {unknown} not in the shard labels {label_names}")
    cols = [label_names.index(n) for n in names]
    prompts = [zero_shot_prompts(n) for n in names]
    positive = embed_prompts([p for p, _ in prompts])
    negative = embed_prompts([n for _, n in prompts])
    probabilities = zero_shot_probabilities(image_emb, positive, negative, logit_scale)
    results, summary = zero_shot_classification(labels[:, cols], probabilities, names, n_boot=n_boot, seed=seed)
    per_label = pd.DataFrame([{
        "label": r.label, "auroc": r.auroc, "auroc_ci_low": r.auroc_ci[0], "auroc_ci_high": r.auroc_ci[1],
        "f1": r.f1, "positives": r.positives, "n": r.n} for r in results])
    v2r = retrieval_metrics(image_emb, report_emb)
    r2v = retrieval_metrics(report_emb, image_emb)
    pool = v2r["pool"]
    retrieval = pd.DataFrame([
        {"direction": "volume->report", **{k: v2r[k] for k in ("R@1", "R@5", "R@10", "MAP")}, "pool": pool},
        {"direction": "report->volume", **{k: r2v[k] for k in ("R@1", "R@5", "R@10", "MAP")}, "pool": pool},
        {"direction": "chance", "R@1": chance_recall(1, pool), "R@5": chance_recall(5, pool),
         "R@10": chance_recall(10, pool), "MAP": float(np.mean(1.0 / np.arange(1, pool + 1))), "pool": pool},
    ])
    metrics = {**summary}
    for r in results:
        metrics[f"auroc/{r.label}"] = r.auroc
    for direction, values in (("v2r", v2r), ("r2v", r2v)):
        for k in (1, 5, 10):
            metrics[f"{direction}/recall_at_{k}"] = values[f"R@{k}"]
        metrics[f"{direction}/map"] = values["MAP"]
    metrics["retrieval_pool"] = pool
    return EvaluationResult(metrics, per_label, retrieval, n=len(labels))
