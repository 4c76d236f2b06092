"""ONNX: the image and text encoders of a tiny random model exported with torch.onnx and run by onnxruntime
on the CPU give the model's embeddings within 1e-4; the tokenization the text graph expects is checked by
hand; bad input is refused before anything is written."""

import json

import numpy as np
import pytest
import torch

from tests.unit.test_formats.helpers import REPORTS, ct_inputs, tiny_embedder, tiny_text_encoder
from vlp3d.formats.onnx_export import OnnxEmbedder, export_onnx, tokenize_reports

TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    root = tmp_path_factory.mktemp("onnx")
    embedder = tiny_embedder(tiny_text_encoder(root / "text"))
    return embedder, export_onnx(embedder, root / "out", "models:/vlp3d-clip/3")


def test_onnxruntime_embeds_volumes_and_reports_as_the_model(exported):
    embedder, out = exported
    assert {p.name for p in out.iterdir()} == {"image_encoder.onnx", "text_encoder.onnx", "tokenizer",
                                              "preprocessing.json"}
    onnx_model = OnnxEmbedder(out)
    images = onnx_model.embed_inputs(ct_inputs(3))
    expected = embedder.embed_inputs(ct_inputs(3)).numpy()
    assert images.shape == (3, 16) and np.abs(images - expected).max() < TOLERANCE
    assert not np.allclose(images[0], images[1], atol=1e-3)  # distinct volumes, distinct embeddings
    # one report at a time and all together: padding to other reports' sentences and tokens changes nothing
    together = onnx_model.embed_reports(REPORTS)
    alone = np.concatenate([onnx_model.embed_reports([report]) for report in REPORTS])
    expected = embedder.embed_reports(REPORTS).numpy()
    assert np.abs(together - expected).max() < TOLERANCE and np.abs(alone - expected).max() < TOLERANCE
    np.testing.assert_allclose(np.linalg.norm(together, axis=1), 1.0, atol=1e-5)


def test_preprocessing_json_states_what_the_graphs_leave_out(exported):
    embedder, out = exported
    config = json.loads((out / "preprocessing.json").read_text())
    assert config["spec"] == embedder.spec.to_dict()
    assert config["image_input"]["shape"] == ["batch", 1, 32, 32, 32] and config["image_input"]["whole_volume"]
    assert config["text_input"] == {"names": ["input_ids", "attention_mask"], "max_tokens": 64}
    assert config["label_names"] == embedder.label_names


def test_tokenize_reports_pads_sentences_and_reports_with_zero_masks(exported):
    embedder, _ = exported
    tokenizer = embedder.text_encoder.tokenizer
    ids, mask = tokenize_reports(tokenizer, ["Heart enlarged. Small effusion.", "", "Normal."], max_tokens=64)
    # 3 reports x 2 sentences (the most any has) x the longest sentence's tokens ([CLS] ... [SEP])
    longest = max(len(tokenizer(s)["input_ids"]) for s in ("Heart enlarged.", "Small effusion.", "Normal.", ""))
    assert ids.shape == mask.shape == (3, 2, longest) and ids.dtype == np.int64
    assert mask[0].sum(1).tolist() == [len(tokenizer("Heart enlarged.")["input_ids"]),
                                       len(tokenizer("Small effusion.")["input_ids"])]
    assert mask[1, 0].sum() == 2 and mask[1, 1].sum() == 0  # an empty report: the empty sentence, [CLS] [SEP]
    assert mask[2, 1].sum() == 0 and ids[2, 1].sum() == 0
    long_ids, _ = tokenize_reports(tokenizer, ["word " * 500], max_tokens=64)
    assert long_ids.shape == (1, 1, 64)  # truncated as the text encoder truncates


def test_refuses_a_text_encoder_without_its_tokenizer_before_writing(tmp_path):
    embedder = tiny_embedder(tiny_text_encoder(tmp_path / "text", tokenizer=False))
    with pytest.raises(ValueError, match="has no tokenizer"):
        export_onnx(embedder, tmp_path / "out", "ck")
    assert not (tmp_path / "out").exists()


def test_image_graph_takes_any_batch_size(exported):
    import onnxruntime

    _, out = exported
    session = onnxruntime.InferenceSession(str(out / "image_encoder.onnx"), providers=["CPUExecutionProvider"])
    volume = torch.rand(5, 1, 32, 32, 32).numpy()
    assert session.run(None, {"volume": volume})[0].shape == (5, 16)
