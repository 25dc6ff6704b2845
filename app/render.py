"""Small server-side renderers: token text made visible and safe, colours, and SVG plots (no JS build step).

All strings returned here are plain text; Jinja's autoescaping escapes them. SVG is built from numbers only.
"""

from __future__ import annotations

import math
import unicodedata

from markupsafe import Markup, escape

_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}


def visible(token: str) -> str:
    """A token as a reader should see it: newlines/tabs as symbols, control bytes as \\xNN, empty as ∅."""
    if token == "":
        return "∅"
    out = []
    for ch in token:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") or ch == "\ufffd":
            out.append(f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return "".join(out)


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


def alpha(v: float, vmax: float) -> str:
    """Background strength of a token's activation relative to the feature's max, as a CSS number."""
    if vmax <= 0 or v <= 0:
        return "0"
    return f"{min(1.0, 0.12 + 0.88 * v / vmax):.3f}"


def histogram_svg(counts: list[int], lo: float, hi: float, label: str, width: int = 360, height: int = 120,
                  color: str = "var(--bar)", log_x: bool = False, signed: bool = False) -> Markup:
    """Bar chart of equal-width bins over [lo, hi], with axis ticks and a <title> per bar for hover."""
    n = len(counts)
    if n == 0 or max(counts) == 0:
        return Markup(f'<p class="muted">{escape(label)}: no data</p>')
    pad_l, pad_b, pad_t = 6, 18, 6
    w, h = width - 2 * pad_l, height - pad_b - pad_t
    top = max(counts)
    bw = w / n
    parts = [f'<svg class="plot" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">']
    for i, c in enumerate(counts):
        if c == 0:
            continue
        bh = max(1.0, h * c / top)
        x0 = lo + (hi - lo) * i / n
        x1 = lo + (hi - lo) * (i + 1) / n
        fill = color
        if signed:
            fill = "var(--neg)" if x1 <= 0 else ("var(--pos)" if x0 >= 0 else "var(--muted)")
        rng = f"10^{x0:.2f}–10^{x1:.2f}" if log_x else f"{fmt(x0)} – {fmt(x1)}"
        parts.append(f'<rect x="{pad_l + i * bw:.2f}" y="{pad_t + h - bh:.2f}" width="{max(bw - 0.6, 0.6):.2f}" '
                     f'height="{bh:.2f}" fill="{fill}"><title>{rng}: {c:,}</title></rect>')
    y = pad_t + h + 12
    left = f"10^{lo:.0f}" if log_x else fmt(lo)
    right = f"10^{hi:.0f}" if log_x else fmt(hi)
    parts.append(f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" class="axis"/>')
    parts.append(f'<text x="{pad_l}" y="{y}" class="tick">{left}</text>')
    parts.append(f'<text x="{pad_l + w}" y="{y}" class="tick" text-anchor="end">{right}</text>')
    if signed and lo < 0 < hi:
        zx = pad_l + w * (0 - lo) / (hi - lo)
        parts.append(f'<line x1="{zx:.1f}" y1="{pad_t}" x2="{zx:.1f}" y2="{pad_t + h}" class="zero"/>')
        parts.append(f'<text x="{zx:.1f}" y="{y}" class="tick" text-anchor="middle">0</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def strip_html(toks, vmax: float, clipped_left: bool = False, clipped_right: bool = False) -> Markup:
    """A strip of tokens coloured by activation (the hot path of every page, so built here, not in Jinja).

    Every token string is escaped; active tokens are focusable and carry their exact value in data-tip,
    which CSS shows on hover and on keyboard focus.
    """
    out = ['<span class="strip">']
    if clipped_left:
        out.append('<span class="clip">…</span>')
    for t in toks:
        text = t.html if getattr(t, "html", None) is not None else escape(visible(t.text))
        cls = "tok max" if t.is_max else "tok"
        if getattr(t, "special", False):
            cls += " special"
        if t.value > 0:
            out.append(f'<span class="{cls} on" tabindex="0" style="--a:{alpha(t.value, vmax)}" '
                       f'data-tip="{text} → {fmt(t.value, 4)}">{text}</span>')
        else:
            out.append(f'<span class="{cls}" data-tip="{text} → 0">{text}</span>')
    if clipped_right:
        out.append('<span class="clip">…</span>')
    out.append("</span>")
    return Markup("".join(out))
