"""Model FLOPs of a step, counted by hand: forward x3 for what trains, x1 for a frozen encoder, the same
with activation checkpointing on, and no trace left (random state, buffers)."""

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from vlp3d.train.flops import model_flops


class Toy(nn.Module):
    """A trained image branch (8 -> 16 -> 8), a frozen text encoder (8 -> 8), a similarity matmul, a buffer
    the forward moves (as a DINO centre does) and dropout (random state)."""

    def __init__(self, checkpointed: bool = False):
        super().__init__()
        self.image = nn.Sequential(nn.Linear(8, 16), nn.Linear(16, 8))
        self.text = nn.Linear(8, 8)
        self.text.requires_grad_(False)
        self.checkpointed = checkpointed
        self.register_buffer("center", torch.zeros(8))

    def forward(self, batch):
        image = batch["image"]
        image = checkpoint(self.image, image, use_reentrant=False) if self.checkpointed else self.image(image)
        image = nn.functional.dropout(image, 0.5, training=True)
        text = self.text(batch["text"])
        self.center.add_(text.mean(0))
        return {"align": (image @ text.T).sum()}


def test_trained_parts_count_three_times_their_forward_and_frozen_parts_once():
    batch = {"image": torch.randn(4, 8), "text": torch.randn(4, 8)}
    # forward, 2 x (multiply-adds): image 4x8x16 + 4x16x8, similarity 4x8x4, text 4x8x8
    trained, frozen = 2 * (4 * 8 * 16 + 4 * 16 * 8 + 4 * 8 * 4), 2 * 4 * 8 * 8
    counted = model_flops(Toy(), batch)
    assert counted == {"flops_per_step": 3 * trained + frozen, "forward_flops": trained + frozen,
                       "frozen_forward_flops": frozen}
    # activation checkpointing recomputes the forward in the backward: hardware work, not model FLOPs
    assert model_flops(Toy(checkpointed=True), batch) == counted


def test_counting_leaves_no_trace():
    model, batch = Toy(), {"image": torch.randn(4, 8), "text": torch.randn(4, 8)}
    torch.manual_seed(0)
    model_flops(model, batch)
    after = torch.rand(3)
    torch.manual_seed(0)
    assert torch.equal(torch.rand(3), after)  # the dropout's draws were given back
    assert torch.equal(model.center, torch.zeros(8)) and all(p.grad is None for p in model.parameters())
