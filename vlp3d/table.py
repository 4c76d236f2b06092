"""Plain-text tables for terminal summaries."""

from __future__ import annotations

from collections.abc import Sequence


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3f}" if abs(value) < 1e4 else f"{value:.3g}"
    return str(value)


def format_table(rows: Sequence[Sequence], headers: Sequence[str], title: str = "") -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    def fmt(values):
        return " | ".join(v.rjust(w) if i else v.ljust(w) for i, (v, w) in enumerate(zip(values, widths, strict=True)))
    out = [title] if title else []
    out += [fmt(headers), "-+-".join("-" * w for w in widths)]
    out += [fmt(r) for r in cells]
    return "\n".join(out)
