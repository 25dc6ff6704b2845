"""Token strips: a context's tokens made visible and safe, coloured by activation, windowed around a marked token.

All token strings are untrusted: they are escaped here (strip_html) or by Jinja's autoescaping.
"""

from __future__ import annotations

import unicodedata
import weakref
from dataclasses import dataclass

from markupsafe import Markup, escape

from saescope.precompute.store import Example, Store

from .format import fmt

_VISIBLE = {"\n": "↵", "\t": "⇥", "\r": "␍"}


def _code(ch: str) -> str:
    return f"\\x{ord(ch):02x}" if ord(ch) < 256 else f"\\u{ord(ch):04x}"


def visible(token: str) -> str:
    """A token as a reader should see it: leading spaces as · (" big" is not "big", as Neuronpedia shows it),
    newlines/tabs as symbols, control bytes as \\xNN, empty as ∅."""
    if token == "":
        return "∅"
    body = token.lstrip(" ")
    out = ["·"] * (len(token) - len(body))
    for ch in body:
        if ch in _VISIBLE:
            out.append(_VISIBLE[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn") or ch == "\ufffd":
            out.append(_code(ch))
        else:
            out.append(ch)
    return "".join(out)


_JOINERS = frozenset("\u200c\u200d")  # zero-width (non-)joiners: part of emoji and of many scripts, kept


def shown(text: str) -> str:
    """Untrusted prose (notes, prompts, queries, explanations) with its control and format characters (bidi
    overrides such as U+202E included) written out as \\uNNNN, so they can neither hide nor reorder the page's
    own text; newlines and tabs are kept. Plain text: for attributes and <title>; escaped by Jinja."""
    out = []
    for ch in str(text):
        if ch in "\n\t" or ch in _JOINERS:
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Co", "Cn"):
            out.append(_code(ch))
        else:
            out.append(ch)
    return "".join(out)


def untrusted(text) -> Markup:
    """The one way templates print untrusted prose: escaped, control characters shown (shown()), and isolated
    in a <bdi> so right-to-left text inside it cannot reorder the sentence around it."""
    if text is None:
        text = ""
    return Markup(f'<bdi class="u">{escape(shown(text))}</bdi>')


def alpha(v: float, vmax: float) -> str:
    """Background strength of a token's activation relative to the feature's max, as a CSS number."""
    if vmax <= 0 or v <= 0:
        return "0"
    return f"{min(1.0, 0.12 + 0.88 * v / vmax):.3f}"


@dataclass
class Tok:
    text: str
    value: float
    is_max: bool
    html: str | None = None  # the escaped visible form, when precomputed
    special: bool = False  # BOS/EOS/pad: shown muted, never an activation
    extra: str = ""  # more CSS classes (e.g. "diverge": where steered and default text part)


@dataclass
class Window:
    example: Example
    toks: list[Tok]
    clipped_left: bool
    clipped_right: bool


def window(ex: Example, left: int, right: int, html: list[str] | None = None,
           special: frozenset[int] = frozenset()) -> Window:
    """Tokens [pos - left, pos + right] of an example's context around its marked token."""
    lo, hi = max(0, ex.pos - left), min(len(ex.tokens), ex.pos + right + 1)
    ids = ex.token_ids
    toks = [Tok(ex.tokens[i], ex.acts[i], i == ex.pos, html[ids[i]] if html else None, ids[i] in special)
            for i in range(lo, hi)]
    return Window(ex, toks, lo > 0, hi < len(ex.tokens))


_VOCAB_HTML: "weakref.WeakKeyDictionary[Store, dict[str, list[str]]]" = weakref.WeakKeyDictionary()


def vocab_html(store: Store, model_key: str) -> list[str]:
    """Each token's visible, HTML-escaped form, computed once per store and model (the pages' hot path)."""
    per_model = _VOCAB_HTML.setdefault(store, {})
    if model_key not in per_model:
        per_model[model_key] = [str(escape(visible(t))) for t in store.vocab(model_key)]
    return per_model[model_key]


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
        if getattr(t, "extra", ""):
            cls += f" {escape(t.extra)}"
        if t.value > 0:
            out.append(f'<span class="{cls} on" tabindex="0" style="--a:{alpha(t.value, vmax)}" '
                       f'data-tip="{text} → {fmt(t.value, 4)}">{text}</span>')
        else:
            out.append(f'<span class="{cls}" data-tip="{text} → 0">{text}</span>')
    if clipped_right:
        out.append('<span class="clip">…</span>')
    out.append("</span>")
    return Markup("".join(out))


def delta_strip_html(tokens: list[str], deltas: list[float | None], kl: list[float]) -> Markup:
    """The ablation row: each token coloured by the change of its *next* token's log-prob when the feature is
    removed (blue: the next token became likelier, red: less likely), with the exact change and the KL divergence
    of the next-token distribution on hover and focus. Scaled to the largest |change| in the row."""
    vmax = max((abs(d) for d in deltas if d is not None), default=0.0)
    out = ['<span class="strip delta-strip">']
    for t, d, k in zip(tokens, deltas, kl):
        text = escape(visible(t))
        if d is None:
            out.append(f'<span class="tok" data-tip="{text}: last token, no next token">{text}</span>')
            continue
        side = "up" if d > 0 else "down"
        a = alpha(abs(d), vmax) if d != 0 else "0"
        out.append(f'<span class="tok on d-{side}" tabindex="0" style="--a:{a}" data-delta="{d:.6g}" data-kl="{k:.6g}" '
                   f'data-tip="{text}: Δ log p(next) {d:+.4f} · KL {fmt(k, 3)}">{text}</span>')
    out.append("</span>")
    return Markup("".join(out))
