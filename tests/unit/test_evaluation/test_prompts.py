"""Zero-shot prompt sets, ensembles and the per-set report of `evaluate_embeddings`."""

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from vlp3d.data import phantom
from vlp3d.data.labels import ARTICLE_FREE, PHANTOM_FINDINGS
from vlp3d.errors import InputError
from vlp3d.evaluation.prompts import BUILTIN_SETS, ensemble_embeddings, load_prompt_sets
from vlp3d.evaluation.zeroshot import evaluate_embeddings


def test_builtin_sets_phrase_every_label():
    assert BUILTIN_SETS["single"].phrasings("Pleural effusion") == (
        ["There is a pleural effusion."], ["There is no pleural effusion."])
    assert BUILTIN_SETS["single"].phrasings("Emphysema") == (["There is emphysema."], ["There is no emphysema."])
    for label in PHANTOM_FINDINGS + ("Mosaic attenuation pattern",):
        positive, negative = BUILTIN_SETS["single"].phrasings(label)
        article = "" if label in ARTICLE_FREE else "a "
        assert (positive[0], negative[0]) == (f"There is {article}{label.lower()}.", f"There is no {label.lower()}.")
        report = BUILTIN_SETS["report"].phrasings(label)
        assert len(report[0]) == len(report[1]) == 3 and all(p.endswith(".") for p in report[0] + report[1])
    assert BUILTIN_SETS["report"].phrasings("Emphysema")[0][:2] == ["Emphysema.", "Emphysema is present."]


def test_heldout_phrasings_are_never_phantom_report_sentences():
    """The held-out set measures wording the model never saw: no phrasing equals a sentence (or an
    impression) the phantom writes, for any finding."""
    templates = set()
    for table in (phantom._PRESENT, phantom._ABSENT):
        for sentences in table.values():
            templates.update(s.lower() for s in sentences)
    templates.update(s.lower() for s in phantom._IMPRESSION.values())
    for label in PHANTOM_FINDINGS:
        positive, negative = BUILTIN_SETS["heldout"].phrasings(label)
        assert positive and negative
        assert not {p.lower() for p in positive + negative} & templates, label
        assert label.lower() not in " ".join(positive + negative).lower(), label  # no label words as such


def test_ensemble_is_the_normalised_mean_of_every_phrasing():
    vectors = {"a": [1.0, 0.0], "b": [0.0, 1.0], "c": [1.0, 1.0], "d": [-1.0, 0.0]}

    def embed(texts):
        return F.normalize(torch.tensor([vectors[t] for t in texts]), dim=-1)

    from vlp3d.evaluation.prompts import PromptSet

    one, two = PromptSet(("a",), ("d",)), PromptSet(("b",), ("d",))
    positive, negative = ensemble_embeddings(["X", "Y"], [one, two], embed)
    torch.testing.assert_close(positive, F.normalize(torch.tensor([[1.0, 1.0], [1.0, 1.0]]), dim=-1))
    torch.testing.assert_close(negative, torch.tensor([[-1.0, 0.0], [-1.0, 0.0]]))


def test_prompt_file_adds_sets_and_bad_files_name_the_problem(tmp_path):
    path = tmp_path / "prompts.toml"
    path.write_text('[sets.plain]\npositive = ["{Name} seen."]\nnegative = ["{Name} not seen."]\n'
                    '[sets.plain.labels."Cardiomegaly"]\npositive = ["Big heart."]\nnegative = ["Normal heart."]\n')
    sets = load_prompt_sets(path)
    assert set(BUILTIN_SETS) < set(sets)
    assert sets["plain"].phrasings("Emphysema") == (["Emphysema seen."], ["Emphysema not seen."])
    assert sets["plain"].phrasings("Cardiomegaly") == (["Big heart."], ["Normal heart."])
    path.write_text('[sets.broken]\npositive = ["x"]\n')
    with pytest.raises(ValueError, match=r"\[sets.broken\].*positive.*negative"):
        load_prompt_sets(path)
    path.write_text('[sets.typed.labels."Emphysema"]\npositive = "one string"\nnegative = ["x"]\n')
    with pytest.raises(ValueError, match="lists of strings"):
        load_prompt_sets(path)
    with pytest.raises(ValueError, match="eval.prompts.*no such file"):  # ConfigError: exit 2 at the CLI
        load_prompt_sets(tmp_path / "missing.toml")


def test_evaluation_scores_the_ensemble_and_every_set():
    rng = np.random.default_rng(0)
    names = ["Cardiomegaly", "Emphysema"]
    labels = rng.integers(0, 2, size=(40, 2))
    words = {}

    def embed(texts):  # a text is positive for its label when it does not say "no"/"not"/"absent"
        out = []
        for text in texts:
            if text not in words:
                words[text] = torch.randn(8, generator=torch.Generator().manual_seed(len(words)))
            out.append(words[text])
        return F.normalize(torch.stack(out), dim=-1)

    image = F.normalize(torch.randn(40, 8), dim=-1)
    result = evaluate_embeddings(image, image, labels, names, embed, logit_scale=10.0, n_boot=0)
    table = result.prompt_sets
    assert list(table["prompts"]) == ["single", "report", "heldout", "ensemble report"]
    assert table["macro_auroc"].iloc[-1] == result.metrics["macro_auroc"]
    assert result.metrics["prompts/report/macro_auroc"] == pytest.approx(result.metrics["macro_auroc"])
    assert {"prompts/single/macro_auroc", "prompts/heldout/macro_auroc"} <= set(result.metrics)
    both = evaluate_embeddings(image, image, labels, names, embed, 10.0, n_boot=0, ensemble=("report", "heldout"))
    assert list(both.prompt_sets["prompts"])[-1] == "ensemble report+heldout"
    with pytest.raises(InputError, match="eval.prompt_ensemble"):
        evaluate_embeddings(image, image, labels, names, embed, 10.0, n_boot=0, ensemble=("nope",))
