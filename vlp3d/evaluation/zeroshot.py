"""Zero-shot classification and retrieval of an embedding model on a held-out split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch

from vlp3d.errors import InputError
from vlp3d.evaluation.metrics import (
    chance_recall,
    macro_auroc,
    retrieval_metrics,
    retrieval_ranks,
    zero_shot_classification,
    zero_shot_probabilities,
)
from vlp3d.evaluation.prompts import BUILTIN_SETS, PromptSet, ensemble_embeddings

DEFAULT_ENSEMBLE = ("report",)


@dataclass
class EvaluationResult:
    metrics: dict[str, float]
    per_label: pd.DataFrame
    retrieval: pd.DataFrame
    n: int
    prompt_sets: pd.DataFrame | None = None  # macro AUROC per prompt set and for the ensemble
    # per volume, for plots and paired comparisons: zero-shot P(positive) and 0/1 targets of the
    # evaluated labels [N, L'], and the 0-based rank of each volume's true match per direction
    probabilities: np.ndarray | None = None
    targets: np.ndarray | None = None
    label_names: list[str] | None = None
    ranks: dict[str, np.ndarray] | None = None


def evaluate_embeddings(image_emb: torch.Tensor, report_emb: torch.Tensor, labels: np.ndarray,
                        label_names: list[str], embed_prompts, logit_scale: float,
                        evaluate_labels: tuple[str, ...] = (), n_boot: int = 200, seed: int = 0,
                        prompt_sets: dict[str, PromptSet] | None = None,
                        ensemble: tuple[str, ...] = DEFAULT_ENSEMBLE) -> EvaluationResult:
    """`embed_prompts(list[str]) -> [L, d]` turns prompts into the shared space.

    Zero-shot scores use the prompt ensemble `ensemble` (names in `prompt_sets`, default the
    built-in sets): per label, the mean embedding of every positive and every negative phrasing.
    Each set alone is also scored (`prompts/<set>/macro_auroc`, no intervals), so a drop on
    wording the model never saw (the `heldout` set) is visible."""
    names = list(evaluate_labels) or label_names
    unknown = [n for n in names if n not in label_names]
    if unknown:
        raise InputError(f"eval.labels: {unknown} not in the shard labels {label_names}")
    sets = prompt_sets or BUILTIN_SETS
    missing = [n for n in ensemble if n not in sets]
    if missing or not ensemble:
        raise InputError(f"eval.prompt_ensemble = {list(ensemble)}: {missing or 'empty'}; prompt sets are {sorted(sets)}.")
    cols = [label_names.index(n) for n in names]
    positive, negative = ensemble_embeddings(names, [sets[n] for n in ensemble], embed_prompts)
    probabilities = zero_shot_probabilities(image_emb, positive, negative, logit_scale)
    results, summary = zero_shot_classification(labels[:, cols], probabilities, names, n_boot=n_boot, seed=seed)
    set_rows = []
    for set_name, prompt_set in sets.items():
        if (set_name,) == tuple(ensemble):  # the ensemble is this one set: scored above already
            macro = summary["macro_auroc"]
        else:
            pos, neg = ensemble_embeddings(names, [prompt_set], embed_prompts)
            scores = zero_shot_probabilities(image_emb, pos, neg, logit_scale)
            macro = zero_shot_classification(labels[:, cols], scores, names, n_boot=0)[1]["macro_auroc"]
        set_rows.append({"prompts": set_name, "macro_auroc": macro})
    set_rows.append({"prompts": f"ensemble {'+'.join(ensemble)}", "macro_auroc": summary["macro_auroc"]})
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
    for row in set_rows[:-1]:
        metrics[f"prompts/{row['prompts']}/macro_auroc"] = row["macro_auroc"]
    for r in results:
        metrics[f"auroc/{r.label}"] = r.auroc
    for direction, values in (("v2r", v2r), ("r2v", r2v)):
        for k in (1, 5, 10):
            metrics[f"{direction}/recall_at_{k}"] = values[f"R@{k}"]
        metrics[f"{direction}/map"] = values["MAP"]
    metrics["retrieval_pool"] = pool
    evaluated = [names.index(r.label) for r in results]
    ranks = {"v2r": retrieval_ranks(image_emb, report_emb).numpy(), "r2v": retrieval_ranks(report_emb, image_emb).numpy()}
    return EvaluationResult(metrics, per_label, retrieval, n=len(labels), prompt_sets=pd.DataFrame(set_rows),
                            probabilities=probabilities[:, evaluated], targets=labels[:, cols][:, evaluated].astype(int),
                            label_names=[names[j] for j in evaluated], ranks=ranks)


PAIRED_METRICS = ("macro_auroc", *(f"{d}/{m}" for d in ("v2r", "r2v")
                                   for m in ("recall_at_1", "recall_at_5", "recall_at_10", "map")))


def paired_metric_name(metric: str) -> str:
    """`metric` as PAIRED_METRICS names it (`eval/<split>/macro_auroc` -> `macro_auroc`); a ValueError
    listing them if it is none of them."""
    name = metric.split("/", 2)[-1] if metric.startswith("eval/") else metric
    if name not in PAIRED_METRICS:
        raise InputError(f"--metric {metric}: models are compared on one of {', '.join(PAIRED_METRICS)}")
    return name


def per_volume_metric(result: EvaluationResult, metric: str):
    """(labels or None, per-volume values, metric(labels, values) -> float) of one evaluation metric,
    for a paired bootstrap over volumes (vlp3d.evaluation.metrics.paired_bootstrap); `metric` is a
    name of PAIRED_METRICS, optionally as logged (`eval/<split>/macro_auroc`)."""
    name = paired_metric_name(metric)
    if name == "macro_auroc":
        return result.targets, result.probabilities, macro_auroc
    direction, kind = name.split("/")
    rank = result.ranks[direction]
    if kind == "map":
        return None, 1.0 / (rank + 1.0), lambda _, values: float(np.mean(values))
    return None, (rank < int(kind.removeprefix("recall_at_"))).astype(float), lambda _, values: float(np.mean(values))
