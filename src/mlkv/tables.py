"""One table formatter: aligned text for the terminal, pipe tables for markdown reports, and one number format."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

MISSING = "-"


def fmt(value: Any, spec: str = ",.4g", pct: bool = False) -> str:
    """A cell: ``None`` -> ``-``; ints with thousands separators; floats by ``spec`` (x100 first when ``pct``)."""
    if value is None or value == "N/A":
        return MISSING
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    if pct:
        value = 100 * value
    if isinstance(value, int) and not pct:
        return f"{value:,}"
    return format(value, spec)


def _cells(rows: Sequence[dict] | Sequence[Sequence[Any]], columns: Sequence[str] | None) -> tuple[list, list]:
    if rows and isinstance(rows[0], dict):
        columns = list(columns or rows[0])
        return columns, [[str(r.get(c, "")) for c in columns] for r in rows]  # type: ignore[union-attr]
    return list(columns or []), [[str(c) for c in r] for r in rows]


def text_table(rows: Sequence[dict] | Sequence[Sequence[Any]], columns: Sequence[str] | None = None) -> str:
    """Right-aligned columns separated by two spaces, a header line first (rows: dicts, or lists with columns)."""
    columns, cells = _cells(rows, columns)
    if not cells:
        return ""
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(columns, widths))]
    lines += ["  ".join(v.rjust(w) for v, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def markdown_table(rows: Sequence[dict] | Sequence[Sequence[Any]], columns: Sequence[str] | None = None) -> str:
    """A GitHub pipe table (rows: dicts, or lists with columns)."""
    columns, cells = _cells(rows, columns)
    lines = ["| " + " | ".join(columns) + " |", "| " + " | ".join("---" for _ in columns) + " |"]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)
