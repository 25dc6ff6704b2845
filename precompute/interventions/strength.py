"""Suggested steering strengths per SAE feature and method, from the feature's stored max activation, the norm of its
decoder row and the residual norm at the SAE's hook on the prompt (measured, stated with the suggestion).

With h the activation at the hook, v = W_dec[f], |h| the median norm of h over the prompt's positions (the first
position is left out when there are others: it is an attention sink with an outlying norm in most models) and
p the median of h.u (u = v/|v|):

    add          c * |v| is the norm added: gentle = max_act (the feature written as strongly as it ever fires),
                 strong = |h| / 2 / |v|, extreme = 2 |h| / |v|             (with normalize: all times |v|)
    orthogonal   c scales the component on v (1 = no change): gentle = 2, strong = c with |c p| = |h| / 2,
                 extreme = c with |c p| = 2 |h|                            (at least 2 / 4 / 8)
    cap          the projection on u is held at most c: gentle = p (the upper half of positions capped),
                 strong = 0 (the feature's direction removed where positive), extreme = -max_act |v| (pushed against)

The slider spans [gentle / 4, extreme * 2] (cap: [extreme * 2, |p| + max_act |v|]), clipped to LIMITS.max_abs_value.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import LIMITS
from ..models import HookedLM
from ..saes import SAE
from .edits import prompt_ids
from .splice import hook_of

PRESETS = ("gentle", "strong", "extreme")


@dataclass(frozen=True)
class FeatureScale:
    feature: int
    decoder_norm: float  # |W_dec[f]|
    projection: float  # median over the prompt of h . W_dec[f] / |W_dec[f]|


@dataclass(frozen=True)
class Scale:
    resid_norm: float  # median |h| at the hook over the prompt (first position left out when there are others)
    features: list[FeatureScale]


@dataclass(frozen=True)
class Suggestion:
    mode: str
    normalize: bool
    gentle: float
    strong: float
    extreme: float
    lo: float  # the slider's range
    hi: float
    why: str  # how the numbers were derived, in one sentence

    def preset(self, name: str) -> float:
        return {"gentle": self.gentle, "strong": self.strong, "extreme": self.extreme}[name]


@torch.no_grad()
def measure_scale(lm: HookedLM, sae: SAE, ids: Sequence[int] | torch.Tensor, features: Sequence[int],
                  hook: str | None = None) -> Scale:
    """One forward pass up to the hook on the prompt: the residual norm and each feature's projection there."""
    hook = hook_of(lm, sae, hook)
    t = prompt_ids(lm, ids)
    h = lm.activations(t[None], hook)[0].to(sae.W_dec.device)  # (T, d_in) float32
    if h.shape[0] > 1:
        h = h[1:]
    feats = list(dict.fromkeys(int(f) for f in features))
    W = sae.W_dec.detach().float()
    out = []
    for f in feats:
        n = float(W[f].norm())
        p = float((h @ (W[f] / n)).median()) if n > 0 else 0.0
        out.append(FeatureScale(f, n, p))
    return Scale(float(h.norm(dim=-1).median()), out)


def _clip(v: float) -> float:
    b = LIMITS.max_abs_value
    return float(max(-b, min(b, v)))


def suggest(mode: str, normalize: bool, max_act: float | None, fs: FeatureScale, resid_norm: float) -> Suggestion:
    """The presets and slider range for one feature and method (see the module docstring)."""
    dn, p, h = max(fs.decoder_norm, 1e-12), fs.projection, max(resid_norm, 1e-12)
    a = max(float(max_act or 0.0), 0.0)
    if mode == "add":
        unit = 1.0 if normalize else dn  # the norm one unit of c adds
        strong, extreme = 0.5 * h / unit, 2.0 * h / unit
        gentle = a * dn / unit if a > 0 else strong / 4
        gentle = min(gentle, strong / 2)
        why = (f"|h| = {h:.3g} at the hook (median over the prompt), |W_dec[f]| = {dn:.3g}, stored max activation "
               f"{a:.3g}: gentle writes the feature as strongly as it ever fires, strong adds half of |h|, extreme "
               "twice |h|")
        lo, hi = gentle / 4, extreme * 2
    elif mode == "orthogonal":
        base = abs(p) if abs(p) > 1e-6 else h / 8
        strong, extreme = max(4.0, 0.5 * h / base), max(8.0, 2.0 * h / base)
        gentle = 2.0
        why = (f"the component of h on the feature's direction is {p:.3g} (median), |h| = {h:.3g}: strong scales "
               "it to half of |h|, extreme to twice |h| (1 changes nothing, 0 removes it, negative flips it)")
        lo, hi = 1.0, extreme * 2
    else:
        gentle, strong, extreme = p, 0.0, -a * dn if a > 0 else -h / 4
        gentle = max(gentle, 0.0)
        why = (f"the projection of h on the feature's direction is {p:.3g} (median): gentle caps the upper half of "
               f"positions there, strong at 0, extreme at -max activation x |W_dec[f]| = {extreme:.3g} (a cap "
               "above every projection changes nothing)")
        lo, hi = extreme * 2, abs(p) + a * dn
    return Suggestion(mode, normalize, _clip(gentle), _clip(strong), _clip(extreme), _clip(min(lo, hi)),
                      _clip(max(lo, hi)), why)
