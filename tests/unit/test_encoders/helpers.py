"""Small inputs per encoder: the smallest legal shapes that still give more than one token."""

from __future__ import annotations

import torch

from vlp3d.encoders import build_image_encoder

# (input shape [B, 1, X, Y, Z], expected token count, builder kwargs)
SMALL_INPUTS: dict[str, tuple[tuple[int, ...], int, dict]] = {
    "resnet3d": ((2, 1, 64, 32, 32), 2, {}),  # /32 per axis
    "swin3d": ((1, 1, 64, 32, 32), 2, {}),  # /32 per axis
    "vit3d": ((2, 1, 32, 32, 16), 4, {"img_size": (32, 32, 16)}),  # /16 per axis
    "unimedi_vit": ((2, 1, 32, 32, 8), 8, {}),  # tubelet 16 x 16 x 4
}


def build_small(name: str, size: str = "tiny", **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return build_image_encoder(name, size, **{**SMALL_INPUTS[name][2], **kwargs})


def small_volume(name: str, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(SMALL_INPUTS[name][0], generator=generator)


def loss_of(outputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    pooled, tokens = outputs
    return (
        pooled.float().square().mean()
        + tokens.float().square().mean()
        + tokens.float().sum() * 1e-3
    )
