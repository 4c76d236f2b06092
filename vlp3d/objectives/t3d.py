"""T3D: high-resolution sub-volume crops, text-informed contrast and restoration (METHODS.md).

The encoder never sees a downsampled whole volume: the trainer feeds `crops` [B, K, 1, *crop]
sampled inside the body from volumes stored at full resolution (`data.storage = "highres"`).
Terms:
- `text_contrast`: InfoNCE (global batch) between each crop's embedding and its report's,
  averaged over the K crops.
- `crop_contrast`: crops of the same volume are positives: InfoNCE between 128-d projections of
  every pair of crops, fixed temperature 0.1 (ours).
- `restore`: the first crop of each volume is corrupted — local patches blanked, voxels shuffled
  inside other patches, Gaussian noise (ours, after Models Genesis) — encoded, and restored by a
  conv decoder FiLM-conditioned on the frozen report embedding (ours); L1 to the clean crop.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from vlp3d.config import ExperimentConfig, register_method, setting
from vlp3d.errors import InputError
from vlp3d.objectives.base import Objective
from vlp3d.objectives.clip import ClipLoss
from vlp3d.objectives.heads import ConvDecoder, probe_encoder

TERMS = ("text_contrast", "crop_contrast", "restore")


@dataclass(frozen=True)
class T3DConfig:
    """T3D's own settings, read when `objective.name = "t3d"`: term weights, crops, corruption, heads."""

    text_contrast_weight: float = setting(1.0, "T3D `text_contrast`: InfoNCE between each crop and its report.", ge=0)
    crop_contrast_weight: float = setting(1.0, "T3D `crop_contrast`: InfoNCE between crops of the same volume (positives).", ge=0)
    restore_weight: float = setting(1.0, "T3D `restore`: L1 of the report-conditioned restoration of a corrupted crop.", ge=0)
    crop_shape: tuple[int, int, int] = setting((96, 96, 96), "T3D: sub-volume crop size in voxels of the high-resolution volume.", ge=1)
    num_crops: int = setting(2, "T3D: crops per volume per step (>= 2 for `crop_contrast`).", ge=1)
    crop_temperature: float = setting(0.1, "T3D: fixed temperature of `crop_contrast` (ours).", gt=0)
    crop_dim: int = setting(128, "T3D: projection dimension of `crop_contrast`.", ge=1)
    decoder_dim: int = setting(128, "T3D `restore`: channels of the first conv-decoder stage (halved each upsampling).", ge=1)
    corrupt_patch: int = setting(8, "T3D `restore`: side of the local patches that are masked or shuffled (voxels, ours).", ge=1)
    corrupt_mask_ratio: float = setting(0.25, "T3D `restore`: share of local patches blanked (ours).", ge=0, le=1)
    corrupt_shuffle_ratio: float = setting(0.25, "T3D `restore`: share of local patches whose voxels are shuffled (ours).", ge=0, le=1)
    corrupt_noise_std: float = setting(0.05, "T3D `restore`: std of the Gaussian noise added to the crop (ours).", ge=0)


