"""Objective `clip` and its InfoNCE loss with global-batch negatives across DDP workers (gather-with-grad,
local loss); the loss also serves the other objectives' alignment terms."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.nn import functional as F

from vlp3d.config import ExperimentConfig, register_method
from vlp3d.objectives.base import Objective
from vlp3d.objectives.distributed import all_gather, world


class ClipLoss(nn.Module):
    """Symmetric InfoNCE over L2-normalised embeddings; negatives are the global batch.

    `local_loss=False`: every worker computes the full G x G loss. `local_loss=True`: only its
    B rows of each direction (B x G logits), labels offset by rank * B; the mean over workers
    equals the full loss. Either way, once DDP averages gradients they equal single-process
    gradients on the concatenated batch — provided `gather_with_grad=True`.
    """

    def __init__(self, gather_with_grad: bool = True, local_loss: bool = False):
        super().__init__()
        self.gather_with_grad = gather_with_grad
        self.local_loss = local_loss

    def forward(self, image: torch.Tensor, text: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
        rank, _ = world()
        all_image = all_gather(image, grad=self.gather_with_grad)
        all_text = all_gather(text, grad=self.gather_with_grad)
        if self.local_loss:
            logits_image = logit_scale * image @ all_text.T
            logits_text = logit_scale * text @ all_image.T
            labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
        else:
            logits_image = logit_scale * all_image @ all_text.T
            logits_text = logits_image.T
            labels = torch.arange(all_image.shape[0], device=image.device)
        return 0.5 * (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels))


@register_method()  # no table of its own, no defaults: the plain config is CLIP's set-up
class ClipObjective(Objective):
    """Objective `clip`: one term, `align`, the global-batch InfoNCE between volume and report."""

    name = "clip"
    terms = ("align",)
    projection_terms = frozenset(terms)
    micro_batch_refusal = None  # caches: the normalised embeddings, then the InfoNCE over the batch

    def __init__(self, cfg: ExperimentConfig, model: nn.Module | None = None, text_dim: int | None = None):
        super().__init__()
        self.loss = ClipLoss(gather_with_grad=cfg.objective.gather_with_grad, local_loss=cfg.objective.local_loss)

    def embed(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"image": model.encode_image(batch["volume"]), "text": model.encode_text(batch["report_embedding"])}

    def batch_terms(self, model: nn.Module, embeddings: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"align": self.loss(embeddings["image"], embeddings["text"], model.scale())}
