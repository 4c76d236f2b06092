"""Swin Transformer 3D encoder: MONAI's SwinUNETR `swinViT`, so its weights load into SwinUNETR."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets.swin_unetr import PatchMerging, SwinTransformer, SwinTransformerBlock
from monai.utils import ensure_tuple_rep
from torch import nn

from vlp3d.encoders.attention import AttentionPaths, fuse_window_attention
from vlp3d.encoders.registry import check_size, register, require_einops
from vlp3d.errors import InputError

# feature_size per preset (METHODS.md: 48 is "Swin-B", 96 is "Swin-L"); SwinUNETR needs a multiple of 12
SWIN_PRESETS: dict[str, int] = {"tiny": 12, "small": 24, "base": 48, "large": 96}
SWIN_DEPTHS = (2, 2, 2, 2)
SWIN_HEADS = (3, 6, 12, 24)
SWIN_PATCH = 2
SWIN_WINDOW = 7


class SwinEncoder3d(AttentionPaths, nn.Module):
    """MONAI Swin Transformer (patch 2, window 7, four stages) as a (pooled, tokens) encoder.

    The backbone is built with exactly the arguments `SwinUNETR(in_channels, out_channels,
    feature_size=F)` passes to its `swinViT`, and lives under the attribute `swinViT`, so
    `self.state_dict()` keys are SwinUNETR's `swinViT.*` keys.

    Input [B, C_in, X, Y, Z] with X, Y, Z divisible by 32 (patch 2 then four 2x merges).
    Last stage: [B, 16F, X/32, Y/32, Z/32], 16F = `out_dim` (768 for F = 48).
    Returns pooled [B, 16F] = mean over last-stage tokens, tokens [B, X/32 * Y/32 * Z/32, 16F]
    in (x, y, z) raster order (z fastest). Stage outputs are layer-normalised without affine
    parameters, as SwinUNETR's `normalize=True` does, so `tokens` equals what SwinUNETR's
    decoder receives as its deepest skip.

    `attention` ('auto' | 'fused' | 'manual', see vlp3d.encoders.attention) picks the window
    attention path; `attention_path` is the one in use (None while 'auto' is unmeasured).
    """

    def __init__(
        self,
        feature_size: int = 48,
        in_channels: int = 1,
        depths: Sequence[int] = SWIN_DEPTHS,
        num_heads: Sequence[int] = SWIN_HEADS,
        patch_size: int = SWIN_PATCH,
        window_size: int = SWIN_WINDOW,
        dropout_path_rate: float = 0.0,
        gradient_checkpointing: bool = False,
        attention: str = "manual",
    ):
        super().__init__()
        if feature_size % 12 != 0:
            raise InputError(
                f"swin3d feature_size must be a multiple of 12 (SwinUNETR's rule), got {feature_size}."
            )
        if len(depths) != 4 or len(num_heads) != 4:
            raise InputError(
                f"swin3d has four stages; got depths={tuple(depths)}, num_heads={tuple(num_heads)}."
            )
        # same arguments, in the same order, as monai.networks.nets.SwinUNETR.__init__ (MONAI 1.6)
        self.swinViT = SwinTransformer(
            in_chans=in_channels,
            embed_dim=feature_size,
            window_size=ensure_tuple_rep(window_size, 3),
            patch_size=ensure_tuple_rep(patch_size, 3),
            depths=tuple(depths),
            num_heads=tuple(num_heads),
            mlp_ratio=4.0,
            qkv_bias=True,
            drop_rate=0.0,
            attn_drop_rate=0.0,
            drop_path_rate=dropout_path_rate,
            norm_layer=nn.LayerNorm,
            patch_norm=False,
            use_checkpoint=gradient_checkpointing,
            spatial_dims=3,
            downsample=PatchMerging,
            use_v2=False,
        )
        self.feature_size = feature_size
        self.patch_size = patch_size
        self.depths = tuple(depths)
        self.num_heads = tuple(num_heads)
        self.window_size = window_size
        self.in_channels = in_channels
        self.out_dim = feature_size * 2 ** len(depths)
        self._gradient_checkpointing = gradient_checkpointing
        self._sync_checkpointing()
        fuse_window_attention(self.swinViT)
        self._init_attention(attention)

    @property
    def gradient_checkpointing(self) -> bool:
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self._gradient_checkpointing = bool(enabled)
        self._sync_checkpointing()

    def _sync_checkpointing(self) -> None:
        # MONAI checkpoints whenever use_checkpoint is set; recompute only while training
        enabled = self._gradient_checkpointing and self.training
        for module in self.swinViT.modules():
            if isinstance(module, SwinTransformerBlock):
                module.use_checkpoint = enabled

    def train(self, mode: bool = True) -> SwinEncoder3d:
        super().train(mode)
        self._sync_checkpointing()
        return self

    def _use_fused(self, fused: bool) -> None:
        for module in fuse_window_attention(self.swinViT):
            module.fused = fused

    @property
    def attention_key(self) -> tuple:
        return ("swin3d", self.feature_size, self.in_channels, self.depths, self.num_heads,
                self.window_size, self.gradient_checkpointing)

    def _attention_probe(self, volume: torch.Tensor) -> torch.Tensor:
        return self.swinViT(volume, normalize=True)[-1]

    def check_input(self, spatial_shape: Sequence[int]) -> None:
        """Raise ValueError unless every spatial size is divisible by patch_size**5 (32)."""
        factor = self.patch_size**5
        if len(spatial_shape) != 3 or any(int(s) % factor for s in spatial_shape):
            raise InputError(
                f"swin3d needs a 3D input whose sizes are divisible by {factor}; got spatial shape "
                f"{tuple(int(s) for s in spatial_shape)}. Set data.shape (or the crop size) to multiples of "
                f"{factor}, e.g. (128, 128, 96)."
            )

    def hidden_states(self, volume: torch.Tensor) -> list[torch.Tensor]:
        """The five normalised stage outputs SwinUNETR feeds its decoder.

        [B, F, X/2, Y/2, Z/2], [B, 2F, X/4, ...], [B, 4F, X/8, ...], [B, 8F, X/16, ...], [B, 16F, X/32, ...].
        """
        self.check_input(volume.shape[2:])
        self._resolve_attention(volume)
        return self.swinViT(volume, normalize=True)

    def forward(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """volume [B, C_in, X, Y, Z] -> (pooled [B, 16F], tokens [B, X*Y*Z/32**3, 16F])."""
        last = self.hidden_states(volume)[-1]
        tokens = last.flatten(2).transpose(1, 2)
        return tokens.mean(dim=1), tokens


@register("swin3d")
def build_swin3d(
    size: str = "tiny",
    img_size: Sequence[int] | None = None,
    gradient_checkpointing: bool = False,
    in_channels: int = 1,
    dropout_path_rate: float = 0.0,
    attention: str = "manual",
) -> SwinEncoder3d:
    """Preset `size` (feature size tiny 12, small 24, base 48, large 96); validates `img_size` if given.
    `attention`: 'auto' | 'fused' | 'manual' (`model.attention`)."""
    require_einops("swin3d")
    check_size("swin3d", size, SWIN_PRESETS)
    encoder = SwinEncoder3d(
        feature_size=SWIN_PRESETS[size],
        in_channels=in_channels,
        dropout_path_rate=dropout_path_rate,
        gradient_checkpointing=gradient_checkpointing,
        attention=attention,
    )
    if img_size is not None:
        encoder.check_input(tuple(img_size))
    return encoder
