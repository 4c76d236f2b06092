"""Building blocks shared by the objectives: token grids, patch masks,
a conv decoder (optionally FiLM-conditioned), bidirectional cross-attention fusion."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from vlp3d.errors import InputError


def token_grid(encoder: nn.Module, input_shape: Sequence[int], num_tokens: int) -> tuple[int, ...]:
    """Token grid (x, y, z) of an encoder's last-stage tokens for an input [B, C, X, Y, Z]."""
    if hasattr(encoder, "token_grid"):
        return tuple(encoder.token_grid(input_shape))
    spatial = [int(s) for s in input_shape[2:]]
    stride = round((math.prod(spatial) / num_tokens) ** (1 / len(spatial)))
    grid = tuple(max(1, math.ceil(s / stride)) for s in spatial)
    if math.prod(grid) != num_tokens:
        raise InputError(f"cannot infer the token grid of {type(encoder).__name__}: {num_tokens} tokens "
                         f"for input {tuple(spatial)}")
    return grid


def patch_mask(grid: Sequence[int], batch: int, ratio: float, device=None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """Bool [B, prod(grid)], True = masked: exactly round(ratio * N) random tokens per sample."""
    n = math.prod(grid)
    k = min(n, max(1 if ratio > 0 else 0, round(ratio * n)))
    order = torch.rand(batch, n, generator=generator).argsort(dim=1)
    mask = torch.zeros(batch, n, dtype=torch.bool)
    mask.scatter_(1, order[:, :k], True)
    return mask.to(device)


def upsample_mask(mask: torch.Tensor, grid: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """Token mask [B, N] -> voxel mask [B, 1, *shape] (nearest; each token covers its cell)."""
    cells = mask.reshape(mask.shape[0], 1, *grid).float()
    return F.interpolate(cells, size=tuple(shape), mode="nearest") > 0.5


class ConvDecoder(nn.Module):
    """Tokens on their grid -> a voxel volume: stages of 2x trilinear upsampling + conv.

    MG-3D's decoder is 5 such stages from the Swin's 1/32 grid; here the number of stages is
    whatever reaches `shape` from `grid` (anisotropic grids upsample only the axes that still
    need it). With `condition_dim`, every stage is FiLM-modulated by a conditioning vector
    (T3D's report-conditioned restoration); FiLM starts as the identity.
    """

    def __init__(self, in_dim: int, grid: Sequence[int], shape: Sequence[int], width: int = 128,
                 condition_dim: int = 0, min_width: int = 8):
        super().__init__()
        self.grid, self.shape = tuple(int(g) for g in grid), tuple(int(s) for s in shape)
        stages = max(math.ceil(math.log2(max(1.0, s / g))) for s, g in zip(self.shape, self.grid, strict=True))
        self.input = nn.Conv3d(in_dim, width, 1)
        self.stages, self.films = nn.ModuleList(), nn.ModuleList()
        self.condition_dim = condition_dim
        in_ch = width
        for i in range(stages):
            out_ch = max(min_width, width // 2 ** (i + 1))
            self.stages.append(nn.Sequential(nn.Conv3d(in_ch, out_ch, 3, padding=1),
                                             nn.GroupNorm(math.gcd(8, out_ch), out_ch), nn.GELU()))
            if condition_dim:
                film = nn.Linear(condition_dim, 2 * out_ch)
                nn.init.zeros_(film.weight)
                nn.init.zeros_(film.bias)
                self.films.append(film)
            in_ch = out_ch
        self.head = nn.Conv3d(in_ch, 1, 1)

    def forward(self, tokens: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """tokens [B, N, C] on `grid` -> [B, 1, *shape]."""
        h = tokens.transpose(1, 2).reshape(tokens.shape[0], tokens.shape[2], *self.grid)
        h = self.input(h)
        size = list(self.grid)
        for i, stage in enumerate(self.stages):
            size = [min(t, 2 * s) for s, t in zip(size, self.shape, strict=True)]
            h = stage(F.interpolate(h, size=tuple(size), mode="trilinear", align_corners=False))
            if self.condition_dim:
                gamma, beta = self.films[i](condition)[:, :, None, None, None].chunk(2, dim=1)
                h = h * (1 + gamma) + beta
        if tuple(size) != self.shape:
            h = F.interpolate(h, size=self.shape, mode="trilinear", align_corners=False)
        return self.head(h)


@torch.no_grad()
def probe_encoder(encoder: nn.Module, shape: Sequence[int]) -> tuple[tuple[int, ...], int]:
    """(token grid, token width) of `encoder` for inputs of spatial `shape` (one dummy forward)."""
    was_training = encoder.training
    encoder.eval()
    _, tokens = encoder(torch.zeros(1, 1, *shape))
    encoder.train(was_training)
    return token_grid(encoder, (1, 1, *shape), tokens.shape[1]), int(tokens.shape[2])


class CrossAttentionLayer(nn.Module):
    """Queries attend to a context (pre-norm), then an MLP; both residual."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_mlp = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attention = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_padding: torch.Tensor | None = None):
        kv = self.norm_kv(context)
        x = x + self.attention(self.norm_q(x), kv, kv, key_padding_mask=context_padding, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))


class FusionModule(nn.Module):
    """MG-3D fusion: per layer, image tokens query text tokens and text tokens query image tokens
    (both from the previous layer's states), each followed by an MLP."""

    def __init__(self, image_dim: int, text_dim: int, dim: int = 256, layers: int = 2, heads: int = 8):
        super().__init__()
        heads = math.gcd(dim, heads)
        self.image_in, self.text_in = nn.Linear(image_dim, dim), nn.Linear(text_dim, dim)
        self.image_layers = nn.ModuleList(CrossAttentionLayer(dim, heads) for _ in range(layers))
        self.text_layers = nn.ModuleList(CrossAttentionLayer(dim, heads) for _ in range(layers))
        self.image_norm, self.text_norm = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dim = dim

    def forward(self, image_tokens: torch.Tensor, text_tokens: torch.Tensor, text_mask: torch.Tensor):
        """(image [B, N, Ci], text [B, T, Ct], text_mask [B, T] True = real token) -> fused (image, text) [B, *, dim]."""
        image, text = self.image_in(image_tokens), self.text_in(text_tokens)
        padding = ~text_mask.bool()
        for image_layer, text_layer in zip(self.image_layers, self.text_layers, strict=True):
            image, text = image_layer(image, text, padding), text_layer(text, image)
        return self.image_norm(image), self.text_norm(text)


def masked_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the voxels where `mask` is True only."""
    mask = mask.to(prediction.dtype)
    return ((prediction - target) ** 2 * mask).sum() / mask.sum().clamp(min=1.0)


def zero_like_graph(*tensors: torch.Tensor) -> torch.Tensor:
    """A zero that still depends on `tensors` (keeps DDP's every-parameter-gets-a-gradient contract)."""
    return sum(t.sum() * 0.0 for t in tensors)
