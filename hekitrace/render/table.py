"""Fixed-width text tables that fit 80 columns, and human-readable sizes.

Operators read these in a terminal during incidents, often over a serial console or a
narrow tmux pane; 80 columns is the contract. Columns have a fixed width and alignment
chosen by the caller; a cell that does not fit is cut with ``~`` at the end (never
wrapped), so one row stays one line and ``grep``/``sort`` keep working.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

WIDTH = 80
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


def human_size(size_bytes: int) -> str:
    """``4096`` -> ``4.0 KiB``; binary units, one decimal, exact bytes below 1 KiB."""
    size = float(size_bytes)
    for unit in _UNITS:
        if abs(size) < 1024 or unit == _UNITS[-1]:
            return f"{int(size)} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def human_pages(pages: int) -> str:
    """A size given in 4 KiB pages, in human units."""
    return human_size(pages * 4096)


def human_duration(seconds: float) -> str:
    """``93784`` -> ``1d02h``; ``75`` -> ``1m15s``; short enough for a table cell."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f}s" if seconds < 10 else f"{seconds:.0f}s"
    minutes, sec = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{sec:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def cut(text: str, width: int) -> str:
    """``text`` cut to ``width`` columns, the cut marked with ``~``."""
    return text if len(text) <= width else text[:max(0, width - 1)] + "~"


@dataclass(frozen=True)
class Column:
    """One table column: header, width in characters, ``<`` left or ``>`` right aligned."""

    header: str
    width: int
    align: str = "<"


class Table:
    """Rows of strings under fixed columns, two spaces apart, at most ``WIDTH`` wide.

    The last column is never padded (no trailing blanks in golden files).
    """

    def __init__(self, columns: Sequence[Column], indent: int = 0,
                 max_width: int = WIDTH) -> None:
        total = indent + sum(c.width for c in columns) + 2 * (len(columns) - 1)
        if total > max_width:
            raise ValueError(f"table is {total} columns wide; at most {max_width}")
        self.columns = list(columns)
        self.indent = " " * indent

    def line(self, cells: Sequence[object]) -> str:
        parts = []
        for column, cell in zip(self.columns, cells):
            text = cut(str(cell), column.width)
            parts.append(f"{text:{column.align}{column.width}}")
        return (self.indent + "  ".join(parts)).rstrip()

    def header(self) -> str:
        return self.line([c.header for c in self.columns])

    def render(self, rows: Iterable[Sequence[object]]) -> list[str]:
        return [self.header()] + [self.line(r) for r in rows]
