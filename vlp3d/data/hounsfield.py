"""Stored CT values -> Hounsfield units, exactly once, and the rule that tells a CT from anything else.

Shared by every reader (`vlp3d.data.volume.load_nifti_hu`, `vlp3d.data.dicom.load_dicom_hu`); numpy only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from vlp3d.errors import InputError

# Stored CT values that contain air below this are already HU (shifted storage has min >= 0).
ALREADY_HU_MIN = -200.0
PLAUSIBLE_HU = (-1100.0, 4100.0)

# Where the air peak sits (`hu_evidence`): air is about -1000 in HU and about 0 in raw values stored
# as HU + 1024, whose soft tissue then sits near 1024. Padding (outside the field of view: -1024,
# -2000, -2048, -3024 as stored or in HU) is left out: values below the air band, and the minimum
# when at least PADDING_FRACTION of the voxels hold exactly it (air has noise; padding is one value).
AIR_BAND_HU = (-1100.0, -800.0)
RAW_AIR_BAND = (-200.0, 200.0)
RAW_TISSUE_BAND = (824.0, 1224.0)
MIN_AIR_FRACTION = 0.001  # of the non-padding voxels: a body CT's air outside the body is 10-60 %
MIN_RAW_TISSUE_FRACTION = 0.10
MIN_SPREAD_HU = 200.0  # 0.1-99.9 % percentile range: air to soft tissue is about 1000 HU
AIR_SEARCH_HU = (-1100.0, -400.0)  # any air at all (lung, bowel, outside the body)
PADDING_FRACTION = 0.01
MIN_AXIS_VOXELS = 16  # the two largest axes (a single slice is a CT; a line or a few voxels are not)
_SAMPLE = 1 << 18


def _sample(values: np.ndarray) -> np.ndarray:
    """A strided sample of at most about 2^18 finite voxels (float64): what the histogram rules read."""
    flat = np.asarray(values).reshape(-1)
    sample = flat[:: max(1, flat.size // _SAMPLE)].astype(np.float64)
    return sample[np.isfinite(sample)]


def _fraction(values: np.ndarray, band: tuple[float, float]) -> float:
    return float(((values >= band[0]) & (values <= band[1])).mean()) if values.size else 0.0


def hu_evidence(values: np.ndarray) -> str:
    """Where the air peak of a CT's values sits: "hu" (air near -1000), "raw" (nothing near -1000, air
    near 0 and soft tissue near 1024: values stored as HU + 1024, whatever their minimum, so noise or
    padding below 0 does not make them HU) or "unknown" (neither: no air, or not a CT)."""
    sample = _sample(values)
    sample = sample[sample >= AIR_BAND_HU[0]]  # padding below the air band says nothing
    if sample.size and (sample == sample.min()).mean() >= PADDING_FRACTION:  # nor padding at the minimum
        sample = sample[sample != sample.min()]
    if _fraction(sample, AIR_BAND_HU) >= MIN_AIR_FRACTION:
        return "hu"
    if _fraction(sample, RAW_AIR_BAND) >= 10 * MIN_AIR_FRACTION and \
            _fraction(sample, RAW_TISSUE_BAND) >= MIN_RAW_TISSUE_FRACTION:
        return "raw"
    return "unknown"


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
        evidence = hu_evidence(raw)
        # air near -1000 as stored: already HU; a minimum below -200 alone is not enough when the air
        # sits near 0 and the tissue near 1024 (raw values with padding, e.g. -2000, or noise below 0)
        if evidence == "hu" or (raw_min < ALREADY_HU_MIN and evidence != "raw"):
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
NO_NEGATIVE_HU = "no value below 0 HU"  # how `not_ct_reason` starts the rule-5 reason
RAW_OFFSET = "stored values look like raw CT values offset from HU"  # how it starts the rule-6 raw reason
_MASK_SAMPLE = 65536


class NotCTError(InputError):
    """The volume is not a CT image in Hounsfield units (`not_ct_reason`). `uncertain_hu`: the one
    case a rescale would fix, stored values all >= 0 and no slope/intercept in the file or given
    (CT-RATE's raw files without their metadata CSV row)."""

    def __init__(self, reason: str, uncertain_hu: bool = False):
        super().__init__(reason)
        self.uncertain_hu = uncertain_hu


def not_ct_reason(hu: np.ndarray, decision: HUDecision) -> str | None:
    """Why a loaded volume (`load_volume_hu`) is not a CT image in HU; None for a CT. The rule, in order:

    1. DICOM Modality tag present and not "CT" (MR, PT, NM, US, CR, DX, SEG, ...). A manifest's
       `modality` column is read before the file (prepare: `normalise_modality`; the served model
       and `vlp3d embed`: `vlp3d.inference.load_ct`).
    2. Size: its two largest axes hold at least `MIN_AXIS_VOXELS` (16) voxels (a single slice passes;
       one voxel, a line or a few voxels do not); and not every voxel holds the same value.
    3. Label mask: at most `MASK_MAX_VALUES` (16) distinct values that, as stored (HU scaling
       undone), are all non-negative integers - {0, 1} or a small label set. Caught even when
       metadata lists a CT rescale (CT-RATE's intercept -1024 turns {0, 1} into {-1024, -1023}).
    4. Value range: the 0.1-99.9 % percentiles span at least `MIN_SPREAD_HU` (200 HU); air to soft
       tissue is about 1000 HU. Z-scored or normalised volumes (MR) and PET in SUV span a few units.
    5. No value below 0 HU after scaling: a CT of a body holds air (about -1000 HU) and fat (about
       -100 HU); a volume whose minimum is >= 0 is MR/PET-like, or CT stored with an offset whose
       RescaleSlope/RescaleIntercept are missing from both the header and the metadata.
    6. Where the air peak sits (`hu_evidence`): nothing near -1000 but air near 0 and soft tissue
       near 1024 is raw CT without its rescale, even when noise or padding dips below 0; no air at
       all (nothing in [-1100, -400] HU: no air outside the body, no lung, no bowel gas) is not a
       CT of a body (a crop inside the body, or another modality with a few negative values).

    Cost: a strided sample of about 2^18 voxels decides every rule but the mask's exact value set
    (the full `np.unique` runs only when the sample holds <= 16 values).
    """
    modality = decision.modality.strip().upper()
    if modality and modality != "CT":
        hint = " (2D radiographs: list them with modality 'xray')" if modality in {"CR", "DX", "DR", "RF"} else ""
        return f"DICOM Modality is {modality}, not CT{hint}"
    axes = sorted(hu.shape)
    if hu.ndim != 3 or axes[-2] < MIN_AXIS_VOXELS:
        return (f"degenerate volume of shape {list(hu.shape)}: a CT has at least {MIN_AXIS_VOXELS} x "
                f"{MIN_AXIS_VOXELS} voxels in a slice")
    flat = hu.reshape(-1)
    sample = flat[:: max(1, flat.size // _MASK_SAMPLE)]
    if np.unique(sample).size <= MASK_MAX_VALUES:
        values = np.unique(flat)
        if values.size == 1:
            return f"degenerate volume: every voxel holds the same value ({float(values[0]):.0f})"
        if values.size <= MASK_MAX_VALUES:
            stored = (values.astype(np.float64) - decision.intercept) / (decision.slope or 1.0)
            if stored.min() >= 0 and np.allclose(stored, np.round(stored), atol=1e-3):
                shown = np.round(stored).astype(np.int64).tolist()
                return (f"looks like a segmentation/label mask, not a CT image: {values.size} distinct "
                        f"non-negative integer values {shown} as stored")
    lo, hi = float(hu.min()), float(hu.max())
    spread = np.percentile(_sample(hu), [0.1, 99.9])
    if spread[1] - spread[0] < MIN_SPREAD_HU:
        return (f"value range [{spread[0]:.3g}, {spread[1]:.3g}] (0.1-99.9 %) is far narrower than a CT's (air "
                "at about -1000 HU, soft tissue at 0-100 HU): z-scored or normalised intensities (MR?) or PET "
                "(SUV), not Hounsfield units")
    if lo >= 0:
        return (f"{NO_NEGATIVE_HU} (range [{lo:.0f}, {hi:.0f}], HU scaling: {decision.source}): a CT holds "
                "air at about -1000 HU; MR/PET-like, or CT stored with an offset whose RescaleSlope/"
                "RescaleIntercept are missing (give them in the metadata)")
    evidence = hu_evidence(hu)
    if evidence == "raw":
        return (f"{RAW_OFFSET} (range [{lo:.0f}, {hi:.0f}], HU scaling: {decision.source}): nothing near "
                "-1000 HU, but air near 0 and soft tissue near 1024, as CT stored as HU + 1024 holds them "
                "(values below 0 are noise or padding); give its RescaleSlope/RescaleIntercept (CT-RATE: 1, -1024)")
    if evidence == "unknown" and _fraction(_sample(hu), AIR_SEARCH_HU) < MIN_AIR_FRACTION / 10:
        return (f"no air (nothing in [{AIR_SEARCH_HU[0]:.0f}, {AIR_SEARCH_HU[1]:.0f}] HU; range [{lo:.0f}, "
                f"{hi:.0f}], HU scaling: {decision.source}): a CT of a body holds air at about -1000 HU "
                "outside the body and in the lungs; another modality, or a crop inside the body")
    return None


def require_ct(hu: np.ndarray, decision: HUDecision) -> None:
    """`not_ct_reason` as an exception (the rule prepare applies to every CT row, here for inference):
    `NotCTError` unless the volume is a CT in HU, with `uncertain_hu` set when a missing rescale may
    be the cause."""
    reason = not_ct_reason(hu, decision)
    if reason is not None:
        uncertain = decision.source == "none" and reason.startswith((NO_NEGATIVE_HU, RAW_OFFSET))
        raise NotCTError(reason, uncertain_hu=uncertain)
