"""InfoNCE (CLIP) loss with global-batch negatives across DDP workers (gather-with-grad, local loss)."""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F


def gather_features(image: torch.Tensor, text: torch.Tensor, *, gather_with_grad: bool = True,
                    rank: int = 0, world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """All-gather [B, d] features into [G, d], ordered by rank.

    With `gather_with_grad`, gradients flow back to every worker's slice (all_gather's backward
    sums them). Without it, only the local slice keeps its gradient.
    """
    if world_size == 1:
        return image, text
    if gather_with_grad:
        import torch.distributed.nn.functional as dist_fn

        # deprecated in favour of a private API (_functional_collectives); still the public autograd gather
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.cat(dist_fn.all_gather(image), 0), torch.cat(dist_fn.all_gather(text), 0)
    gathered_image = [torch.zeros_like(image) for _ in range(world_size)]
    gathered_text = [torch.zeros_like(text) for _ in range(world_size)]
    dist.all_gather(gathered_image, image)
    dist.all_gather(gathered_text, text)
    gathered_image[rank], gathered_text[rank] = image, text
    return torch.cat(gathered_image, 0), torch.cat(gathered_text, 0)


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
        if dist.is_available() and dist.is_initialized():
            rank, world_size = dist.get_rank(), dist.get_world_size()
        else:
            rank, world_size = 0, 1
        all_image, all_text = gather_features(
            image, text, gather_with_grad=self.gather_with_grad, rank=rank, world_size=world_size
        )
        if self.local_loss:
            logits_image = logit_scale * image @ all_text.T
            logits_text = logit_scale * text @ all_image.T
            labels = torch.arange(image.shape[0], device=image.device) + rank * image.shape[0]
        else:
            logits_image = logit_scale * all_image @ all_text.T
            logits_text = logits_image.T
            labels = torch.arange(all_image.shape[0], device=image.device)
        return 0.5 * (F.cross_entropy(logits_image, labels) + F.cross_entropy(logits_text, labels))
