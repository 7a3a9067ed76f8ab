"""Number formats and markdown tables shared by the quickstart's report and its probe table: any value may be
None (its step did not run) or NaN and is then shown as "n/a"."""

from __future__ import annotations

import math

NA = "n/a"


def finite(v) -> bool:
    """A real number (not a bool, None, NaN or inf)."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def pct(v) -> str:
    """A 0-100 percentage with one decimal; None / NaN -> "n/a"."""
    return f"{v:.1f}" if finite(v) else NA


def score(v) -> str:
    """A CIDEr / BLEU-like score with three decimals; None / NaN -> "n/a"."""
    return f"{v:.3f}" if finite(v) else NA


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    """Markdown lines of a table (a blank line after it)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(r) + " |" for r in rows] + [""]
