"""Caps on one input volume, checked from its header or shape before its voxels are read or resampled."""

from __future__ import annotations

import math
from dataclasses import dataclass

from vlp3d.errors import InputError


@dataclass(frozen=True)
class VolumeLimits:
    """Caps on one input volume, checked from its header (NIfTI dims, DICOM rows x columns x frames) or
    its array's shape before its voxels are read or resampled: `max_voxels` for the stored grid and for
    the grid it is resampled to (`resampled_voxels`: a small array with a huge spacing expands), and
    `max_bytes` for the memory loading and resampling it needs (`volume_bytes`). Readers without limits
    (prepare, reading its own corpus) check nothing."""

    max_voxels: int = 2**28  # 268 M: a 512 x 512 x 1024 CT fits
    max_bytes: int = 4 * 2**30

    def check(self, shape, itemsize: int, resampled: int = 0) -> None:
        """ValueError naming the cap when a volume of `shape` stored with `itemsize` bytes per voxel
        (resampled to `resampled` voxels, when known) exceeds it."""
        voxels = math.prod(int(n) for n in shape)
        for what, count in (("stored", voxels), ("after resampling", resampled)):
            if count > self.max_voxels:
                raise InputError(f"volume too large: {count:,} voxels {what} (shape {list(shape)}) exceed the cap of "
                                 f"{self.max_voxels:,} (max_voxels); check its size and voxel spacing")
        needed = volume_bytes(voxels, itemsize, resampled)
        if needed > self.max_bytes:
            raise InputError(f"volume too large: about {needed / 2**30:.1f} GiB to load and resample (shape "
                             f"{list(shape)}) exceed the cap of {self.max_bytes / 2**30:.1f} GiB (max_bytes)")


def volume_bytes(voxels: int, itemsize: int, resampled: int = 0) -> int:
    """Estimated peak memory of loading and preprocessing one volume: the stored values, two float32
    copies of the input grid (HU, reoriented) and two of the resampled grid."""
    return voxels * (int(itemsize) + 8) + resampled * 8
