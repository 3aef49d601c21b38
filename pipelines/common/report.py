"""Markdown cells for the reports and model cards the stages write."""

from __future__ import annotations


def fmt_value(x) -> str:
    """A number as a table shows it: 4 significant digits for floats, a dash for None."""
    if x is None:
        return "–"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def table_cell(s) -> str:
    """Text that stays inside one Markdown table cell (pipes escaped, newlines shown as ⏎)."""
    return "–" if s is None else str(s).replace("|", "\\|").replace("\n", " ⏎ ")
