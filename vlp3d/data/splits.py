"""Splits by name: a split the shards store ('train', 'valid', 'test'), or a part of one by a hash of
its patients' ids, written 'valid[0:0.5]'. That is how a sweep carves a report split out of shards that
hold none: the patients of 'valid' whose hash falls below 0.5 select, the others report. The hash is of
the patient id alone (the same on every machine and for every preprocessing of the same corpus), so a
patient's scans stay in one part. (Not `fraction_rank`, the stratified rank nested data fractions use:
a patient alone in its stratum has rank 0.5, so small held-out splits would fall to one side.)"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

import numpy as np

from vlp3d.errors import InputError

_PART = re.compile(r"^(?P<split>[^\[\]]+)\[(?P<low>[0-9.]*):(?P<high>[0-9.]*)\]$")


def patient_unit(patient_id: str) -> float:
    """A patient's stable pseudo-random number in [0, 1): which part of a split it belongs to."""
    digest = hashlib.sha256(f"vlp3d-split-part:{patient_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


@dataclass(frozen=True)
class SplitPart:
    """Rows of stored split `split` whose patients' unit (`patient_unit`) lies in [low, high)."""

    split: str
    low: float = 0.0
    high: float = 1.0

    @property
    def whole(self) -> bool:
        return self.low <= 0.0 and self.high >= 1.0

    def contains(self, patient_id) -> bool:
        """Whether a patient of the stored split is in this part."""
        return self.whole or self.low <= patient_unit(str(patient_id)) < self.high

    def mask(self, splits: np.ndarray, patients: np.ndarray | None) -> np.ndarray:
        keep = np.asarray(splits) == self.split
        if not self.whole:
            keep &= np.array([self.contains(p) for p in np.asarray(patients)], dtype=bool)
        return keep

    @property
    def key(self) -> str:
        """The name in metric, table and tag names (MLflow allows no brackets): 'valid', 'valid_0.5-1'."""
        return self.split if self.whole else f"{self.split}_{self.low:g}-{self.high:g}"

    def __str__(self) -> str:
        return self.split if self.whole else f"{self.split}[{self.low:g}:{self.high:g}]"


def parse_split(name: str) -> SplitPart:
    """'valid' -> the whole stored split; 'valid[0.5:1]' -> its patients whose unit is in [0.5, 1)."""
    match = _PART.match(name)
    if not match:
        return SplitPart(name)
    low, high = float(match["low"] or 0.0), float(match["high"] or 1.0)
    if not 0.0 <= low < high <= 1.0:
        raise InputError(f"split '{name}': a part [low:high] needs 0 <= low < high <= 1, e.g. 'valid[0:0.5]'")
    return SplitPart(match["split"], low, high)


def carve(split: str, share: float) -> tuple[str, str]:
    """(selection part, report part) of stored split `split`: the report part holds `share` of its patients."""
    cut = round(1.0 - share, 6)
    return f"{split}[0:{cut:g}]", f"{split}[{cut:g}:1]"


def expected_rows(by_split: dict[str, int], name: str) -> int:
    """Rows of a split or part of one from the manifest's per-split counts (a part: its share, rounded down)."""
    part = parse_split(name)
    return int(by_split.get(part.split, 0) * (part.high - part.low))
