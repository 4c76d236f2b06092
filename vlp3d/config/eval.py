"""`[eval]`: zero-shot evaluation, its prompt sets and the linear probes."""

from __future__ import annotations

from dataclasses import dataclass

from vlp3d.config.fields import _f


@dataclass(frozen=True)
class EvalConfig:
    batch_size: int = _f(32, "Volumes per forward pass during evaluation.", ge=1)
    bootstrap: int = _f(200, "Bootstrap resamples for 95% confidence intervals (0 disables).", ge=0)
    labels: tuple[str, ...] = _f((), "Labels to evaluate; empty: every label with both classes in the split.")
    prompts: str = _f(
        "", "TOML file of extra zero-shot prompt sets ([sets.NAME] with positive/negative templates or per-label "
        "phrasings; docs/evaluation.md); empty: the built-in sets single, report and heldout.", location=True,
    )
    prompt_ensemble: tuple[str, ...] = _f(
        ("report",), "Prompt sets whose phrasings are averaged (per label and polarity) for the reported zero-shot "
        "scores; every set is also scored alone (prompts/<set>/macro_auroc).",
    )
    probe_fractions: tuple[float, ...] = _f(
        (0.01, 0.1, 1.0), "Shares of the training split's labels the linear probes (`vlp3d probe`) train on: "
        "nested subsets of patients, each in (0, 1].",
        gt=0, le=1,
    )
