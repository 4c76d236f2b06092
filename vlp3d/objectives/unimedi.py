"""UniMedI: one ViT for 2D and 3D, language-guided (attentive) slice selection, self-distillation.

Views per step: the 3D volume; a pseudo-2D image built from the volume's top-k slices by the EMA
teacher's [CLS] attention (k slices tiled into one 2D mosaic, ceil(sqrt(k)) per row, so the 2D
tokenizer sees them as one image — ours); and, when the corpus has radiographs, a batch of real
2D images with their own reports (batches are per modality).

Terms:
- `vl_contrast`: InfoNCE of image [CLS] embedding and report embedding, averaged over the 3D,
  pseudo-2D and 2D views (one shared space).
- `distill_cls`: DINO cross-entropy between the sharpened, centred teacher [CLS] distribution of
  the full view and the student's of a masked view (mask ratio 0.5); the 3D teacher also teaches
  the pseudo-2D student.
- `distill_patch`: iBOT cross-entropy on the masked patch tokens of each view.
The teacher is an EMA of the student (momentum cosine 0.996 -> 1.0), updated after every step.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from vlp3d.config import ExperimentConfig, register_method, setting
from vlp3d.errors import InputError
from vlp3d.objectives.base import Objective
from vlp3d.objectives.clip import ClipLoss
from vlp3d.objectives.distributed import all_reduce_mean
from vlp3d.objectives.heads import patch_mask

TERMS = ("vl_contrast", "distill_cls", "distill_patch")


@dataclass(frozen=True)
class UniMedIConfig:
    """UniMedI's own settings, read when `objective.name = "unimedi"`: term weights, EMA teacher, DINO/iBOT."""

    vl_contrast_weight: float = setting(1.0, "UniMedI `vl_contrast`: InfoNCE of image [CLS] and report for 3D, pseudo-2D and 2D.", ge=0)
    distill_cls_weight: float = setting(1.0, "UniMedI `distill_cls`: DINO self-distillation on [CLS].", ge=0)
    distill_patch_weight: float = setting(1.0, "UniMedI `distill_patch`: iBOT self-distillation on masked patch tokens.", ge=0)
    ema_momentum: tuple[float, float] = setting((0.996, 1.0), "UniMedI: EMA teacher momentum, cosine schedule from first to second value.", ge=0, le=1)
    top_k_slices: int = setting(4, "UniMedI: slices kept by attentive slice selection (ours: 4), tiled into one pseudo-2D image.", ge=1)
    student_mask_ratio: float = setting(0.5, "UniMedI: share of patch tokens the student does not see.", ge=0, lt=1)
    dino_dim: int = setting(1024, "UniMedI: prototypes of the DINO/iBOT head (paper-scale: 8192+).", ge=1)
    teacher_temperature: float = setting(0.04, "UniMedI: teacher sharpening temperature.", gt=0)
    student_temperature: float = setting(0.1, "UniMedI: student temperature.", gt=0)
    center_momentum: float = setting(0.9, "UniMedI: momentum of the teacher-output centre.", ge=0, le=1)


class DINOHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> prototypes with unit-norm weights (DINO's weight-normed layer, g = 1)."""

    def __init__(self, in_dim: int, out_dim: int, hidden: int = 512, bottleneck: int = 128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Linear(hidden, bottleneck))
        self.prototypes = nn.Parameter(torch.randn(out_dim, bottleneck) * 0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(x), dim=-1) @ F.normalize(self.prototypes, dim=-1).T


def ema_momentum(step: int, max_steps: int, start: float = 0.996, end: float = 1.0) -> float:
    """Cosine schedule of the teacher momentum: `start` at step 0, `end` at `max_steps`."""
    progress = min(1.0, step / max(1, max_steps))
    return end - (end - start) * (math.cos(math.pi * progress) + 1) / 2


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    """teacher <- momentum * teacher + (1 - momentum) * student, parameter by parameter."""
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        t.mul_(momentum).add_(s.detach().to(t.dtype), alpha=1 - momentum)


def dino_loss(teacher_logits: torch.Tensor, student_logits: torch.Tensor, center: torch.Tensor,
              teacher_temperature: float, student_temperature: float) -> torch.Tensor:
    """Mean over rows of H(softmax((t - c) / Tt), log_softmax(s / Ts)); the teacher side has no gradient."""
    target = F.softmax((teacher_logits.detach().float() - center) / teacher_temperature, dim=-1)
    return -(target * F.log_softmax(student_logits.float() / student_temperature, dim=-1)).sum(-1).mean()


@torch.no_grad()
def teacher_mean(teacher_logits: torch.Tensor) -> torch.Tensor:
    """The mean of the teacher outputs over the global batch (an all-reduce under DDP)."""
    return all_reduce_mean(teacher_logits.detach().float().reshape(-1, teacher_logits.shape[-1]).mean(0))


@torch.no_grad()
def apply_center(center: torch.Tensor, batch_mean: torch.Tensor, momentum: float) -> None:
    """center <- m * center + (1 - m) * batch_mean (in place)."""
    center.mul_(momentum).add_(batch_mean[None], alpha=1 - momentum)



def select_slices(slice_scores: torch.Tensor, k: int, min_gap: int = 1) -> torch.Tensor:
    """Indices [B, k] of k distinct slices ranked by score, at least `min_gap` apart, in ascending
    slice order.

    Greedy: take the best slice, drop those closer than `min_gap` to it, repeat. With `min_gap` =
    the tubelet depth, the k slices come from k different tubelet slabs (top-k alone would return
    the adjacent slices of the best slab, which share its attention). When fewer than k slices
    keep the gap (a short volume), the best remaining ones fill up."""
    b, depth = slice_scores.shape
    k = min(k, depth)
    scores = slice_scores.detach().float()
    positions = torch.arange(depth, device=scores.device)[None]
    unchosen = torch.ones_like(scores, dtype=torch.bool)
    apart = unchosen.clone()
    chosen = []
    for _ in range(k):
        candidates = torch.where(apart.any(1, keepdim=True), apart, unchosen)
        index = scores.masked_fill(~candidates, -math.inf).argmax(1)
        chosen.append(index)
        unchosen[torch.arange(b), index] = False
        apart &= (positions - index[:, None]).abs() >= min_gap
    return torch.stack(chosen, 1).sort(dim=1).values


def slice_mosaic(volume: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """volume [B, C, X, Y, Z], indices [B, k] -> one 2D image [B, C, rows * X, cols * Y] tiling the
    axial slices volume[..., z] row by row (cols = ceil(sqrt(k)); empty tiles stay 0)."""
    b, c, x, y, _ = volume.shape
    k = indices.shape[1]
    cols = math.ceil(math.sqrt(k))
    rows = math.ceil(k / cols)
    index = indices[:, None, None, None, :].expand(b, c, x, y, k)
    slices = volume.gather(4, index).permute(0, 4, 1, 2, 3)  # [B, k, C, X, Y]
    if rows * cols > k:
        slices = torch.cat([slices, slices.new_zeros(b, rows * cols - k, c, x, y)], dim=1)
    grid = slices.reshape(b, rows, cols, c, x, y).permute(0, 3, 1, 4, 2, 5)
    return grid.reshape(b, c, rows * x, cols * y)


def forward_with_attention(encoder: nn.Module, image: torch.Tensor):
    """UniMedI ViT forward that also returns [CLS]->patch attention averaged over heads and layers."""
    x = encoder.embed(image)
    attention = 0
    for block in encoder.blocks:
        x, weights = block(x, return_attention=True)
        attention = attention + weights[:, :, 0, 1:].mean(dim=1)
    x = encoder.norm(x)
    return x[:, 0], x[:, 1:], attention / len(encoder.blocks)


@register_method(section=UniMedIConfig, defaults={
    # one ViT-B for 2D (224^2 radiographs) and 3D; 128 x 128 x 96 volumes
    "model.image_encoder": "unimedi_vit", "model.size": "base",
    "data.shape": (128, 128, 96), "data.spacing_mm": (0.75, 0.75, 1.5), "data.shape_2d": (224, 224),
    "data.report_sections": ("Findings_EN", "Impressions_EN"),
    "objective.temperature": 0.07, "objective.learnable_temperature": True,
    "train.lr": 1e-4, "train.weight_decay": 0.05,
})
class UniMedIObjective(Objective):
    name = "unimedi"
    # (train.micro_batch)
    micro_batch_refusal = ("self-distillation centres the teacher's outputs on the mean over the whole batch "
                           "(updated in the forward pass) and each step pairs a 3D batch with a 2D batch of "
                           "another size; micro-batches would move the centres per micro-batch")
    terms = TERMS
    projection_terms = frozenset({"vl_contrast"})
    uses_2d = True  # radiographs (the shards' xray/ rows) as a second dataset

    @classmethod
    def find_unused_parameters(cls, active, image_encoder: nn.Module) -> bool:
        """Every active term runs the 3D volume and its pseudo-2D slice mosaic through the student,
        so both tokenizers get gradients in every step (with or without radiographs); only an
        idle projection (no `vl_contrast`) or an idle DINO head (neither distillation term) makes
        DDP look for unused parameters."""
        active = set(active)
        return not active & cls.projection_terms or not active & {"distill_cls", "distill_patch"}

    def __init__(self, cfg: ExperimentConfig, model: nn.Module, text_dim: int):
        super().__init__()
        if not hasattr(model.image_encoder, "patch_embed_2d"):
            raise InputError(f"objective.name = 'unimedi' needs model.image_encoder = 'unimedi_vit' "
                             f"(one ViT for 2D and 3D), got {cfg.model.image_encoder!r}.")
        o = cfg.objective.unimedi  # the method's own settings ([objective.unimedi])
        self.cfg = o
        self.max_steps = cfg.train.max_steps
        self.active = set(self.term_weights(cfg))
        self.clip = ClipLoss(cfg.objective.gather_with_grad, cfg.objective.local_loss)
        width = model.image_encoder.out_dim
        self.head = DINOHead(width, o.dino_dim)
        self.teacher_encoder = copy.deepcopy(model.image_encoder).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.register_buffer("center_cls", torch.zeros(1, o.dino_dim))
        self.register_buffer("center_patch", torch.zeros(1, o.dino_dim))
        # this step's global teacher means, computed in forward (a collective every rank runs), applied to
        # the centres in after_step: a skipped (non-finite) step never reaches the centres
        self._pending_centres: tuple[torch.Tensor, torch.Tensor] | None = None

    def _distill(self, teacher_logits, student_logits, center) -> torch.Tensor:
        return dino_loss(teacher_logits, student_logits, center, self.cfg.teacher_temperature,
                         self.cfg.student_temperature)

    def forward(self, model: nn.Module, batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        o, student = self.cfg, model.image_encoder
        volume, report = batch["volume"], batch["report_embedding"]
        with torch.no_grad():
            self.teacher_encoder.eval()
            t_cls3, t_patch3, attention = forward_with_attention(self.teacher_encoder, volume)
            scores = self.teacher_encoder.attention_by_slice(attention, volume.shape)
            slab = self.teacher_encoder.tubelet_size[2]  # slices per tubelet: one slice per slab at most
            pseudo = slice_mosaic(volume, select_slices(scores, o.top_k_slices, min_gap=slab))
        views = [("3d", volume, report), ("pseudo2d", pseudo, report)]
        if "image_2d" in batch:
            views.append(("2d", batch["image_2d"], batch["report_embedding_2d"]))

        out: dict[str, torch.Tensor] = {}
        if "vl_contrast" in self.active:
            scale = model.scale()
            losses = [self.clip(F.normalize(model.image_proj(student(image)[0]), dim=-1), model.encode_text(text), scale)
                      for _, image, text in views]
            out["vl_contrast"] = sum(losses) / len(losses)
        if self.active & {"distill_cls", "distill_patch"}:
            cls_losses, patch_losses, teacher_cls, teacher_patch = [], [], [], []
            for name, image, _ in views:
                with torch.no_grad():
                    if name == "3d":
                        t_cls, t_patch = t_cls3, t_patch3
                    else:
                        t_cls, t_patch = self.teacher_encoder(image)
                    t_cls, t_patch = self.teacher_head(t_cls), self.teacher_head(t_patch)
                mask = patch_mask(student.token_grid(image.shape), image.shape[0], o.student_mask_ratio, image.device)
                s_cls, s_patch = student(image, token_mask=mask)
                s_cls = self.head(s_cls)
                cls_losses.append(self._distill(t_cls, s_cls, self.center_cls))
                if name == "pseudo2d":  # the 3D teacher also teaches the pseudo-2D student
                    cls_losses.append(self._distill(teacher_cls[0], s_cls, self.center_cls))
                patch_losses.append(self._distill(t_patch[mask], self.head(s_patch[mask]), self.center_patch))
                teacher_cls.append(t_cls)
                teacher_patch.append(t_patch.reshape(-1, t_patch.shape[-1]))
            if "distill_cls" in self.active:
                out["distill_cls"] = sum(cls_losses) / len(cls_losses)
            if "distill_patch" in self.active:
                out["distill_patch"] = sum(patch_losses) / len(patch_losses)
            if self.training:  # applied in after_step, only when the step is not skipped
                self._pending_centres = (teacher_mean(torch.cat(teacher_cls)), teacher_mean(torch.cat(teacher_patch)))
        return out

    def degenerate_state(self, model: nn.Module) -> list[str]:
        """Also the weights the EMA teacher is about to read (student encoder and head) and the pending
        centre means: a non-finite one would poison the teacher or the centres for the rest of the run."""
        bad = super().degenerate_state(model)
        student = [*model.image_encoder.parameters(), *self.head.parameters()]
        if not bool(torch.stack([torch.isfinite(p).all() for p in student]).all()):
            bad.append("student weights (the EMA teacher reads them)")
        if any(not bool(torch.isfinite(m).all()) for m in self._pending_centres or ()):
            bad.append("teacher output means (the centres read them)")
        return bad

    def after_step(self, model: nn.Module, step: int) -> None:
        """After the optimizer step `step` (1-based; never after a skipped step): the centres move to this
        step's teacher means, then the EMA teacher update."""
        if self._pending_centres is not None:
            apply_center(self.center_cls, self._pending_centres[0], self.cfg.center_momentum)
            apply_center(self.center_patch, self._pending_centres[1], self.cfg.center_momentum)
            self._pending_centres = None
        momentum = ema_momentum(step, self.max_steps, *self.cfg.ema_momentum)
        ema_update(self.teacher_encoder, model.image_encoder, momentum)
        ema_update(self.teacher_head, self.head, momentum)
