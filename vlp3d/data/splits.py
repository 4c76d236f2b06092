"""Splits by name: a split the shards store ('train', 'valid', 'test'), or a part of one by its
patients' stratified rank (the shard column `fraction_rank`), written 'valid[0:0.5]'. That is how a
sweep carves a report split out of shards that hold none: the patients of 'valid' ranked below 0.5
select, the others report; the rank is stratified by each patient's rarest finding, so both parts hold
about the same share of every finding, and it is fixed by the patient id (the same on every machine)."""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np

_PART = re.compile(r"^(?P<split>[^\[\]]+)\[(?P<low>[0-9.]*):(?P<high>[0-9.]*)\]$")


@dataclass(frozen=True)
class SplitPart:
    """Rows of stored split `split` whose patients' rank lies in [low, high)."""

    split: str
    low: float = 0.0
    high: float = 1.0

    @property
    def whole(self) -> bool:
        return self.low <= 0.0 and self.high >= 1.0

    def mask(self, splits: np.ndarray, ranks: np.ndarray | None) -> np.ndarray:
        keep = np.asarray(splits) == self.split
        if not self.whole:
            ranks = np.asarray(ranks)
            keep &= (ranks >= self.low) & ((ranks < self.high) | (self.high >= 1.0))
        return keep

    @property
    def key(self) -> str:
        """The name in metric, table and tag names (MLflow allows no brackets): 'valid', 'valid_0.5-1'."""
        return self.split if self.whole else f"{self.split}_{self.low:g}-{self.high:g}"

    def __str__(self) -> str:
        return self.split if self.whole else f"{self.split}[{self.low:g}:{self.high:g}]"


def parse_split(name: str) -> SplitPart:
    """'valid' -> the whole stored split; 'valid[0.5:1]' -> its patients ranked in [0.5, 1)."""
    match = _PART.match(name)
    if not match:
        return SplitPart(name)
    low, high = float(match["low"] or 0.0), float(match["high"] or 1.0)
    if not 0.0 <= low < high <= 1.0:
        raise ValueError(f"split '{name}': a part [low:high] needs 0 <= low < high <= 1, e.g. 'valid[0:0.5]'")
    return SplitPart(match["split"], low, high)


def carve(split: str, share: float) -> tuple[str, str]:
    """(selection part, report part) of stored split `split`: the report part holds `share` of its patients."""
    cut = round(1.0 - share, 6)
    return f"{split}[0:{cut:g}]", f"{split}[{cut:g}:1]"


def expected_rows(by_split: dict[str, int], name: str) -> int:
    """Rows of a split or part of one from the manifest's per-split counts (a part: its share, rounded down)."""
    part = parse_split(name)
    return int(by_split.get(part.split, 0) * (part.high - part.low))
