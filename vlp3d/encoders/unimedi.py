"""UniMedI backbone: one ViT whose transformer blocks are shared by 2D images and 3D volumes."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from vlp3d.encoders.registry import check_size, recompute, register
from vlp3d.errors import InputError

# (hidden_size, depth, num_heads): ViT-Ti, ViT-S, ViT-B, ViT-L
UNIMEDI_PRESETS: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}
PATCH_2D = (16, 16)
TUBELET_3D = (16, 16, 4)  # (x, y, z): 16x16 in-plane, 4 slices along z
DEFAULT_IMAGE_SIZE_2D = (224, 224)
DEFAULT_VOLUME_SIZE = (48, 48, 48)


class Attention(nn.Module):
    """Multi-head self-attention; the explicit path also returns the attention weights."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise InputError(f"hidden size {dim} is not divisible by num_heads {num_heads}.")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """x [B, N, C] -> (out [B, N, C], attention [B, heads, N, N] or None)."""
        batch, length, dim = x.shape
        q, k, v = (
            self.qkv(x)
            .reshape(batch, length, 3, self.num_heads, dim // self.num_heads)
            .permute(2, 0, 3, 1, 4)
        )
        if return_attention:
            attention = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)
            attention = attention.softmax(dim=-1)
            out = attention @ v
        else:
            attention = None
            out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(batch, length, dim)), attention


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        hidden = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(
        self, x: torch.Tensor, return_attention: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        out, attention = self.attn(self.norm1(x), return_attention)
        x = x + out
        return x + self.mlp(self.norm2(x)), attention

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self(x)[0]


class UniMedIViT(nn.Module):
    """ViT shared by 2D and 3D inputs (UniMedI): per-dimensionality tokenizers, one transformer.

    Inputs (the dimensionality is read from `image.ndim`):
    - 2D image [B, C_in, H, W]: 16x16 patches, N = H/16 * W/16 tokens in (h, w) raster order.
    - 3D volume [B, C_in, X, Y, Z], the project's RAS volume layout: tubelets of 16x16 in-plane
      by 4 slices, N = X/16 * Y/16 * Z/4 tokens in (x, y, z) raster order (z fastest). The
      slice axis is the **last** axis, z (axial under RAS), so an axial slice `volume[..., z]`
      is a 2D image [B, C_in, X, Y] for the 2D tokenizer.

    Each dimensionality has its own patch embedding and learned positional embedding (learned
    on the grid of `image_size_2d` / `volume_size` and interpolated to other grids); the
    [CLS] token, the [MASK] token, the transformer blocks and the final norm are shared.

    Returns pooled = final [CLS] [B, C] and tokens = final patch tokens [B, N, C], C = `out_dim`.
    """

    # the 2D tokenizer idles on volumes and the 3D one on images: DDP must find unused parameters
    input_specific_parameters = True

    def __init__(
        self,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        in_channels: int = 1,
        image_size_2d: Sequence[int] = DEFAULT_IMAGE_SIZE_2D,
        volume_size: Sequence[int] = DEFAULT_VOLUME_SIZE,
        patch_size_2d: Sequence[int] = PATCH_2D,
        tubelet_size: Sequence[int] = TUBELET_3D,
        gradient_checkpointing: bool = False,
    ):
        super().__init__()
        self.patch_size_2d = tuple(int(p) for p in patch_size_2d)
        self.tubelet_size = tuple(int(p) for p in tubelet_size)
        self.grid_2d = self.token_grid((1, in_channels, *image_size_2d))
        self.grid_3d = self.token_grid((1, in_channels, *volume_size))
        self.patch_embed_2d = nn.Conv2d(
            in_channels, hidden_size, self.patch_size_2d, stride=self.patch_size_2d
        )
        self.patch_embed_3d = nn.Conv3d(
            in_channels, hidden_size, self.tubelet_size, stride=self.tubelet_size
        )
        self.pos_embed_2d = nn.Parameter(torch.zeros(1, _prod(self.grid_2d), hidden_size))
        self.pos_embed_3d = nn.Parameter(torch.zeros(1, _prod(self.grid_3d), hidden_size))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.mask_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.blocks = nn.ModuleList(Block(hidden_size, num_heads, mlp_ratio) for _ in range(depth))
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.out_dim = hidden_size
        self.num_heads = num_heads
        self.gradient_checkpointing = gradient_checkpointing
        self._init_weights()

    def _init_weights(self) -> None:
        # N(0, 0.02): what ViT/DINO's trunc_normal_(std=.02) amounts to (its cut is at +-2, i.e.
        # 100 std), without trunc_normal_'s erfinv pass, which takes seconds on ViT-L on a CPU
        for param in (self.pos_embed_2d, self.pos_embed_3d, self.cls_token):
            nn.init.normal_(param, std=0.02)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)
        for conv in (self.patch_embed_2d, self.patch_embed_3d):
            nn.init.xavier_uniform_(conv.weight.view(conv.weight.shape[0], -1))
            nn.init.zeros_(conv.bias)

    def token_grid(self, input_shape: Sequence[int]) -> tuple[int, ...]:
        """Token grid for an input shape [B, C, H, W] -> (H/16, W/16) or [B, C, X, Y, Z] -> (X/16, Y/16, Z/4)."""
        spatial = tuple(int(s) for s in input_shape[2:])
        if len(spatial) == 2:
            patch, kind = self.patch_size_2d, "2D image"
        elif len(spatial) == 3:
            patch, kind = self.tubelet_size, "3D volume"
        else:
            raise InputError(
                f"unimedi_vit takes [B, C, H, W] or [B, C, X, Y, Z]; got shape {tuple(input_shape)}."
            )
        if any(s % p or s < p for s, p in zip(spatial, patch, strict=True)):
            raise InputError(
                f"unimedi_vit: {kind} size {spatial} must be a positive multiple of the patch {patch}."
            )
        return tuple(s // p for s, p in zip(spatial, patch, strict=True))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """A checkpoint whose 2D positional table was learned on another grid (e.g. the 14 x 14 of
        224^2 that every model used before `data.shape_2d` set the grid) loads resampled to this one."""
        key = prefix + "pos_embed_2d"
        stored = state_dict.get(key)
        if stored is not None and stored.shape != self.pos_embed_2d.shape and stored.shape[-1] == self.out_dim:
            side = math.isqrt(stored.shape[1])
            if side * side == stored.shape[1]:
                table = stored.reshape(1, side, side, -1).movedim(-1, 1)
                table = F.interpolate(table.float(), size=self.grid_2d, mode="bicubic", align_corners=False)
                state_dict[key] = table.flatten(2).transpose(1, 2).to(stored.dtype)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def _positional(self, grid: tuple[int, ...]) -> torch.Tensor:
        table, learned = (
            (self.pos_embed_2d, self.grid_2d)
            if len(grid) == 2
            else (self.pos_embed_3d, self.grid_3d)
        )
        if grid == learned:
            return table
        # another input size: resample the learned grid (as DINO/iBOT do for 2D)
        dim = table.shape[-1]
        table = table.reshape(1, *learned, dim).movedim(-1, 1)
        table = F.interpolate(
            table, size=grid, mode="bicubic" if len(grid) == 2 else "trilinear", align_corners=False
        )
        return table.flatten(2).transpose(1, 2)

    def embed(self, image: torch.Tensor, token_mask: torch.Tensor | None = None) -> torch.Tensor:
        """[CLS] + patch tokens with positional embeddings: [B, 1 + N, C].

        `token_mask` (bool [B, N], True = hidden): those patch embeddings are replaced by the
        shared [MASK] token before the positional embedding is added (iBOT's masked view).
        """
        grid = self.token_grid(image.shape)
        patches = self.patch_embed_2d(image) if image.ndim == 4 else self.patch_embed_3d(image)
        tokens = patches.flatten(2).transpose(1, 2)
        if token_mask is not None:
            if token_mask.shape != tokens.shape[:2] or token_mask.dtype != torch.bool:
                raise InputError(
                    f"token_mask must be bool [B, N] = {tuple(tokens.shape[:2])}; got "
                    f"{token_mask.dtype} {tuple(token_mask.shape)}."
                )
            tokens = torch.where(token_mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + self._positional(grid)
        return torch.cat(
            [self.cls_token.expand(tokens.shape[0], -1, -1).to(tokens.dtype), tokens], dim=1
        )

    def forward(
        self, image: torch.Tensor, token_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """image [B, C, H, W] or [B, C, X, Y, Z] -> (pooled [CLS] [B, C], patch tokens [B, N, C])."""
        x = self.embed(image, token_mask)
        for block in self.blocks:
            x = recompute(self.gradient_checkpointing, self, block.forward_features, x)
        x = self.norm(x)
        return x[:, 0], x[:, 1:]

    def cls_attention(
        self,
        image: torch.Tensor,
        token_mask: torch.Tensor | None = None,
        average_layers: bool = True,
    ) -> torch.Tensor:
        """[CLS] -> patch attention, averaged over heads: [B, N] (also over layers) or [B, layers, N].

        Rows are softmax weights over all 1 + N keys with the [CLS] column dropped, so each layer's
        row sums to 1 minus the [CLS] self-attention. Runs in the caller's grad mode (wrap the EMA
        teacher's call in `torch.no_grad()`).
        """
        x = self.embed(image, token_mask)
        per_layer = []
        for block in self.blocks:
            x, attention = block(x, return_attention=True)
            per_layer.append(attention[:, :, 0, 1:].mean(dim=1))
        stacked = torch.stack(per_layer, dim=1)
        return stacked.mean(dim=1) if average_layers else stacked

    def attention_by_slice(
        self, attention: torch.Tensor, volume_shape: Sequence[int]
    ) -> torch.Tensor:
        """Per-slice attention [B, Z] from a 3D volume's [CLS] attention [B, N] (`cls_attention`).

        Sums over the in-plane tokens of each tubelet slab (a slab spans `tubelet_size[2]` = 4
        slices along z), places each slab's sum at its centre slice and interpolates linearly
        between slab centres (constant beyond the outer ones), scaled so the result sums to the
        same total as `attention`. Slices between two attended slabs score high; a slice's score
        is its own, not a copy of its slab's.
        """
        grid = self.token_grid(volume_shape)
        if len(grid) != 3:
            raise InputError(
                f"attention_by_slice needs a 3D volume shape [B, C, X, Y, Z]; got {tuple(volume_shape)}."
            )
        depth = self.tubelet_size[2]
        per_slab = attention.reshape(attention.shape[0], *grid).sum(dim=(1, 2)).float()
        per_slice = F.interpolate(per_slab[:, None], size=grid[2] * depth, mode="linear", align_corners=False)[:, 0]
        total = per_slice.sum(1, keepdim=True)
        return per_slice * (per_slab.sum(1, keepdim=True) / total.clamp_min(torch.finfo(total.dtype).tiny))


def _prod(values: Sequence[int]) -> int:
    out = 1
    for value in values:
        out *= int(value)
    return out


@register("unimedi_vit")
def build_unimedi_vit(
    size: str = "tiny",
    img_size: Sequence[int] | None = None,
    gradient_checkpointing: bool = False,
    in_channels: int = 1,
    image_size_2d: Sequence[int] = DEFAULT_IMAGE_SIZE_2D,
) -> UniMedIViT:
    """Preset `size` (ViT-Ti/S/B/L widths); `img_size` is the 3D volume shape the positional grid is learned on."""
    check_size("unimedi_vit", size, UNIMEDI_PRESETS)
    hidden_size, depth, num_heads = UNIMEDI_PRESETS[size]
    return UniMedIViT(
        hidden_size=hidden_size,
        depth=depth,
        num_heads=num_heads,
        in_channels=in_channels,
        image_size_2d=image_size_2d,
        volume_size=tuple(img_size) if img_size is not None else DEFAULT_VOLUME_SIZE,
        gradient_checkpointing=gradient_checkpointing,
    )
