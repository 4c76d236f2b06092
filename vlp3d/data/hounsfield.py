"""Stored CT values -> Hounsfield units, exactly once, and the rule that tells a CT from anything else.

Shared by every reader (`vlp3d.data.volume.load_nifti_hu`, `vlp3d.data.dicom.load_dicom_hu`); numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Stored CT values that contain air below this are already HU (shifted storage has min >= 0).
ALREADY_HU_MIN = -200.0
PLAUSIBLE_HU = (-1100.0, 4100.0)


@dataclass
class HUDecision:
    """How stored values became HU for one volume, recorded in the shards."""

    source: str  # header | metadata | already_hu | none
    slope: float
    intercept: float
    warnings: list[str] = field(default_factory=list)
    modality: str = ""  # the DICOM Modality tag ("" for NIfTI, or a DICOM file without it)


def _is_identity(slope, intercept) -> bool:
    return slope is None or (
        (slope == 1 or not math.isfinite(slope)) and (intercept in (0, None) or not math.isfinite(intercept))
    )


def to_hounsfield(raw: np.ndarray, header_scaling: tuple, metadata_scaling: tuple) -> tuple[np.ndarray, HUDecision]:
    """Apply slope/intercept exactly once: header first, else metadata unless data are already HU."""
    h_slope, h_inter = header_scaling
    m_slope, m_inter = metadata_scaling
    warnings: list[str] = []
    if not _is_identity(h_slope, h_inter):
        slope, inter = float(h_slope), float(h_inter or 0.0)
        if not _is_identity(m_slope, m_inter) and (m_slope, m_inter) != (slope, inter):
            warnings.append(
                f"metadata slope/intercept ({m_slope}, {m_inter}) differ from header ({slope}, {inter}); used header"
            )
        decision = HUDecision("header", slope, inter, warnings)
    elif not _is_identity(m_slope, m_inter):
        raw_min = float(raw.min())
        if raw_min < ALREADY_HU_MIN:
            warnings.append(
                f"metadata lists slope/intercept ({m_slope}, {m_inter}) but stored values reach {raw_min:.0f}: "
                "already HU, not applied"
            )
            decision = HUDecision("already_hu", 1.0, 0.0, warnings)
        else:
            decision = HUDecision("metadata", float(m_slope), float(m_inter), warnings)
    else:
        if float(raw.min()) >= 0:
            warnings.append("no slope/intercept anywhere and no negative values: volume may not be in HU")
        decision = HUDecision("none", 1.0, 0.0, warnings)
    hu = raw.astype(np.float32)
    if decision.slope != 1.0:
        hu *= decision.slope
    if decision.intercept != 0.0:
        hu += decision.intercept
    lo, hi = float(hu.min()), float(hu.max())
    if lo < PLAUSIBLE_HU[0] - 1000 or hi > PLAUSIBLE_HU[1] * 4:
        decision.warnings.append(f"HU range [{lo:.0f}, {hi:.0f}] is implausible for CT")
    return hu, decision


MASK_MAX_VALUES = 16
NO_NEGATIVE_HU = "no value below 0 HU"  # how `not_ct_reason` starts the rule-3 reason
_MASK_SAMPLE = 65536


class NotCTError(ValueError):
    """The volume is not a CT image in Hounsfield units (`not_ct_reason`). `uncertain_hu`: the one
    case a rescale would fix, stored values all >= 0 and no slope/intercept in the file or given
    (CT-RATE's raw files without their metadata CSV row)."""

    def __init__(self, reason: str, uncertain_hu: bool = False):
        super().__init__(reason)
        self.uncertain_hu = uncertain_hu


def not_ct_reason(hu: np.ndarray, decision: HUDecision) -> str | None:
    """Why a loaded volume (`load_volume_hu`) is not a CT image in HU; None for a CT. The rule, in order:

    1. DICOM Modality tag present and not "CT" (MR, PT, NM, US, CR, DX, SEG, ...).
    2. Label mask: at most `MASK_MAX_VALUES` (16) distinct values that, as stored (HU scaling
       undone), are all non-negative integers - {0, 1} or a small label set. Caught even when
       metadata lists a CT rescale (CT-RATE's intercept -1024 turns {0, 1} into {-1024, -1023}).
    3. No value below 0 HU after scaling: a CT of a body holds air (about -1000 HU) and fat (about
       -100 HU); a volume whose minimum is >= 0 is MR/PET-like, or CT stored with an offset whose
       RescaleSlope/RescaleIntercept are missing from both the header and the metadata.

    A CT with a rescale (header or metadata) passes as long as its HU reach below 0; so do hand-made
    CT-like volumes such as {-1000, 40} (negative values: not a mask). Cost: a strided sample of
    65536 voxels decides "not a mask" for any real image; the full `np.unique` runs only when the
    sample holds <= 16 values.
    """
    modality = decision.modality.strip().upper()
    if modality and modality != "CT":
        hint = " (2D radiographs: list them with modality 'xray')" if modality in {"CR", "DX", "DR", "RF"} else ""
        return f"DICOM Modality is {modality}, not CT{hint}"
    flat = hu.reshape(-1)
    sample = flat[:: max(1, flat.size // _MASK_SAMPLE)]
    if np.unique(sample).size <= MASK_MAX_VALUES:
        values = np.unique(flat)
        if values.size <= MASK_MAX_VALUES:
            stored = (values.astype(np.float64) - decision.intercept) / (decision.slope or 1.0)
            if stored.min() >= 0 and np.allclose(stored, np.round(stored), atol=1e-3):
                shown = np.round(stored).astype(np.int64).tolist()
                return (f"looks like a segmentation/label mask, not a CT image: {values.size} distinct "
                        f"non-negative integer values {shown} as stored")
    lo, hi = float(hu.min()), float(hu.max())
    if lo >= 0:
        return (f"{NO_NEGATIVE_HU} (range [{lo:.0f}, {hi:.0f}], HU scaling: {decision.source}): a CT holds "
                "air at about -1000 HU; MR/PET-like, or CT stored with an offset whose RescaleSlope/"
                "RescaleIntercept are missing (give them in the metadata)")
    return None


def require_ct(hu: np.ndarray, decision: HUDecision) -> None:
    """`not_ct_reason` as an exception (the rule prepare applies to every CT row, here for inference):
    `NotCTError` unless the volume is a CT in HU, with `uncertain_hu` set when a missing rescale may
    be the cause."""
    reason = not_ct_reason(hu, decision)
    if reason is not None:
        uncertain = decision.source == "none" and reason.startswith(NO_NEGATIVE_HU)
        raise NotCTError(reason, uncertain_hu=uncertain)
