"""Pretraining batches on the device: shard columns to model inputs (`to_model_batch`), augmentation of
the 3D inputs, and sentence dropout on the frozen report embeddings (pure torch)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch.nn import functional as F

from vlp3d.data.volume import dequantise


def augment(volume: torch.Tensor, generator: torch.Generator, max_shift: int = 2) -> torch.Tensor:
    """Intensity jitter and a small random translation; no flips (reports name sides)."""
    batch = volume.shape[0]
    scale = 1 + 0.1 * (torch.rand(batch, 1, 1, 1, 1, generator=generator) - 0.5) * 2
    offset = 0.03 * (torch.rand(batch, 1, 1, 1, 1, generator=generator) - 0.5) * 2
    volume = volume * scale.to(volume) + offset.to(volume)
    shifts = torch.randint(-max_shift, max_shift + 1, (3,), generator=generator).tolist()
    return torch.roll(volume, shifts=shifts, dims=(2, 3, 4))


def augment_batch(batch: dict[str, torch.Tensor], generator: torch.Generator) -> dict[str, torch.Tensor]:
    """`augment` every 3D input of a model batch in place: whole volumes, and T3D's sub-volume crops
    [B, K, 1, X, Y, Z] (each crop its own intensity jitter)."""
    if "volume" in batch:
        batch["volume"] = augment(batch["volume"], generator)
    if "crops" in batch:
        crops = batch["crops"]
        batch["crops"] = augment(crops.flatten(0, 1), generator).reshape(crops.shape)
    return batch


def drop_sentences(sentence_embeddings: torch.Tensor, sentence_mask: torch.Tensor, p: float,
                   generator: torch.Generator) -> torch.Tensor:
    """Report embeddings [B, H] from a random subset of each report's stored sentence embeddings
    [B, S, H] (`sentence_mask` [B, S] marks the real ones): each sentence is left out with
    probability `p`, at least one is kept; L2-normalised mean, as the stored report embedding is
    built (`vlp3d.encoders.text.report_embedding_from_sentences`). Text augmentation for frozen
    text encoders (ours)."""
    present = sentence_mask.bool()
    keep = (torch.rand(present.shape, generator=generator) >= p).to(present.device) & present
    # a report whose every sentence was dropped keeps one of them at random
    empty = ~keep.any(1)
    if empty.any():
        scores = torch.rand(present.shape, generator=generator).to(present.device).masked_fill(~present, -1.0)
        keep[empty] |= F.one_hot(scores[empty].argmax(1), present.shape[1]).bool()
    weights = keep.to(sentence_embeddings.dtype).unsqueeze(-1)
    mean = (sentence_embeddings * weights).sum(1) / weights.sum(1).clamp(min=1.0)
    return F.normalize(mean, dim=-1)


def to_model_batch(batch: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """Shard columns -> model inputs: volume [B, 1, X, Y, Z] (or T3D crops [B, K, 1, X, Y, Z], or
    2D images [B, 1, H, W] under `image_2d`) as float32 in [0, 1]; text columns as they are."""
    out = {}
    for key, name in (("image", "volume"), ("crops", "crops"), ("image_2d", "image_2d")):
        if key in batch:
            # copied as stored (uint8 / float16: 2-4x less than float32), then dequantised on the device
            out[name] = dequantise(batch[key].to(device, non_blocking=True)).unsqueeze(-4 if key == "crops" else 1)
    for key in ("report_embedding", "report_embedding_2d", "input_ids", "attention_mask", "labels",
                "sentence_embeddings", "sentence_mask"):
        if key in batch:
            out[key] = batch[key].to(device, non_blocking=True)
    for key in ("report_embedding", "report_embedding_2d", "sentence_embeddings"):
        if key in out:
            out[key] = out[key].float()
    return out
