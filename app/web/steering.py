"""What the steer page shows beyond the two continuations: each token's log-prob and the step's most likely tokens
on hover, KL(default || steered) per step as a small SVG, and suggested strengths (presets) per edit.

live.py's steer route calls steer_extras(); the numbers come from the worker's SteerOut and the store.
"""

from __future__ import annotations

from urllib.parse import urlencode

from markupsafe import Markup, escape

from saescope.precompute.interventions.strength import PRESETS, FeatureScale, suggest

from ..worker.wire import ContinuationOut, EditIn, SteerOut
from .format import fmt
from .tokens import alpha, visible


def logprob_strip_html(c: ContinuationOut, col: int, vmax: float, strip_id: str, mark: int | None = None) -> Markup:
    """New tokens coloured by the lead feature's activation; hover/focus shows log p of the token and the step's
    most likely tokens (all escaped); `mark`: the first token where default and steered part (class diverge)."""
    out = [f'<span class="strip" id="{strip_id}">']
    tls = c.token_logprobs or []
    for i, t in enumerate(c.tokens):
        text = escape(visible(t))
        act = c.feature_acts[i][col] if i < len(c.feature_acts) and c.feature_acts[i] else 0.0
        tip = [f"{text} → {fmt(act, 4)}"]
        lp = tls[i] if i < len(tls) else None
        if lp is not None:
            tip.append(f"log p {lp.logprob:.3f}")
            tip += [f"  {escape(visible(o.token))}  {o.logprob:.3f}" for o in lp.top_logprobs]
        cls = "tok on lp diverge" if i == mark else "tok on lp"
        out.append(f'<span class="{cls}" tabindex="0" style="--a:{alpha(act, vmax)}" '
                   f'data-logprob="{lp.logprob if lp is not None else ""}" data-tip="{"&#10;".join(tip)}">{text}</span>')
    out.append("</span>")
    return Markup("".join(out))


def kl_svg(kl: list[float], width: int = 360, height: int = 70) -> Markup:
    """KL(default || steered) per generated token as a small line plot, one <title> per point."""
    if not kl:
        return Markup("")
    pad, top = 6, max(max(kl), 1e-9)
    w, h = width - 2 * pad, height - 2 * pad - 10
    n = len(kl)
    xs = [pad + (w * i / max(n - 1, 1)) for i in range(n)]
    ys = [pad + h - h * v / top for v in kl]
    pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys))
    parts = [f'<svg class="plot" id="kl-plot" viewBox="0 0 {width} {height}" role="img" '
             f'aria-label="KL(default || steered) per generated token, max {fmt(top)} nats">',
             f'<polyline points="{pts}" fill="none" stroke="var(--bar)" stroke-width="1.5"/>']
    parts += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.2" fill="var(--bar)"><title>token {i}: KL {fmt(v, 4)} nats'
              f'</title></circle>' for i, (x, y, v) in enumerate(zip(xs, ys, kl))]
    parts.append(f'<text x="{pad}" y="{height - 2}" class="tick">0</text>'
                 f'<text x="{pad + w}" y="{height - 2}" class="tick" text-anchor="end">max {fmt(top)} nats</text>')
    parts.append("</svg>")
    return Markup("".join(parts))


def edit_spec(e: EditIn, value: float | None = None) -> str:
    v = e.value if value is None else value
    spec = f"{e.feature}:{e.mode}" + ("" if e.mode == "ablate" else f":{v:.4g}")
    return spec + (":unit" if e.normalize else "")


def steer_extras(request, store, sae_id: str, edits: list[EditIn], out: SteerOut, diverge: int | None = None) -> dict:
    """Template context: per-token log-prob strips, the KL plot and, per steering edit, the suggested strengths
    with a link per preset (this page's URL with that edit's value replaced)."""
    scales = {f.feature: f for f in (out.scale.features if out.scale else [])}
    rows = store.features_by_index(sae_id, [e.feature for e in edits])
    specs = [edit_spec(e) for e in edits]
    q = [(k, v) for k, v in request.query_params.multi_items() if k not in ("edit", "feature", "mode", "value")]
    hints = []
    for i, e in enumerate(edits):
        if e.mode not in ("add", "orthogonal", "cap") or e.feature not in scales or out.scale is None:
            continue
        fs: FeatureScale = FeatureScale(**scales[e.feature].model_dump())
        row = rows.get(e.feature)
        s = suggest(e.mode, e.normalize, row.max_act if row else None, fs, out.scale.resid_norm)
        links = {}
        for name in PRESETS:
            edits_q = [("edit", edit_spec(e, s.preset(name)) if j == i else sp) for j, sp in enumerate(specs)]
            links[name] = (s.preset(name), "/steer?" + urlencode(q + edits_q))
        hints.append({"spec": specs[i], "s": s, "links": links})
    lead = out.watch[0] if out.watch else None
    vmax = (rows[lead].max_act if lead in rows and rows[lead].max_act else 1.0) if lead is not None else 1.0
    return {"hints": hints, "kl_plot": kl_svg(out.kl or []),
            "default_strip": logprob_strip_html(out.default, 0, vmax, "default-completion-lp", diverge),
            "steered_strip": logprob_strip_html(out.steered, 0, vmax, "steered-completion-lp", diverge)}
