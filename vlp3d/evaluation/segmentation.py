"""Segmentation scores (MONAI metrics): per-class Dice and HD95 of label maps, and trivial baselines."""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import pandas as pd
import torch

from vlp3d.errors import InputError


def _one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """[N, X, Y, Z] integer classes -> [N, C, X, Y, Z] float one-hot."""
    return torch.nn.functional.one_hot(labels.long(), num_classes).permute(0, 4, 1, 2, 3).float()


def dice_hd95(prediction, target, num_classes: int, spacing_mm: Sequence[float] = (1.0, 1.0, 1.0)
              ) -> tuple[np.ndarray, np.ndarray]:
    """Per volume and foreground class (1..C-1): Dice (`monai.metrics.compute_dice`) and the 95th-percentile
    symmetric Hausdorff distance in mm (`monai.metrics.compute_hausdorff_distance`, percentile 95, at
    `spacing_mm`), each [N, C-1]. A class absent from the target of a volume scores NaN there (not
    counted); present in the target but not predicted: Dice 0, HD95 inf."""
    from monai.metrics import compute_dice, compute_hausdorff_distance

    prediction, target = torch.as_tensor(np.array(prediction)), torch.as_tensor(np.array(target))
    if prediction.shape != target.shape or prediction.ndim != 4:
        raise InputError(f"prediction {list(prediction.shape)} and target {list(target.shape)} must both be "
                         "[N, X, Y, Z] label maps")
    pred, true = _one_hot(prediction, num_classes), _one_hot(target, num_classes)
    dice = compute_dice(pred, true, include_background=False, ignore_empty=True).numpy()
    hd95 = np.full_like(dice, np.nan)
    for index in range(len(true)):
        present = true[index, 1:].flatten(1).any(1).numpy()
        if not present.any():
            continue
        found = pred[index, 1:].flatten(1).any(1).numpy()
        both = present & found
        if both.any():
            with warnings.catch_warnings():  # MONAI warns of the empty classes, which are not used
                warnings.simplefilter("ignore")
                distances = compute_hausdorff_distance(pred[index:index + 1], true[index:index + 1],
                                                       include_background=False, percentile=95,
                                                       spacing=[float(s) for s in spacing_mm]).numpy()[0]
            hd95[index, both] = distances[both]
        hd95[index, present & ~found] = np.inf
    return dice, hd95


def segmentation_table(prediction, target, classes: Sequence[str], spacing_mm: Sequence[float]) -> pd.DataFrame:
    """One row per foreground class: mean Dice and median HD95 (mm) over the volumes holding it, and how many
    volumes do (`volumes`). HD95 is summarised by its median: one missed structure (inf) does not make it inf."""
    dice, hd95 = dice_hd95(prediction, target, len(classes), spacing_mm)
    rows = []
    for index, name in enumerate(classes[1:]):
        held = ~np.isnan(dice[:, index])
        rows.append({"class": name, "volumes": int(held.sum()),
                     "dice": float(np.mean(dice[held, index])) if held.any() else np.nan,
                     "hd95_mm": float(np.median(hd95[held, index])) if held.any() else np.nan})
    return pd.DataFrame(rows, columns=["class", "volumes", "dice", "hd95_mm"])


def atlas_prediction(train_maps: np.ndarray, num_classes: int) -> np.ndarray:
    """The voxelwise most frequent class of the training label maps [N, X, Y, Z]: one fixed prediction for
    every volume, what knowing only where structures usually are gives (a trivial baseline)."""
    counts = np.stack([(np.asarray(train_maps) == c).sum(0) for c in range(num_classes)])
    return counts.argmax(0).astype(np.uint8)


def baseline_table(train_maps: np.ndarray, target: np.ndarray, classes: Sequence[str]) -> pd.DataFrame:
    """Trivial baselines per foreground class, to put Dice figures in context: `dice_everywhere` (the class
    predicted at every voxel) and `dice_atlas` (`atlas_prediction` of `train_maps`), on `target` [N, X, Y, Z]."""
    target = np.asarray(target)
    atlas = np.broadcast_to(atlas_prediction(train_maps, len(classes)), target.shape)
    atlas_dice, _ = dice_hd95(atlas, target, len(classes))
    rows = []
    for index, name in enumerate(classes[1:], start=1):
        voxels = (target == index).reshape(len(target), -1).sum(1)
        held = voxels > 0
        everywhere = 2 * voxels / (target[0].size + voxels)
        rows.append({"class": name,
                     "dice_everywhere": float(everywhere[held].mean()) if held.any() else np.nan,
                     "dice_atlas": float(np.nanmean(atlas_dice[held, index - 1])) if held.any() else np.nan})
    return pd.DataFrame(rows, columns=["class", "dice_everywhere", "dice_atlas"])
