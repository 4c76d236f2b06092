"""Tiny random models for the format round trips: a 1-layer BERT text encoder (with MiniLM's tokenizer, the
offline package's files) and a resnet3d embedding model, weights moved off their init so that a copy cannot
match by accident; a phantom-like CT as an array input."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch

from vlp3d.config import from_dict
from vlp3d.data.shards import spec_from_config
from vlp3d.encoders.text import resolve_text_encoder
from vlp3d.inference import Embedder, VolumeInput
from vlp3d.objectives.model import build_model

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")
TEXT_DIM = 32
REPORTS = ["There is a pleural effusion. The heart is enlarged.\n2. Nodule approx. 1.5 cm in the left lung.",
           "", "No acute findings."]


def tiny_text_encoder(folder: Path, tokenizer: bool = True) -> Path:
    """A random 1-layer BERT (hidden 32) saved to `folder`, with MiniLM's tokenizer files unless not `tokenizer`."""
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, hidden_size=TEXT_DIM, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=512)
    BertModel(config).save_pretrained(folder)
    if tokenizer:
        source = Path(resolve_text_encoder("minilm"))
        for name in TOKENIZER_FILES:
            shutil.copy(source / name, folder / name)
    return folder


def tiny_embedder(text_encoder: Path, seed: int = 1) -> Embedder:
    """A resnet3d/tiny embedding model on 32^3 volumes at 8 mm, linear text head, random weights."""
    cfg = from_dict({"data": {"shape": [32, 32, 32], "spacing_mm": [8.0, 8.0, 8.0], "max_tokens": 64},
                     "model": {"image_encoder": "resnet3d", "size": "tiny", "text_encoder": str(text_encoder),
                               "embed_dim": 16, "text_head": "linear"}})
    model = build_model(cfg, text_dim=TEXT_DIM)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    meta = {"spec": spec_from_config(cfg).to_dict(), "label_names": ["Lung nodule", "Pleural effusion"],
            "text_dim": TEXT_DIM}
    return Embedder.from_model(cfg, meta, model)


def phantom_ct(seed: int = 0, shape=(40, 36, 30)) -> np.ndarray:
    """HU values: air around a body (water) with a denser sphere, plus noise."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    radius = np.sqrt((grid ** 2).sum(0))
    hu = np.where(radius < 0.8, 0.0, -1000.0) + np.where(radius < 0.3, 400.0, 0.0)
    return (hu + rng.normal(0, 20, shape)).astype(np.float32)


def ct_inputs(count: int = 2) -> list[VolumeInput]:
    return [VolumeInput(array=phantom_ct(seed), spacing_mm=(7.0, 7.5, 9.0), name=f"phantom {seed}")
            for seed in range(count)]
