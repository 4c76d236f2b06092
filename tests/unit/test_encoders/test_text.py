import pytest
import torch

from vlp3d.encoders.text import TextEncoder, embed_report_sentences, embed_reports
from vlp3d.errors import InputError


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder("minilm", max_tokens=32)


def test_default_minilm_is_offline_frozen_and_normalised(minilm):
    tokens, pooled = minilm(**{k: v for k, v in minilm.tokenize(["There is a pleural effusion."]).items()
                               if k in ("input_ids", "attention_mask")})
    assert tokens.shape == (1, 32, 384) and pooled.shape == (1, 384)
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(1))
    assert not any(p.requires_grad for p in minilm.parameters())


def test_sentence_embeddings_and_report_embedding_agree(minilm):
    reports = [["Cardiomegaly.", "Pleural effusion.", "Emphysema."], ["No acute abnormality."]]
    pooled, sentences, mask = embed_report_sentences(minilm, reports, max_sentences=2)
    assert sentences.shape == (2, 2, 384) and mask.tolist() == [[True, True], [True, False]]
    torch.testing.assert_close(sentences[0, 1], minilm.embed_texts(["Pleural effusion."])[0], rtol=1e-4, atol=1e-5)
    # the report embedding uses every sentence, not only the stored ones
    mean = torch.nn.functional.normalize(minilm.embed_texts(reports[0]).mean(0), dim=-1)
    torch.testing.assert_close(pooled[0], mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(embed_reports(minilm, reports), pooled)


def test_partial_unfreezing_trains_only_the_last_layers():
    encoder = TextEncoder("minilm", max_tokens=16, trainable_layers=1)
    trainable = {n.split(".layer.")[1].split(".")[0] for n, p in encoder.named_parameters()
                 if p.requires_grad and ".layer." in n}
    assert trainable == {"5"}  # MiniLM-L6: layers 0..5
    batch = encoder.tokenize(["Emphysema."])
    _, pooled = encoder(batch["input_ids"], batch["attention_mask"])
    pooled.sum().backward()
    assert encoder.model.encoder.layer[5].output.dense.weight.grad is not None
    assert encoder.model.encoder.layer[0].output.dense.weight.grad is None


def test_unreachable_hub_name_says_how_to_use_a_local_path(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    # huggingface_hub reads the variable at import; without this the lookup waits for network timeouts
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    with pytest.raises(InputError, match="local-dir DIR.*model.text_encoder"):
        TextEncoder("no-such-org/no-such-model")
