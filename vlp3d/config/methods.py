"""The pretraining methods' own config: each method's `[objective.<method>]` table and its
published set-up (`METHOD_DEFAULTS`)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from vlp3d.config.fields import _f

OBJECTIVES = ("clip", "mg3d", "t3d", "unimedi")


@dataclass(frozen=True)
class MG3DConfig:
    """MG-3D's own settings, read when `objective.name = "mg3d"`: term weights, masking, fusion, heads."""

    mim_weight: float = _f(1.0, "MG-3D `mim`: text-guided masked image reconstruction (MSE on masked voxels).")
    mlm_weight: float = _f(1.0, "MG-3D `mlm`: image-guided masked language modelling (CE on masked tokens).")
    sentence_consistency_weight: float = _f(0.1, "MG-3D `sentence_consistency`: fused masked report stays close (cosine) to the unmasked one.")
    disentangled_weight: float = _f(0.1, "MG-3D `disentangled`: InfoNCE between the volume and its sigmoid-gated sentence aggregate.")
    sentence_match_weight: float = _f(0.1, "MG-3D `sentence_match`: L1 between image-feature and report similarity of patient pairs.")
    mim_mask_ratio: float = _f(0.5, "MG-3D: share of image patch tokens masked for `mim`.")
    mlm_mask_prob: float = _f(0.15, "MG-3D: share of words masked (whole-word) for `mlm`.")
    fusion_layers: int = _f(2, "MG-3D: bidirectional cross-attention layers of the fusion module.")
    fusion_dim: int = _f(256, "MG-3D: width of the fusion module.")
    decoder_dim: int = _f(128, "MG-3D `mim`: channels of the first conv-decoder stage (halved each upsampling).")
    disentangled_layers: int = _f(2, "MG-3D: layers of sigmoid-gated sentence aggregation.")
    match_thresholds: tuple[float, float] = _f((0.6, 0.9), "MG-3D `sentence_match`: report similarity <= low is target 0, >= high is 1, between ignored.")
    match_dim: int = _f(128, "MG-3D `sentence_match`: dimension of the image features compared across patients.")


@dataclass(frozen=True)
class T3DConfig:
    """T3D's own settings, read when `objective.name = "t3d"`: term weights, crops, corruption, heads."""

    text_contrast_weight: float = _f(1.0, "T3D `text_contrast`: InfoNCE between each crop and its report.")
    crop_contrast_weight: float = _f(1.0, "T3D `crop_contrast`: InfoNCE between crops of the same volume (positives).")
    restore_weight: float = _f(1.0, "T3D `restore`: L1 of the report-conditioned restoration of a corrupted crop.")
    crop_shape: tuple[int, int, int] = _f((96, 96, 96), "T3D: sub-volume crop size in voxels of the high-resolution volume.")
    num_crops: int = _f(2, "T3D: crops per volume per step (>= 2 for `crop_contrast`).")
    crop_temperature: float = _f(0.1, "T3D: fixed temperature of `crop_contrast` (ours).")
    crop_dim: int = _f(128, "T3D: projection dimension of `crop_contrast`.")
    decoder_dim: int = _f(128, "T3D `restore`: channels of the first conv-decoder stage (halved each upsampling).")
    corrupt_patch: int = _f(8, "T3D `restore`: side of the local patches that are masked or shuffled (voxels, ours).")
    corrupt_mask_ratio: float = _f(0.25, "T3D `restore`: share of local patches blanked (ours).")
    corrupt_shuffle_ratio: float = _f(0.25, "T3D `restore`: share of local patches whose voxels are shuffled (ours).")
    corrupt_noise_std: float = _f(0.05, "T3D `restore`: std of the Gaussian noise added to the crop (ours).")


