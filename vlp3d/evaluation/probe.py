"""Linear probes on frozen image features: per-label logistic regression at nested label fractions.

The probe trains on one split's features (the regularisation chosen on a validation fold of its
patients), is tested on another split, and its AUROC intervals resample test patients. Run for the
pretrained model and for the same architecture randomly initialised, it says how much of the
downstream signal pretraining put into the features, and how that depends on the labels at hand.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from vlp3d.evaluation.metrics import auroc, macro_auroc, patient_resamples

DEFAULT_FRACTIONS = (0.01, 0.1, 1.0)
DEFAULT_CS = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0)  # inverse regularisation strengths tried
DEFAULT_C = 1.0  # when the validation fold cannot rank them (a class missing there)


@dataclass
class ProbeSplit:
    """Features and labels of one split: `features` [N, d], `labels` [N, L] (0/1), `patients` [N];
    `fraction_rank` [N] (the shards' nested-subset rank, as `data.fraction` uses it) on the
    training split."""

    features: np.ndarray
    labels: np.ndarray
    patients: np.ndarray
    fraction_rank: np.ndarray | None = None


def fraction_rows(rank: np.ndarray, fraction: float) -> np.ndarray:
    """Rows of the nested subset `fraction` (the smaller subsets lie inside the larger ones)."""
    return np.ones(len(rank), dtype=bool) if fraction >= 1.0 else np.asarray(rank) < fraction


def validation_rows(patients: np.ndarray, y: np.ndarray, share: float, seed: int) -> np.ndarray:
    """A validation fold of `share` of the patients, drawn separately among patients with a positive
    and those without (so both classes land in it when there are enough)."""
    unique = np.unique(patients)
    positive = np.isin(unique, patients[y == 1])
    rng = np.random.default_rng(seed)
    chosen = [p for group in (unique[positive], unique[~positive])
              for p in rng.permutation(group)[:int(round(share * len(group)))]]
    return np.isin(patients, chosen)


def _fit(x: np.ndarray, y: np.ndarray, c: float):
    model = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000))
    return model.fit(x, y)


def choose_c(x: np.ndarray, y: np.ndarray, patients: np.ndarray, cs=DEFAULT_CS, share: float = 0.25,
             seed: int = 0) -> tuple[float, str]:
    """The C with the best AUROC on a validation fold of the patients (ties: the stronger
    regularisation), and how it was chosen."""
    held = validation_rows(patients, y, share, seed)
    fit_y, val_y = y[~held], y[held]
    if len(np.unique(fit_y)) < 2 or len(np.unique(val_y)) < 2:
        return DEFAULT_C, f"default (too few positives or negatives for a validation fold: {int(y.sum())}/{len(y)})"
    scores = [auroc(val_y, _fit(x[~held], fit_y, c).predict_proba(x[held])[:, 1]) for c in sorted(cs)]
    best = int(np.argmax(scores))
    return float(sorted(cs)[best]), f"validation fold ({int(held.sum())} volumes, AUROC {scores[best]:.3f})"


def linear_probe(train: ProbeSplit, test: ProbeSplit, label_names: list[str],
                 fractions=DEFAULT_FRACTIONS, n_boot: int = 200, seed: int = 0, cs=DEFAULT_CS,
                 validation_share: float = 0.25) -> pd.DataFrame:
    """One row per (fraction, label) and a `macro` row per fraction: training volumes, positives,
    C, AUROC on `test` with a patient-bootstrap 95% interval, or `skipped` with the reason when the
    fraction (or the test split) lacks positives or negatives of that label."""
    rank = train.fraction_rank
    if rank is None:  # nested by a random order of the patients
        unique, inverse = np.unique(train.patients, return_inverse=True)
        rank = np.random.default_rng(seed).random(len(unique))[inverse]
    rows = []
    for fraction in sorted(fractions):
        keep = fraction_rows(rank, fraction)
        x, y_all, patients = train.features[keep], train.labels[keep].astype(int), train.patients[keep]
        fitted, scores = [], []
        for j, name in enumerate(label_names):
            y, test_y = y_all[:, j], test.labels[:, j].astype(int)
            row = {"fraction": fraction, "label": name, "train_volumes": int(keep.sum()),
                   "train_patients": len(np.unique(patients)), "positives": int(y.sum()), "C": np.nan,
                   "auroc": np.nan, "auroc_ci_low": np.nan, "auroc_ci_high": np.nan, "skipped": ""}
            if len(y) == 0 or y.min() == y.max():  # (none at all: a small fraction of a small split)
                row["skipped"] = (f"{int(y.sum())} positives in {len(y)} training volumes: the probe needs "
                                  "at least one of each class")
            elif test_y.min() == test_y.max():
                row["skipped"] = f"the test split has {int(test_y.sum())} positives in {len(test_y)} volumes"
            else:
                c, _ = choose_c(x, y, patients, cs, validation_share, seed + j)
                score = _fit(x, y, c).predict_proba(test.features)[:, 1]
                row.update(C=c, auroc=float(auroc(test_y, score)))
                fitted.append(j)
                scores.append(score)
            rows.append(row)
        macro = {"fraction": fraction, "label": "macro", "train_volumes": int(keep.sum()),
                 "train_patients": len(np.unique(patients)), "positives": np.nan, "C": np.nan,
                 "auroc": np.nan, "auroc_ci_low": np.nan, "auroc_ci_high": np.nan,
                 "skipped": "" if fitted else "no label could be probed", "labels": len(fitted)}
        if fitted:
            y_test, s_test = test.labels[:, fitted].astype(int), np.stack(scores, axis=1)
            macro["auroc"] = macro_auroc(y_test, s_test)
            per_label = [[] for _ in fitted]
            boots = []
            for idx in patient_resamples(test.patients, n_boot, seed):
                for k in range(len(fitted)):
                    if y_test[idx, k].min() != y_test[idx, k].max():
                        per_label[k].append(auroc(y_test[idx, k], s_test[idx, k]))
                boots.append(macro_auroc(y_test[idx], s_test[idx]))
            first = len(rows) - len(label_names)
            for k, j in enumerate(fitted):
                if per_label[k]:
                    rows[first + j]["auroc_ci_low"], rows[first + j]["auroc_ci_high"] = np.percentile(
                        per_label[k], [2.5, 97.5])
            boots = np.asarray(boots)[np.isfinite(boots)] if boots else np.array([])
            if len(boots):
                macro["auroc_ci_low"], macro["auroc_ci_high"] = np.percentile(boots, [2.5, 97.5])
        rows.append(macro)
    return pd.DataFrame(rows)


def compare_probes(tables: dict[str, pd.DataFrame]) -> pd.DataFrame:
    """The label-efficiency table: each feature source's macro AUROC (95% CI) per fraction, side
    by side (`tables`: source name, e.g. 'pretrained' / 'random init', -> `linear_probe` table)."""
    frames = []
    for source, table in tables.items():
        macro = table[table["label"] == "macro"].copy()
        macro.insert(0, "features", source)
        frames.append(macro)
    return pd.concat(frames, ignore_index=True).drop(columns=["label", "positives", "C"])
