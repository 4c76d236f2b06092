"""Zero-shot prompts: named sets of positive/negative phrasings per label, and prompt ensembles.

A prompt set gives, for every label, one or more positive phrasings ("There is a pleural
effusion.") and one or more negative ones ("There is no pleural effusion."). Templates use
`{name}` (the label in lower case), `{Name}` (capitalised) and `{a}` ("a " for count nouns, ""
otherwise); a set may also list phrasings for single labels, which replace its templates there.

Built-in sets:
- `single`: the one pair of METHODS.md, "There is (a) X." / "There is no X." (before ensembles, the
  only prompt).
- `report`: report-style templates, the way findings are written in reports ("X.", "X is present.",
  "There is (a) X." / "No X.", "There is no X.", "X is not seen."). The default ensemble.
- `heldout`: phrasings of our own that no training report of the phantom corpus uses: synonyms
  and descriptions ("Fluid has collected in the pleural space.", "The cardiac silhouette is
  large.") for the phantom's findings, and other wording for every other label. Evaluation
  reports AUROC on it next to the training-style sets, to show how much of zero-shot accuracy
  survives wording the model never saw.

An ensemble embeds every phrasing of the chosen sets and averages the embeddings per label and
polarity (then L2-normalises), as CLIP's prompt ensembles do. Users add sets in a TOML file
(`eval.prompts`; docs/evaluation.md).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn import functional as F

from vlp3d.config import read_toml
from vlp3d.data.labels import ARTICLE_FREE
from vlp3d.errors import InputError


@dataclass(frozen=True)
class PromptSet:
    """Templates for every label plus per-label phrasings that replace them."""

    positive: tuple[str, ...]
    negative: tuple[str, ...]
    labels: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = field(default_factory=dict)

    def phrasings(self, label: str) -> tuple[list[str], list[str]]:
        """(positive phrasings, negative phrasings) of `label`."""
        if label in self.labels:
            positive, negative = self.labels[label]
            return list(positive), list(negative)
        values = {"name": label.lower(), "Name": label[:1].upper() + label[1:].lower(),
                  "a": "" if label in ARTICLE_FREE else "a "}
        return [t.format(**values) for t in self.positive], [t.format(**values) for t in self.negative]


BUILTIN_SETS: dict[str, PromptSet] = {
    "single": PromptSet(("There is {a}{name}.",), ("There is no {name}.",)),
    "report": PromptSet(
        ("{Name}.", "{Name} is present.", "There is {a}{name}."),
        ("No {name}.", "There is no {name}.", "{Name} is not seen."),
    ),
    "heldout": PromptSet(
        ("The images demonstrate {name}.", "Findings compatible with {name} are noted."),
        ("The images show no sign of {name}.", "Findings compatible with {name} are absent."),
        labels={
            "Lung nodule": (("A small round lesion sits in the lung parenchyma.", "Focal nodular opacity in the lung."),
                            ("The lung parenchyma holds no focal lesion.", "No nodular opacity in the lungs.")),
            "Pleural effusion": (("Fluid has collected in the pleural space.", "Hydrothorax."),
                                 ("No fluid has collected in the pleural space.", "No hydrothorax.")),
            "Cardiomegaly": (("The cardiac silhouette is large.", "Enlarged heart."),
                             ("The cardiac silhouette is of normal size.", "Heart of normal dimensions.")),
            "Emphysema": (("Hyperinflated lungs with low-attenuation destroyed parenchyma.", "Pulmonary hyperinflation."),
                          ("Lung attenuation is normal without parenchymal destruction.", "No pulmonary hyperinflation.")),
            "Consolidation": (("Dense airspace opacification of a lobe.", "Lobar airspace disease."),
                              ("No airspace opacification.", "No lobar airspace disease.")),
            "Pericardial effusion": (("Fluid surrounds the heart.", "A fluid collection in the pericardial sac."),
                                     ("No fluid surrounds the heart.", "The pericardial sac holds no fluid.")),
        },
    ),
}


def load_prompt_sets(path: str | Path | None = None) -> dict[str, PromptSet]:
    """The built-in sets plus those of the TOML file `path` (a set of the same name replaces the
    built-in one). Raises ValueError naming the file and the set on a malformed entry."""
    sets = dict(BUILTIN_SETS)
    if not path:
        return sets
    path = Path(path)
    raw = read_toml(path, f"eval.prompts = '{path}': no such file (a TOML file of [sets.NAME] tables).",
                    where="eval.prompts = ")
    for name, entry in raw.get("sets", {}).items():
        where = f"eval.prompts = '{path}', [sets.{name}]"
        try:
            labels = {label: (_phrases(v["positive"]), _phrases(v["negative"]))
                      for label, v in entry.get("labels", {}).items()}
            positive, negative = _phrases(entry.get("positive", [])), _phrases(entry.get("negative", []))
        except (KeyError, TypeError) as err:
            raise InputError(f"{where}: every set and label needs 'positive' and 'negative' lists of strings "
                             f"({type(err).__name__}: {err}).") from None
        if bool(positive) != bool(negative) or not (positive or labels):
            raise InputError(f"{where}: give 'positive' and 'negative' templates, or phrasings per label under "
                             f"[sets.{name}.labels.\"Label\"].")
        sets[name] = PromptSet(positive, negative, labels)
    if not raw.get("sets"):
        raise InputError(f"eval.prompts = '{path}': no [sets.NAME] table.")
    return sets


def _phrases(values) -> tuple[str, ...]:
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise TypeError(f"expected a list of strings, got {values!r}")
    return tuple(values)


def ensemble_embeddings(labels: list[str], sets: list[PromptSet], embed_texts
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """(positive [L, d], negative [L, d]): per label, the L2-normalised mean of the embeddings of every
    positive (negative) phrasing of `sets`. `embed_texts(list[str]) -> [n, d]` (L2-normalised)."""
    positive_texts, negative_texts, spans = [], [], []
    for label in labels:
        pos, neg = [], []
        for prompt_set in sets:
            p, n = prompt_set.phrasings(label)
            pos += p
            neg += n
        spans.append((len(positive_texts), len(pos), len(negative_texts), len(neg)))
        positive_texts += pos
        negative_texts += neg
    pos_emb, neg_emb = embed_texts(positive_texts), embed_texts(negative_texts)
    positive = torch.stack([F.normalize(pos_emb[a:a + n].mean(0), dim=-1) for a, n, _, _ in spans])
    negative = torch.stack([F.normalize(neg_emb[b:b + m].mean(0), dim=-1) for _, _, b, m in spans])
    return positive, negative
