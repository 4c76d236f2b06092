"""3D ViT encoder: MONAI's ViT as UNETR builds it, so its weights load into UNETR's `vit`."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.networks.nets import ViT
from torch import nn

from vlp3d.encoders.attention import AttentionPaths
from vlp3d.encoders.registry import check_size, recompute, register, require_einops
from vlp3d.errors import InputError

# (hidden_size, mlp_dim, num_heads). MONAI UNETR hard-codes 12 transformer blocks and reads
# blocks 3, 6 and 9 as skips, so every preset keeps depth 12 and scales width: tiny and small
# are ViT-Ti/ViT-S, base is ViT-B, large has ViT-L's width (1024, 16 heads) at depth 12.
VIT_PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 768, 3),
    "small": (384, 1536, 6),
    "base": (768, 3072, 12),
    "large": (1024, 4096, 16),
}
VIT_DEPTH = 12
DEFAULT_IMG_SIZE = (48, 48, 48)


class ViTEncoder3d(AttentionPaths, nn.Module):
    """MONAI ViT (conv patch embedding, learnable positional embedding, no [CLS]) as an encoder.

    The backbone lives under the attribute `vit` and is built with the arguments MONAI
    `UNETR(in_channels, out_channels, img_size, hidden_size=, mlp_dim=, num_heads=)` uses,
    so `self.state_dict()` keys are UNETR's `vit.*` keys.

    The positional embedding is learned for one input shape, `img_size` (X, Y, Z), each
    divisible by `patch_size` (16). Input [B, C_in, X, Y, Z] of exactly that shape.
    Returns pooled [B, H] = mean of the final (layer-normed) tokens, tokens [B, N, H] with
    N = X*Y*Z / 16**3 in (x, y, z) raster order, H = `out_dim` = hidden_size.

    `attention` ('auto' | 'fused' | 'manual', see vlp3d.encoders.attention) sets MONAI's
    `SABlock.use_flash_attention` of every block; `attention_path` is the one in use.
    """

    def __init__(
        self,
        img_size: Sequence[int] = DEFAULT_IMG_SIZE,
        patch_size: int = 16,
        hidden_size: int = 768,
        mlp_dim: int = 3072,
        num_layers: int = VIT_DEPTH,
        num_heads: int = 12,
        in_channels: int = 1,
        dropout_rate: float = 0.0,
        qkv_bias: bool = False,
        gradient_checkpointing: bool = False,
        attention: str = "manual",
    ):
        super().__init__()
        img_size = tuple(int(s) for s in img_size)
        if len(img_size) != 3 or any(s % patch_size or s < patch_size for s in img_size):
            raise InputError(
                f"vit3d needs img_size (data.shape) = three sizes divisible by patch_size {patch_size}; "
                f"got {img_size}. Use e.g. (48, 48, 48) or (128, 128, 96)."
            )
        self.vit = ViT(
            in_channels=in_channels,
            img_size=img_size,
            patch_size=(patch_size,) * 3,
            hidden_size=hidden_size,
            mlp_dim=mlp_dim,
            num_layers=num_layers,
            num_heads=num_heads,
            proj_type="conv",
            classification=False,
            dropout_rate=dropout_rate,
            spatial_dims=3,
            qkv_bias=qkv_bias,
        )
        self.img_size = img_size
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.mlp_dim = mlp_dim
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.qkv_bias = qkv_bias
        self.in_channels = in_channels
        self.out_dim = hidden_size
        self.dropout_rate = dropout_rate
        self.gradient_checkpointing = gradient_checkpointing
        self._init_attention(attention)

    def _use_fused(self, fused: bool) -> None:
        for block in self.vit.blocks:
            block.attn.use_flash_attention = fused

    def train(self, mode: bool = True) -> ViTEncoder3d:
        super().train(mode)
        # MONAI's fused path passes SABlock.dropout_rate as dropout_p even in eval: keep it training-only
        for block in self.vit.blocks:
            block.attn.dropout_rate = self.dropout_rate if mode else 0.0
        return self

    @property
    def attention_key(self) -> tuple:
        return ("vit3d", self.hidden_size, self.mlp_dim, self.num_heads, self.num_layers, self.patch_size,
                self.in_channels, self.gradient_checkpointing)

    def forward(self, volume: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """volume [B, C_in, *img_size] -> (pooled [B, H], tokens [B, N, H]); same tokens as UNETR.vit(volume)[0]."""
        if tuple(volume.shape[2:]) != self.img_size:
            raise InputError(
                f"vit3d was built for img_size {self.img_size} (its positional embedding is fixed) but got "
                f"input {tuple(volume.shape[2:])}; build it with img_size = data.shape (or the crop size)."
            )
        self._resolve_attention(volume)
        tokens = self._attention_probe(volume)
        return tokens.mean(dim=1), tokens

    def _attention_probe(self, volume: torch.Tensor) -> torch.Tensor:
        """The final layer-normed tokens [B, N, H]."""
        x = self.vit.patch_embedding(volume)
        for block in self.vit.blocks:
            x = recompute(self.gradient_checkpointing, self, block, x)
        return self.vit.norm(x)


@register("vit3d")
def build_vit3d(
    size: str = "tiny",
    img_size: Sequence[int] | None = None,
    gradient_checkpointing: bool = False,
    in_channels: int = 1,
    patch_size: int = 16,
    dropout_rate: float = 0.0,
    attention: str = "manual",
) -> ViTEncoder3d:
    """Preset `size` of ViTEncoder3d; `img_size` defaults to (48, 48, 48), the default `data.shape`.
    `attention`: 'auto' | 'fused' | 'manual' (`model.attention`)."""
    require_einops("vit3d")
    check_size("vit3d", size, VIT_PRESETS)
    hidden_size, mlp_dim, num_heads = VIT_PRESETS[size]
    return ViTEncoder3d(
        img_size=tuple(img_size) if img_size is not None else DEFAULT_IMG_SIZE,
        patch_size=patch_size,
        hidden_size=hidden_size,
        mlp_dim=mlp_dim,
        num_layers=VIT_DEPTH,
        num_heads=num_heads,
        in_channels=in_channels,
        dropout_rate=dropout_rate,
        gradient_checkpointing=gradient_checkpointing,
        attention=attention,
    )
