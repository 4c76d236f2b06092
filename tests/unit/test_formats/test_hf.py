"""The Hugging Face format: a tiny random embedding model written by `export_hf` and read back by
`Vlp3dModel.from_pretrained` gives the same embeddings; its card carries the evaluation with intervals;
bad input is refused before anything is written."""

import json

import pytest
import torch
from huggingface_hub import ModelCard

from tests.unit.test_formats.helpers import REPORTS, ct_inputs, tiny_embedder, tiny_text_encoder
from vlp3d.formats.hf import CardInfo, Evaluation, Vlp3dModel, export_hf

EVALUATIONS = [Evaluation("valid", "macro", 0.81, 0.72, 0.88, 40), Evaluation("valid", "Pleural effusion", 0.9, 0.8, 0.97, 40),
               Evaluation("valid", "Lung nodule", float("nan"), float("nan"), float("nan"), 40)]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    embedder = tiny_embedder(tiny_text_encoder(root / "text"))
    info = CardInfo("models:/vlp3d-clip/3", license="cc-by-nc-sa-4.0", data_hash="0123456789abcdef",
                    evaluations=EVALUATIONS, description="# vlp3d-clip version 3\n\nRegistry card.")
    out = export_hf(embedder, root / "out", {"logit_scale": 14.0, "label_names": embedder.label_names}, info)
    return embedder, out


def test_loaded_model_embeds_volumes_and_reports_exactly_as_the_source(exported):
    embedder, out = exported
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.json", "text_encoder", "README.md"}
    assert (out / "text_encoder" / "tokenizer.json").is_file() and (out / "text_encoder" / "model.safetensors").is_file()
    loaded = Vlp3dModel.from_pretrained(out)
    assert loaded.text_encoder_path == str(out / "text_encoder")
    torch.testing.assert_close(loaded.embed_inputs(ct_inputs()), embedder.embed_inputs(ct_inputs()), rtol=0, atol=1e-6)
    torch.testing.assert_close(loaded.embed_reports(REPORTS), embedder.embed_reports(REPORTS), rtol=0, atol=1e-6)
    assert loaded.logit_scale == 14.0 and loaded.embedder.label_names == embedder.label_names
    # every weight came from the file: a fresh build from config.json alone differs
    fresh = Vlp3dModel(**{k: v for k, v in json.loads((out / "config.json").read_text()).items()})
    assert not torch.allclose(fresh.model.image_proj[0].weight, loaded.model.image_proj[0].weight)


def test_config_json_holds_no_locations(exported):
    _, out = exported
    config = json.loads((out / "config.json").read_text())
    assert set(config) == {"vlp3d_config", "meta", "metadata"}
    assert config["vlp3d_config"]["data"]["corpus"] == "" and config["vlp3d_config"]["data"]["shards"] == ""
    assert config["meta"]["spec"]["shape"] == [32, 32, 32]


def test_card_has_license_tags_dataset_and_every_figure_with_its_interval(exported):
    _, out = exported
    card = ModelCard.load(out / "README.md")
    assert card.data.license == "cc-by-nc-sa-4.0" and card.data.library_name == "vlp3d"
    assert {"vlp3d", "clip", "resnet3d", "computed-tomography"} <= set(card.data.tags)
    assert card.data.datasets == ["vlp3d-shards-0123456789ab"]
    results = {r.metric_args["finding"]: r for r in card.data.eval_results}
    assert set(results) == {"macro", "Pleural effusion"}  # the finding without a score is left out
    macro = results["macro"]
    assert (macro.metric_value, macro.metric_args["ci_low"], macro.metric_args["ci_high"]) == (0.81, 0.72, 0.88)
    assert macro.dataset_split == "valid" and macro.dataset_revision == "0123456789abcdef"
    assert "[0.720, 0.880]" in macro.metric_name
    assert "| valid | macro | 0.810 | [0.720, 0.880] | 40 |" in card.text and "Registry card." in card.text
    assert "hf upload USER/REPO" in card.text


def test_refuses_an_existing_folder_that_is_not_empty(tmp_path):
    embedder = tiny_embedder(tiny_text_encoder(tmp_path / "text"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="is a folder that is not empty"):
        export_hf(embedder, tmp_path / "out", {}, CardInfo("ck"))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_refuses_a_text_encoder_without_its_tokenizer_before_writing(tmp_path):
    embedder = tiny_embedder(tiny_text_encoder(tmp_path / "text", tokenizer=False))
    with pytest.raises(ValueError, match=r"models:/m/1: its text encoder folder .*text has no tokenizer") as err:
        export_hf(embedder, tmp_path / "out", {}, CardInfo("models:/m/1"))
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out").exists()
