"""Plain-text tables for the terminal, from rows or a pandas DataFrame."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd


def format_frame(frame: pd.DataFrame, *, empty: str = "(none)") -> str:
    """A DataFrame as left-aligned text columns under its column names, without the index."""
    if frame.empty:
        return empty
    rows = frame.astype(str).values.tolist()
    return format_rows([str(c) for c in frame.columns], rows)


def format_rows(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """Rows of cells under a header, left-aligned, two spaces between columns.

    Control characters in a cell are shown escaped (``\\n``): a newline in a stored value
    (an old ``--reason``) must not start what looks like another row.
    """
    cells = [[_cell(c) for c in header]] + [[_cell(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value: object) -> str:
    text = str(value)
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