def corrupt(crop: torch.Tensor, patch: int, mask_ratio: float, shuffle_ratio: float, noise_std: float,
            generator: torch.Generator | None = None) -> torch.Tensor:
    """crop [B, 1, X, Y, Z] (each side a multiple of `patch`) -> corrupted copy.

    Of the patch^3 cells, `mask_ratio` are set to 0 and `shuffle_ratio` (of the rest) get their
    voxels permuted; then N(0, noise_std) noise everywhere.
    """
    b, c, *size = crop.shape
    grid = [s // patch for s in size]
    if any(s % patch for s in size):
        raise InputError(f"objective.t3d.crop_shape {tuple(size)} must be a multiple of objective.t3d.corrupt_patch={patch}")
    n, voxels = int(np.prod(grid)), patch**3
    cells = crop.reshape(b, c, grid[0], patch, grid[1], patch, grid[2], patch)
    cells = cells.permute(0, 1, 2, 4, 6, 3, 5, 7).reshape(b, c, n, voxels)
    draw = torch.rand(b, n, generator=generator).to(crop.device)
    blank = draw < mask_ratio
    shuffle = (draw >= mask_ratio) & (draw < mask_ratio + shuffle_ratio * (1 - mask_ratio))
    order = torch.rand(b, n, voxels, generator=generator).argsort(dim=-1).to(crop.device)
    shuffled = cells.gather(3, order[:, None].expand(-1, c, -1, -1))
    cells = torch.where(shuffle[:, None, :, None], shuffled, cells)
    cells = cells.masked_fill(blank[:, None, :, None], 0.0)
    out = cells.reshape(b, c, *grid, patch, patch, patch).permute(0, 1, 2, 5, 3, 6, 4, 7).reshape(crop.shape)
    noise = torch.randn(crop.shape, generator=generator).to(crop.device) * noise_std
    return out + noise.to(out.dtype)


@register_method(section=T3DConfig, defaults={
    # the same Swin-B, on 1 mm isotropic high-resolution volumes cropped into 96^3 sub-volumes
    "model.image_encoder": "swin3d", "model.size": "base",
    "data.storage": "highres", "data.spacing_mm": (1.0, 1.0, 1.0), "data.shape": (96, 96, 96),
    "data.foreground_crop": True, "data.report_sections": ("Findings_EN", "Impressions_EN"),
    "objective.temperature": 0.07, "objective.learnable_temperature": True,
    "train.lr": 1e-4, "train.weight_decay": 0.05,
})
class T3DObjective(Objective):
    name = "t3d"
    # (train.micro_batch)
    micro_batch_refusal = ("not yet: its crop and crop-report contrasts could be cached, but `restore` draws "
                           "its corruption for the whole batch at once, so a micro-batched step would not be "
                           "the same step")
    terms = TERMS
    projection_terms = frozenset({"text_contrast"})
    columns = ("image", "image_shape", "report_embedding", "row")  # row: seeds each volume's crops
    storage = "highres"
    evaluation = "tiles"  # Embedder.embed_tiled: the mean over crop-sized tiles inside the body
    input_setting = "objective.t3d.crop_shape"

    @classmethod
    def input_shape(cls, cfg: ExperimentConfig) -> tuple[int, int, int]:
        return tuple(cfg.objective.t3d.crop_shape)

    @classmethod
    def check_shards(cls, cfg: ExperimentConfig, spec: Mapping, shard_dir: Path) -> None:
        super().check_shards(cfg, spec, shard_dir)
        if any(c > s for c, s in zip(cfg.objective.t3d.crop_shape, cfg.data.shape, strict=True)):
            raise InputError(f"objective.t3d.crop_shape {cfg.objective.t3d.crop_shape} exceeds data.shape {cfg.data.shape}, "
                             "the minimum stored size; make data.shape at least the crop shape.")

    @classmethod
    def collate(cls, cfg: ExperimentConfig, spec: Mapping) -> Callable[[int], Callable]:
        """`seed -> collate`, the collate function sampling `objective.t3d.num_crops` crops of
        `objective.t3d.crop_shape` per high-resolution volume, centred inside the body, from a generator
        seeded by (seed, row id): the crops depend on the data, never on the order in which Ray's
        threads collate batches."""
        from vlp3d.data.shards import decode_image
        from vlp3d.data.volume import PreprocessSpec, body_level

        stored = PreprocessSpec.from_dict(spec)
        dtype, body = stored.storage_dtype, body_level(stored)

        def collate_for(seed: int):
            def collate(batch: dict) -> dict:
                crops = np.stack([
                    sample_crops(decode_image(v, s, dtype), cfg.objective.t3d.crop_shape, cfg.objective.t3d.num_crops,
                                 np.random.default_rng([seed, int(row)]), body)
                    for v, s, row in zip(batch["image"], batch["image_shape"], batch["row"], strict=True)])
                embeddings = np.stack(list(batch["report_embedding"])).astype(np.float32)
                return {"crops": torch.from_numpy(crops), "report_embedding": torch.from_numpy(embeddings)}

            return collate

        return collate_for

    def __init__(self, cfg: ExperimentConfig, model: nn.Module, text_dim: int):
        super().__init__()
        o = cfg.objective.t3d  # the method's own settings ([objective.t3d])
        self.cfg = o
        if o.num_crops < 1 or (o.crop_contrast_weight > 0 and o.num_crops < 2):
            raise InputError(f"objective.t3d.num_crops={o.num_crops}: `crop_contrast` needs at least 2 crops per "
                             "volume (or set objective.t3d.crop_contrast_weight = 0).")
        self.active = set(self.term_weights(cfg))
        self.clip = ClipLoss(cfg.objective.gather_with_grad, cfg.objective.local_loss)
        self.crop_scale = 1.0 / o.crop_temperature
        grid, width = probe_encoder(model.image_encoder, o.crop_shape)
        if "crop_contrast" in self.active:
            self.crop_head = nn.Sequential(nn.Linear(width, width), nn.GELU(), nn.Linear(width, o.crop_dim))
        if "restore" in self.active:
            self.decoder = ConvDecoder(width, grid, o.crop_shape, o.decoder_dim, condition_dim=text_dim)

    def forward(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        crops, report = batch["crops"], batch["report_embedding"]  # [B, K, 1, X, Y, Z], [B, H]
        b, k = crops.shape[:2]
        pooled, _ = model.image_encoder(crops.flatten(0, 1))
        pooled = pooled.reshape(b, k, -1)
        out: dict[str, torch.Tensor] = {}
        if "text_contrast" in self.active:
            image = F.normalize(model.image_proj(pooled), dim=-1)
            text, scale = model.encode_text(report), model.scale()
            out["text_contrast"] = sum(self.clip(image[:, i], text, scale) for i in range(k)) / k
        if "crop_contrast" in self.active:
            projected = F.normalize(self.crop_head(pooled), dim=-1)
            pairs = list(itertools.combinations(range(k), 2))
            out["crop_contrast"] = sum(
                self.clip(projected[:, i], projected[:, j], self.crop_scale) for i, j in pairs) / len(pairs)
        if "restore" in self.active:
            clean = crops[:, 0]
            damaged = corrupt(clean, self.cfg.corrupt_patch, self.cfg.corrupt_mask_ratio,
                              self.cfg.corrupt_shuffle_ratio, self.cfg.corrupt_noise_std)
            _, tokens = model.image_encoder(damaged)
            restored = self.decoder(tokens, condition=report.float())
            out["restore"] = F.l1_loss(restored, clean)
        return out


def sample_crops(volume: np.ndarray, shape: Sequence[int], count: int, rng: np.random.Generator,
                 body_level: float, stride: int = 4) -> np.ndarray:
    """`count` crops [count, *shape] of a stored volume [X, Y, Z], each centred on a random body
    voxel (value > `body_level`, drawn from a `stride`-subsampled grid; uniform when there is no
    body), clipped so the crop stays inside; a volume smaller than `shape` is zero-padded first."""
    pad = [(0, max(0, s - v)) for s, v in zip(shape, volume.shape, strict=True)]
    if any(p[1] for p in pad):
        volume = np.pad(volume, pad)
    body = np.argwhere(volume[::stride, ::stride, ::stride] > body_level) * stride
    crops = []
    for _ in range(count):
        if len(body):
            centre = body[rng.integers(len(body))]
        else:
            centre = [rng.integers(v) for v in volume.shape]
        corner = [int(min(max(0, c - s // 2), v - s)) for c, s, v in zip(centre, shape, volume.shape, strict=True)]
        crops.append(volume[tuple(slice(c, c + s) for c, s in zip(corner, shape, strict=True))])
    return np.stack(crops)


def tile_corners(size: Sequence[int], shape: Sequence[int]) -> list[tuple[int, ...]]:
    """Corners of crops of `shape` covering a volume of `size` (the last crop on each axis
    flush with the edge; one crop at 0 when the axis is shorter, to be zero-padded)."""
    axes = []
    for s, c in zip(size, shape, strict=True):
        starts = list(range(0, max(1, s - c + 1), c))
        if s > c and starts[-1] != s - c:
            starts.append(s - c)
        axes.append(starts)
    return list(itertools.product(*axes))
