"""SVG plots built on the server from numbers only (no JS build step); Jinja autoescapes every label."""

from __future__ import annotations

from markupsafe import Markup, escape

from .format import fmt


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
