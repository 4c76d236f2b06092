"""The collectives every objective uses: rank/world size, all-gather (with or without gradient),
mean over workers, mean over every worker's items. One place, so that every objective gathers the same way.

The gather with gradient is torch's own autograd all-gather, `all_gather_single_autograd` from
`torch.distributed._functional_collectives` (the replacement that torch 2.13 names when it
deprecates `torch.distributed.nn.functional.all_gather`; its backward is a summing reduce-scatter,
which gloo and NCCL both run). The module is underscored but it is what torch points to; if it
moves, only this file changes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world size); (0, 1) outside torch.distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_gather(x: torch.Tensor, *, grad: bool = True) -> torch.Tensor:
    """All-gather [B, ...] into [G, ...] ordered by rank (every worker the same B).

    `grad=True`: gradients flow back to every worker's slice (the backward sums each slice's
    gradient over workers). `grad=False`: the other workers' slices are constants and only the
    local slice keeps its gradient.
    """
    rank, world_size = world()
    if world_size == 1:
        return x
    if grad:
        from torch.distributed._functional_collectives import all_gather_single_autograd

        gathered = all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)
        return gathered.wait() if hasattr(gathered, "wait") else gathered
    slices = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(slices, x.detach().contiguous())
    slices[rank] = x
    return torch.cat(slices, 0)


def global_mean(total: torch.Tensor, count: torch.Tensor | int) -> torch.Tensor:
    """The mean over every worker's items (tokens, voxels, pairs) from this worker's `total` (a sum
    with gradient) and its item `count`, when workers hold different counts.

    A per-worker mean would weight a worker's few items like another's many. Here the value is the
    global mean on every rank, and the gradient is `total`'s scaled by world size / global count,
    so that DDP's average over workers gives exactly the gradient of the global mean."""
    _, world_size = world()
    count = torch.as_tensor(count, device=total.device).float()
    if world_size == 1:
        return total / count.clamp(min=1.0)
    stats = torch.stack([total.detach().float(), count])
    dist.all_reduce(stats)
    n = stats[1].clamp(min=1.0)
    scaled = total * (world_size / n).to(total.dtype)
    return scaled + (stats[0] / n).to(total.dtype) - scaled.detach()


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of `x` over workers (no gradient), e.g. for the DINO centre."""
    _, world_size = world()
    if world_size == 1:
        return x
    x = x.detach().clone()
    dist.all_reduce(x)
    return x / world_size
