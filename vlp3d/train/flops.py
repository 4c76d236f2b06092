"""Model FLOPs of one training step (as Kaplan et al. and Chinchilla count them): the forward pass counted
once by torch's FlopCounterMode, x3 for the parts that train (forward + backward, the backward costing
twice the forward), x1 for frozen parts (a frozen text encoder runs forward only). Counting the real step
instead would add what a step recomputes (activation checkpointing runs the forward again in the
backward: +31% on the Swin configs where it is on), which is hardware work, not model FLOPs.

Matrix multiplications, convolutions and attention are counted; elementwise work is not. Report
embeddings computed at prepare time (a frozen text encoder run once per report, not per step) are not a
training step's FLOPs."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from vlp3d.train.step import autocast


def _frozen_roots(module: nn.Module) -> list[str]:
    """Names of the largest submodules whose parameters are all frozen (e.g. the text encoder)."""
    roots: list[str] = []
    for name, child in module.named_modules():
        params = list(child.parameters())
        if not name or not params or any(p.requires_grad for p in params):
            continue
        if not any(name.startswith(root + ".") for root in roots):
            roots.append(name)
    return roots


def _forward(module: nn.Module, batch: Mapping[str, torch.Tensor], micro_batch: int) -> None:
    """The step's forward: the whole batch at once, or (gradient caching, `train.micro_batch`) the parts
    the step runs — each micro-batch's embeddings and per-sample terms, then the batch terms on all the
    embeddings — so that counting never holds more of the batch than the step does."""
    rows = next(v for v in batch.values() if isinstance(v, torch.Tensor)).shape[0]
    if not 0 < micro_batch < rows:
        module(batch)
        return
    from vlp3d.train.step import split_batch

    parts = []
    for chunk in split_batch(batch, micro_batch):
        parts.append(module(chunk, part="embed"))
        module(chunk, part="sample")
    module({k: torch.cat([p[k] for p in parts]) for k in parts[0]}, part="batch")


def model_flops(module: nn.Module, batch: Mapping[str, torch.Tensor], precision: str = "fp32",
                micro_batch: int = 0) -> dict[str, int]:
    """{'flops_per_step': 3 x trained forward + frozen forward, 'forward_flops', 'frozen_forward_flops'} of
    `module` (unwrapped, the one the loss terms come from) on `batch`. Leaves no trace: no gradients, the
    random state and the buffers (a DINO centre, ...) are restored. Every rank must call it at the same step
    (a loss may gather across ranks in its forward). With `micro_batch`, the same FLOPs counted on the
    parts gradient caching runs (its replay of each micro-batch is recomputation, not model FLOPs)."""
    first = next(v for v in batch.values() if isinstance(v, torch.Tensor))
    buffers = {name: buffer.detach().clone() for name, buffer in module.named_buffers()}
    devices = [first.device] if first.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), autocast(first.device, precision), \
            FlopCounterMode(display=False) as counter:
        _forward(module, batch, micro_batch)
    with torch.no_grad():
        for name, buffer in module.named_buffers():
            buffer.copy_(buffers[name])
    counts = counter.get_flop_counts()
    total = int(counter.get_total_flops())
    top = type(module).__name__
    frozen = sum(int(sum(counts.get(f"{top}.{root}", {}).values())) for root in _frozen_roots(module))
    return {"flops_per_step": 3 * (total - frozen) + frozen, "forward_flops": total, "frozen_forward_flops": frozen}
