"""3D image encoders and their registry. Each returns (pooled [B, C], tokens [B, N, C]).

Registered names (`model.image_encoder`), each with size presets tiny/small/base/large
(`model.size`):

- `resnet3d`     3D ResNet (this file), any input shape.
- `swin3d`       MONAI Swin Transformer, the `swinViT` of SwinUNETR (vlp3d.encoders.swin).
- `vit3d`        MONAI ViT, the `vit` of UNETR (vlp3d.encoders.vit).
- `unimedi_vit`  one ViT shared by 2D images and 3D volumes (vlp3d.encoders.unimedi).

The transformer builders import their module only when called, so importing this registry
does not import MONAI.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable, Sequence

import torch
from torch import nn

IMAGE_ENCODERS: dict[str, Callable[..., nn.Module]] = {}
SIZES = ("tiny", "small", "base", "large")


def register(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator: add a builder `builder(size=..., **kwargs) -> nn.Module` under `name`."""

    def wrap(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        IMAGE_ENCODERS[name] = builder
        return builder

    return wrap


def build_image_encoder(name: str, size: str = "tiny", **kwargs) -> nn.Module:
    """Build the encoder registered as `name` (config `model.image_encoder`) at preset `size`.

    Keyword arguments go to the builder; every builder accepts `img_size` (the input volume
    shape (X, Y, Z), i.e. `data.shape`; only `vit3d` and `unimedi_vit` need it, for their
    positional embeddings) and `gradient_checkpointing`.
    """
    if name not in IMAGE_ENCODERS:
        raise KeyError(
            f"model.image_encoder = {name!r} is not registered; choose one of {sorted(IMAGE_ENCODERS)}."
        )
    builder = IMAGE_ENCODERS[name]
    params = inspect.signature(builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(set(kwargs) - set(params))
    if unknown and not takes_any:
        valid = sorted(k for k in params if k != "size")
        raise TypeError(
            f"model.image_encoder = {name!r} does not take {unknown}; it takes {valid}."
        )
    return builder(size=size, **kwargs)


def check_size(name: str, size: str, presets: Sequence[str]) -> None:
    """Raise a KeyError naming `model.size` when `size` is not one of `presets`."""
    if size not in presets:
        raise KeyError(f"model.size = {size!r}: {name} presets are {sorted(presets)}.")


def require_einops(name: str) -> None:
    """MONAI's Swin and ViT blocks need the optional package einops; fail early with the fix."""
    if importlib.util.find_spec("einops") is None:
        raise ImportError(
            f"model.image_encoder = {name!r} uses MONAI blocks that need the package 'einops' "
            "(a MONAI optional dependency): pip install einops."
        )


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
            if self.gradient_checkpointing and self.training:
                h = torch.utils.checkpoint.checkpoint(stage, h, use_reentrant=False)
            else:
                h = stage(h)
        tokens = h.flatten(2).transpose(1, 2)
        return tokens.mean(dim=1), tokens


@register("resnet3d")
def resnet3d(
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


@register("swin3d")
def swin3d(
    size: str = "tiny",
    img_size: Sequence[int] | None = None,
    gradient_checkpointing: bool = False,
    in_channels: int = 1,
    dropout_path_rate: float = 0.0,
) -> nn.Module:
    """MONAI Swin (SwinUNETR's `swinViT`), feature size 12/24/48/96; see vlp3d.encoders.swin."""
    from vlp3d.encoders.swin import build_swin3d

    return build_swin3d(
        size,
        img_size=img_size,
        gradient_checkpointing=gradient_checkpointing,
        in_channels=in_channels,
        dropout_path_rate=dropout_path_rate,
    )


@register("vit3d")
def vit3d(
    size: str = "tiny",
    img_size: Sequence[int] | None = None,
    gradient_checkpointing: bool = False,
    in_channels: int = 1,
    patch_size: int = 16,
    dropout_rate: float = 0.0,
) -> nn.Module:
    """MONAI ViT (UNETR's `vit`), patch 16, fixed input `img_size`; see vlp3d.encoders.vit."""
    from vlp3d.encoders.vit import build_vit3d

    return build_vit3d(
        size,
        img_size=img_size,
        gradient_checkpointing=gradient_checkpointing,
        in_channels=in_channels,
        patch_size=patch_size,
        dropout_rate=dropout_rate,
    )


@register("unimedi_vit")
def unimedi_vit(
    size: str = "tiny",
    img_size: Sequence[int] | None = None,
    gradient_checkpointing: bool = False,
    in_channels: int = 1,
    image_size_2d: Sequence[int] = (224, 224),
) -> nn.Module:
    """UniMedI ViT shared by 2D and 3D inputs; see vlp3d.encoders.unimedi."""
    from vlp3d.encoders.unimedi import build_unimedi_vit

    return build_unimedi_vit(
        size,
        img_size=img_size,
        gradient_checkpointing=gradient_checkpointing,
        in_channels=in_channels,
        image_size_2d=image_size_2d,
    )
