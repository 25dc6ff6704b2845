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


def scatter_svg(points: list[tuple[float, float, str]], xlabel: str, ylabel: str, width: int = 360,
                height: int = 220) -> Markup:
    """Labelled points (x, y, label) on linear axes with min/max ticks; a <title> per point for hover."""
    pts = [(x, y, lab) for x, y, lab in points if x is not None and y is not None]
    if not pts:
        return Markup(f'<p class="muted">{escape(ylabel)} vs {escape(xlabel)}: no data</p>')
    pad_l, pad_r, pad_t, pad_b = 40, 10, 8, 30
    w, h = width - pad_l - pad_r, height - pad_t - pad_b
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 0.5 * (abs(x0) or 1), x1 + 0.5 * (abs(x1) or 1)
    if y1 == y0:
        y0, y1 = y0 - 0.05 * (abs(y0) or 1), y1 + 0.05 * (abs(y1) or 1)
    sx = lambda v: pad_l + w * (v - x0) / (x1 - x0)  # noqa: E731
    sy = lambda v: pad_t + h - h * (v - y0) / (y1 - y0)  # noqa: E731
    label = f"{ylabel} vs {xlabel}"
    parts = [f'<svg class="plot" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(label)}">',
             f'<line x1="{pad_l}" y1="{pad_t + h}" x2="{pad_l + w}" y2="{pad_t + h}" class="axis"/>',
             f'<line x1="{pad_l}" y1="{pad_t}" x2="{pad_l}" y2="{pad_t + h}" class="axis"/>']
    for x, y, lab in pts:
        parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="4" fill="var(--bar)"><title>{escape(lab)}: '
                     f'{escape(xlabel)} {fmt(x)}, {escape(ylabel)} {fmt(y)}</title></circle>')
        parts.append(f'<text x="{sx(x) + 6:.1f}" y="{sy(y) - 5:.1f}" class="tick">{escape(lab)}</text>')
    ty = pad_t + h + 12
    parts += [f'<text x="{pad_l}" y="{ty}" class="tick">{fmt(x0)}</text>',
              f'<text x="{pad_l + w}" y="{ty}" class="tick" text-anchor="end">{fmt(x1)}</text>',
              f'<text x="{pad_l + w / 2:.1f}" y="{ty + 12}" class="tick" text-anchor="middle">{escape(xlabel)}</text>',
              f'<text x="{pad_l - 3}" y="{pad_t + h}" class="tick" text-anchor="end">{fmt(y0)}</text>',
              f'<text x="{pad_l - 3}" y="{pad_t + 8}" class="tick" text-anchor="end">{fmt(y1)}</text>',
              f'<text x="10" y="{pad_t + h / 2:.1f}" class="tick" text-anchor="middle" '
              f'transform="rotate(-90 10 {pad_t + h / 2:.1f})">{escape(ylabel)}</text>', "</svg>"]
    return Markup("".join(parts))
