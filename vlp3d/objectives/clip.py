"""InfoNCE (CLIP) loss with global-batch negatives across DDP workers (gather-with-grad, local loss)."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

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
