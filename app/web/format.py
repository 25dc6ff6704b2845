"""How numbers are written on pages: significant digits, percentages."""

from __future__ import annotations

import math


def fmt(v: float | None, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    if v == 0:
        return "0"
    a = abs(v)
    if a >= 1000 or a < 10 ** -(digits):
        return f"{v:.{digits - 1}e}"
    return f"{v:.{digits}g}" if a < 1 else f"{v:.{max(digits - int(math.log10(a)) - 1, 0) + 1}f}".rstrip("0").rstrip(".")


def pct(v: float) -> str:
    if v == 0:
        return "0%"
    if v < 1e-4:
        return f"{100 * v:.1e}%"
    return f"{100 * v:.3g}%"
