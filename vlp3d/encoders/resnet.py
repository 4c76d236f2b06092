"""3D ResNet encoder (`model.image_encoder = "resnet3d"`): GroupNorm basic blocks, any input shape."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from vlp3d.encoders.registry import check_size, recompute, register


def _norm(channels: int) -> nn.GroupNorm:
    # GroupNorm, not BatchNorm: DDP on small per-worker batches needs no SyncBN
    return nn.GroupNorm(min(8, channels), channels)


class BasicBlock3d(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.norm1 = _norm(out_ch)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1, bias=False)
        self.norm2 = _norm(out_ch)
        self.act = nn.GELU()
        self.skip = (
            nn.Identity()
            if stride == 1 and in_ch == out_ch
            else nn.Sequential(
                nn.Conv3d(in_ch, out_ch, 1, stride=stride, bias=False), _norm(out_ch)
            )
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(h))
        return self.act(h + self.skip(x))


RESNET_PRESETS = {
    "tiny": ((16, 32, 64, 128), (1, 1, 1, 1)),
    "small": ((32, 64, 128, 256), (1, 1, 1, 1)),
    "base": ((32, 64, 128, 256), (2, 2, 2, 2)),
    "large": ((64, 128, 256, 512), (2, 2, 2, 2)),
}


class ResNet3d(nn.Module):
    """3D ResNet: stride-2 stem, four stages of basic blocks (each halves resolution), mean pool.

    Input [B, 1, X, Y, Z]; pooled [B, C_last]; tokens [B, X/32 * Y/32 * Z/32, C_last] from the
    last stage in (x, y, z) raster order.
    """

    def __init__(
        self,
        widths=(16, 32, 64, 128),
        depths=(1, 1, 1, 1),
        in_channels: int = 1,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv3d(in_channels, widths[0], 3, stride=2, padding=1, bias=False),
            _norm(widths[0]),
            nn.GELU(),
        )
        stages, in_ch = [], widths[0]
        for width, depth in zip(widths, depths, strict=True):
            blocks = [BasicBlock3d(in_ch, width, stride=2)]
            blocks += [BasicBlock3d(width, width, stride=1) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_ch = width
        self.stages = nn.ModuleList(stages)
        self.out_dim = widths[-1]
        self.gradient_checkpointing = gradient_checkpointing

    def forward(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.stem(volume)
        for stage in self.stages:
            h = recompute(self.gradient_checkpointing, self, stage, h)
        tokens = h.flatten(2).transpose(1, 2)
        return tokens.mean(dim=1), tokens


@register("resnet3d")
def build_resnet3d(
    size: str = "tiny",
    img_size: Sequence[int] | None = None,
    gradient_checkpointing: bool = False,
    in_channels: int = 1,
) -> ResNet3d:
    """ResNet3d preset. `img_size` is accepted for a uniform call and unused (fully convolutional)."""
    check_size("resnet3d", size, RESNET_PRESETS)
    widths, depths = RESNET_PRESETS[size]
    return ResNet3d(
        widths=widths,
        depths=depths,
        in_channels=in_channels,
        gradient_checkpointing=gradient_checkpointing,
    )
