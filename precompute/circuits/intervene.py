"""Node interventions from a graph: set features to a value or a multiple (several at once) and read the new top
logits twice -- with the attention patterns frozen at the clean prompt (circuit-tracer's frozen-attention
intervention: norms and MLPs recomputed) and in the real model (nothing frozen) -- side by side.

An edit changes the MLP output(s) the feature writes to by (new - a) d at its position; downstream MLPs respond
(the real ones: the model keeps its own MLPs, the feature's edit is added on top).
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ..config import CIRCUIT, LIMITS
from ..errors import UserError
from ..models import HookedLM, hook_site
from .replacement import _STATE, _Frozen, frozen_attention
from .transcoders import TranscoderSet


@dataclass(frozen=True)
class FeatureEdit:
    layer: int
    pos: int
    feature: int
    mode: str = "scale"  # scale: a * value | set: value
    value: float = 0.0


def check_limits(n_tokens: int, edits: list[FeatureEdit], k: int) -> None:
    if not edits:
        raise UserError(f"no feature edits; give 1 to {LIMITS.max_edits}")
    if len(edits) > LIMITS.max_edits:
        raise UserError(f"{len(edits)} feature edits; at most {LIMITS.max_edits} (max_edits)")
    if n_tokens > CIRCUIT.max_tokens:
        raise UserError(f"the prompt is {n_tokens} tokens; a graph intervention allows at most {CIRCUIT.max_tokens} "
                        "(BOS included), as a graph does")
    if not 1 <= k <= LIMITS.max_top_logits:
        raise UserError(f"k {k}: top logits reported must be 1 to {LIMITS.max_top_logits} (max_top_logits)")
    for e in edits:
        if not math.isfinite(e.value) or abs(e.value) > LIMITS.max_abs_value:
            raise UserError(f"edit value {e.value}: must be a finite number from -{LIMITS.max_abs_value:g} to "
                            f"{LIMITS.max_abs_value:g} (max_abs_value)")


@contextmanager
def _added(lm: HookedLM, deltas: dict[int, torch.Tensor]):
    handles = []
    for l, d in deltas.items():
        mod, _ = hook_site(lm.layers[l], "hook_mlp_out", lm.model_type)

        def hook(_m, _a, out, d=d):
            o = out[0] if isinstance(out, tuple) else out
            o = o + d[None].to(o.dtype)
            return (o,) + tuple(out[1:]) if isinstance(out, tuple) else o
        handles.append(mod.register_forward_hook(hook))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _top(logits: torch.Tensor, k: int) -> list[tuple[int, float]]:
    p = torch.softmax(logits.double(), -1)
    v, i = p.topk(k)
    return [(int(a), float(b)) for a, b in zip(i, v)]


@torch.no_grad()
def intervene(lm: HookedLM, tset: TranscoderSet, ids: list[int], edits: list[FeatureEdit], k: int = 10) -> dict:
    """{'base', 'frozen', 'real': [(token, prob)] top k at the last position, 'deltas': {layer: (T, d)},
    'applied': [(clean activation, edited activation)] per edit, 'logits': {'base', 'frozen', 'real'} full vectors}.

    Bounded by LIMITS (edits, |value|, k) and CIRCUIT.max_tokens (the graph's prompt limit); a refusal names it."""
    check_limits(len(ids), edits, k)
    tset = tset.to(lm.dtype, lm.device)
    T = len(ids)
    x = torch.tensor([ids], device=lm.device)
    x_in: dict[int, torch.Tensor] = {}
    handles = []
    for l in tset.encoders:
        mod, _ = hook_site(lm.layers[l], tset.input_kind, lm.model_type)
        handles.append(mod.register_forward_pre_hook(
            lambda _m, a, kw, l=l: x_in.__setitem__(l, (a[0] if a else kw["hidden_states"])[0]), with_kwargs=True))
    st = _Frozen(mode="record")
    token = _STATE.set(st)
    try:
        with frozen_attention(lm):
            base = lm.model(input_ids=x, use_cache=False).logits[0, -1]
    finally:
        _STATE.reset(token)
        for h in handles:
            h.remove()
    d_model = lm.d_model
    deltas: dict[int, torch.Tensor] = {}
    applied: list[tuple[float, float]] = []  # (clean activation, edited activation) per edit
    for e in edits:
        if e.layer not in tset.encoders:
            raise UserError(f"no transcoder at layer {e.layer}; layers with features: {', '.join(map(str, tset.layers))}")
        enc = tset.encoders[e.layer]
        if not 0 <= e.feature < enc.d_features or not 0 <= e.pos < T:
            raise UserError(f"feature {e.feature} at position {e.pos}: layer {e.layer} has features 0..{enc.d_features - 1}, "
                            f"the prompt positions 0..{T - 1}")
        if e.mode not in ("scale", "set"):
            raise UserError(f"edit mode {e.mode!r}; valid: scale, set")
        a = float(enc.encode(x_in[e.layer])[e.pos, e.feature])
        new = a * e.value if e.mode == "scale" else e.value
        applied.append((a, new))
        for o in enc.out_layers:
            deltas.setdefault(o, torch.zeros(T, d_model, dtype=lm.dtype, device=lm.device))
            deltas[o][e.pos] += (new - a) * enc.W_dec[e.feature, o - e.layer]
    with _added(lm, deltas):
        real = lm.model(input_ids=x, use_cache=False).logits[0, -1]
        st.mode = "replay"
        token = _STATE.set(st)
        try:
            with frozen_attention(lm):
                frozen = lm.model(input_ids=x, use_cache=False).logits[0, -1]
        finally:
            _STATE.reset(token)
    return {"base": _top(base, k), "frozen": _top(frozen, k), "real": _top(real, k), "deltas": deltas,
            "applied": applied,
            "logits": {"base": base.double().cpu(), "frozen": frozen.double().cpu(), "real": real.double().cpu()}}