@dataclass(frozen=True)
class UniMedIConfig:
    """UniMedI's own settings, read when `objective.name = "unimedi"`: term weights, EMA teacher, DINO/iBOT."""

    vl_contrast_weight: float = _f(1.0, "UniMedI `vl_contrast`: InfoNCE of image [CLS] and report for 3D, pseudo-2D and 2D.")
    distill_cls_weight: float = _f(1.0, "UniMedI `distill_cls`: DINO self-distillation on [CLS].")
    distill_patch_weight: float = _f(1.0, "UniMedI `distill_patch`: iBOT self-distillation on masked patch tokens.")
    ema_momentum: tuple[float, float] = _f((0.996, 1.0), "UniMedI: EMA teacher momentum, cosine schedule from first to second value.")
    top_k_slices: int = _f(4, "UniMedI: slices kept by attentive slice selection (ours: 4), tiled into one pseudo-2D image.")
    student_mask_ratio: float = _f(0.5, "UniMedI: share of patch tokens the student does not see.")
    dino_dim: int = _f(1024, "UniMedI: prototypes of the DINO/iBOT head (paper-scale: 8192+).")
    teacher_temperature: float = _f(0.04, "UniMedI: teacher sharpening temperature.")
    student_temperature: float = _f(0.1, "UniMedI: student temperature.")
    center_momentum: float = _f(0.9, "UniMedI: momentum of the teacher-output centre.")

# `objective.<method>` sub-tables: each method's own settings
METHOD_SECTIONS: dict[str, type] = {"mg3d": MG3DConfig, "t3d": T3DConfig, "unimedi": UniMedIConfig}


def _moved_keys() -> dict[str, tuple[str, ...]]:
    moved: dict[str, tuple[str, ...]] = {}
    for method, cls in METHOD_SECTIONS.items():
        for f in dataclasses.fields(cls):
            moved[f.name] = (*moved.get(f.name, ()), method)
    return moved


# keys that were flat `objective.<key>` before the sub-tables -> the methods whose tables hold them now
# (decoder_dim: mg3d and t3d)
MOVED_OBJECTIVE_KEYS: dict[str, tuple[str, ...]] = _moved_keys()

# Each method's published set-up (docs/methods.md), as dotted config keys. Applied whenever a
# method is chosen - in a file, by an override or by `replace` - to every key the user did not set;
# explicit keys win (the CPU demo configs set a tiny encoder and coarse data). Budget keys
# (max_steps, warmup_steps, batch), precision and the cluster stay the user's: they depend on the
# hardware, not on the method.
_FINDINGS_AND_IMPRESSIONS = ("Findings_EN", "Impressions_EN")
METHOD_DEFAULTS: dict[str, dict[str, Any]] = {
    "clip": {},
    "mg3d": {
        # Swin-B on 0.75 x 0.75 x 1.5 mm, 128 x 128 x 96 crops of the body; AdamW 1e-5 (heads 5x), wd 1e-8
        "model.image_encoder": "swin3d", "model.size": "base",
        "data.shape": (128, 128, 96), "data.spacing_mm": (0.75, 0.75, 1.5), "data.foreground_crop": True,
        "data.report_sections": _FINDINGS_AND_IMPRESSIONS,
        "objective.align_weight": 0.1, "objective.temperature": 0.1, "objective.learnable_temperature": False,
        "objective.head_lr_mult": 5.0, "train.lr": 1e-5, "train.weight_decay": 1e-8,
    },
    "t3d": {
        # the same Swin-B, on 1 mm isotropic high-resolution volumes cropped into 96^3 sub-volumes
        "model.image_encoder": "swin3d", "model.size": "base",
        "data.storage": "highres", "data.spacing_mm": (1.0, 1.0, 1.0), "data.shape": (96, 96, 96),
        "data.foreground_crop": True, "data.report_sections": _FINDINGS_AND_IMPRESSIONS,
        "objective.temperature": 0.07, "objective.learnable_temperature": True,
        "train.lr": 1e-4, "train.weight_decay": 0.05,
    },
    "unimedi": {
        # one ViT-B for 2D (224^2 radiographs) and 3D; 128 x 128 x 96 volumes
        "model.image_encoder": "unimedi_vit", "model.size": "base",
        "data.shape": (128, 128, 96), "data.spacing_mm": (0.75, 0.75, 1.5), "data.shape_2d": (224, 224),
        "data.report_sections": _FINDINGS_AND_IMPRESSIONS,
        "objective.temperature": 0.07, "objective.learnable_temperature": True,
        "train.lr": 1e-4, "train.weight_decay": 0.05,
    },
}
