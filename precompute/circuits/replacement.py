"""The local replacement model of one prompt, on the Hugging Face modules themselves (forward hooks only).

One real forward pass ("record") stores every attention pattern, every norm's scale (1/σ or 1/rms per position)
and every MLP's input and output. "Replay" passes then run the same modules with

  * attention patterns replayed from the record (the values still flow: attention is linear in its input),
  * norm scales replayed (the norms become affine maps),
  * every MLP output replaced by `skip(x_in) + const`, const = recorded output - skip(recorded x_in): the
    transcoder features and error terms are constants (nodes of the graph), only a skip connection stays live,

so a replay is an exactly linear function of what is added to the embeddings and to the MLP outputs (`deltas`),
and with no deltas it reproduces the model's own activations and logits. Attribution edges are gradients of
this linear map (backward passes through the HF modules); the tests check them against finite differences.

A replay skips what it does not need: the MLP modules are not run (their output is replaced anyway; they return
their recorded output) and the forward stops at the final norm (no unembedding; logits come from h_final).
"""

from __future__ import annotations

import contextvars
import sys
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from ..errors import SetupError
from ..models import HookedLM, final_norm, hook_site
from .transcoders import TranscoderSet

ATTN_NAME = "saescope_frozen"
_STATE: contextvars.ContextVar["_Frozen | None"] = contextvars.ContextVar("saescope_frozen_state", default=None)


@dataclass
class _Frozen:
    mode: str = "record"  # record | replay
    attn: dict[int, torch.Tensor] = field(default_factory=dict)  # id(attention module) -> (1, H, T, T)


def _eager_for(module: nn.Module):
    fn = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if fn is None:
        raise SetupError(f"{type(module).__name__}: no eager_attention_forward in its modeling module; "
                         "attention patterns cannot be frozen for this architecture")
    return fn


def _frozen_attention(module, query, key, value, attention_mask, **kwargs):
    st = _STATE.get()
    if st is None or st.mode == "record" or id(module) not in st.attn:
        out, w = _eager_for(module)(module, query, key, value, attention_mask, **kwargs)
        if st is not None and st.mode == "record":
            st.attn[id(module)] = w.detach()
        return out, w
    w = st.attn[id(module)]
    n_rep = w.shape[1] // value.shape[1]
    v = value.repeat_interleave(n_rep, dim=1) if n_rep > 1 else value
    return torch.matmul(w.to(v.dtype), v).transpose(1, 2).contiguous(), w


def _register() -> None:
    from transformers import AttentionInterface, AttentionMaskInterface
    from transformers.masking_utils import eager_mask

    AttentionInterface.register(ATTN_NAME, _frozen_attention)
    AttentionMaskInterface.register(ATTN_NAME, eager_mask)


@contextmanager
def frozen_attention(lm: HookedLM) -> Iterator[None]:
    """Route the model's attention through `_frozen_attention` (eager maths) for the duration."""
    _register()
    old = lm.model.config._attn_implementation
    lm.model.set_attn_implementation(ATTN_NAME)
    try:
        yield
    finally:
        lm.model.set_attn_implementation(old)


# ---------------------------------------------------------------- norms with replayable scales
def _norm_kind(mod: nn.Module) -> str | None:
    if isinstance(mod, nn.LayerNorm):
        return "layer_norm"
    name = type(mod).__name__
    if "RMSNorm" in name and getattr(mod, "weight", None) is not None:
        return "gemma_rms" if name.startswith("Gemma") else "rms"
    return None


def _norm_apply(mod: nn.Module, kind: str, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    if kind == "layer_norm":
        y = (x - x.mean(-1, keepdim=True)) * s
        if mod.weight is not None:
            y = y * mod.weight
        return y + mod.bias if mod.bias is not None else y
    if kind == "gemma_rms":
        return x * s * (1.0 + mod.weight)
    return mod.weight * (x * s)


def _norm_scale(mod: nn.Module, kind: str, x: torch.Tensor) -> torch.Tensor:
    eps = getattr(mod, "variance_epsilon", getattr(mod, "eps", 1e-6))
    if kind == "layer_norm":
        return torch.rsqrt(x.var(-1, keepdim=True, unbiased=False) + eps)
    return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


class _StopReplay(Exception):
    """Raised after the final norm of a replay: the unembedding is not needed (logits come from h_final)."""


@dataclass
class Replay:
    """What a replay pass computed, as live tensors (differentiable in the deltas)."""

    x_in: dict[int, torch.Tensor]  # layer -> (T, d) transcoder input at that layer
    h_final: torch.Tensor  # (T, d) after the final norm
    W_U: torch.Tensor
    b_U: torch.Tensor | None

    @property
    def logits(self) -> torch.Tensor:
        """(T, V) = h_final @ W_U (+ bias), before any soft-capping (computed when asked)."""
        return self.h_final @ self.W_U + (self.b_U if self.b_U is not None else 0)


class ReplacementModel:
    """The frozen replacement of `lm` on one prompt `ids` with transcoders `tset` (float tensors in lm's dtype)."""

    def __init__(self, lm: HookedLM, tset: TranscoderSet, ids: list[int], zero_bos: bool = True):
        self.lm, self.ids = lm, list(ids)
        self.dtype = lm.dtype
        self.tset = tset.to(self.dtype, lm.device)
        self.n_layers, self.T = lm.n_layers, len(self.ids)
        self.state = _Frozen()
        self.scales: dict[int, torch.Tensor] = {}
        self._norms = self._find_norms()
        self._sites = [(hook_site(layer, self.tset.input_kind, lm.model_type)[0],
                        hook_site(layer, "hook_mlp_out", lm.model_type)[0]) for layer in lm.layers]
        self._mlps = [hook_site(layer, "hook_mlp_in", lm.model_type)[0] for layer in lm.layers]  # the MLP modules
        W_U = lm.model.get_output_embeddings()
        self.W_U = W_U.weight.detach().T  # (d, V)
        self.b_U = None if getattr(W_U, "bias", None) is None else W_U.bias.detach()
        self._record()
        self.zero_bos = zero_bos
        self._features()

    # -------------------------------------------------------------- record
    def _find_norms(self) -> list[tuple[nn.Module, str]]:
        found = []
        for layer in self.lm.layers:
            for _, child in layer.named_children():
                kind = _norm_kind(child)
                if kind:
                    found.append((child, kind))
        fn = final_norm(self.lm.model)
        if fn is None or _norm_kind(fn) is None:
            raise SetupError(f"{type(self.lm.model).__name__}: no supported final norm (LayerNorm or RMSNorm)")
        found.append((fn, _norm_kind(fn)))
        self._final = fn
        return found

    @contextmanager
    def _hooks(self, mode: str, deltas: dict | None = None, live: dict | None = None) -> Iterator[None]:
        handles = []
        deltas = deltas or {}
        st = self.state
        st.mode = mode

        def norm_hook(mod, args, out, kind):
            x = args[0]
            if mode == "record":
                s = _norm_scale(mod, kind, x).detach()
                mine = _norm_apply(mod, kind, x, s)
                if not torch.allclose(mine, out, rtol=1e-3, atol=1e-5 * float(out.abs().max()) + 1e-7):
                    raise SetupError(f"{type(mod).__name__}: its output is not a supported LayerNorm/RMSNorm "
                                     "(cannot freeze its scale)")
                self.scales[id(mod)] = s
                return out
            return _norm_apply(mod, kind, x, self.scales[id(mod)])

        for mod, kind in self._norms:
            handles.append(mod.register_forward_hook(lambda m, a, o, kind=kind: norm_hook(m, a, o, kind)))

        def pre0(_mod, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            if mode == "record":
                self.embed = h[0].detach()
            if "embed" in deltas:
                h = h + deltas["embed"][None]
            if args:
                return (h,) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": h}
        handles.append(self.lm.layers[0].register_forward_pre_hook(pre0, with_kwargs=True))

        for l, (inp, outm) in enumerate(self._sites):
            def in_hook(_mod, args, kwargs, l=l):
                x = args[0] if args else kwargs.get("hidden_states", kwargs.get("x"))
                if mode == "record":
                    self.x_in[l] = x[0].detach()
                elif live is not None:
                    live[l] = x[0]
            handles.append(inp.register_forward_pre_hook(in_hook, with_kwargs=True))

            def out_hook(_mod, args, out, l=l):
                o = out[0] if isinstance(out, tuple) else out
                if mode == "record":
                    self.mlp_out[l] = o[0].detach()
                    return None
                x = live[l] if live is not None and l in live else args[0][0]
                new = self.const[l] + (self.tset.skip(l, x) if l in self.tset.W_skip else 0)
                if l in deltas:
                    new = new + deltas[l]
                new = new[None].to(o.dtype)
                return (new,) + tuple(out[1:]) if isinstance(out, tuple) else new
            handles.append(outm.register_forward_hook(out_hook))

        patched = []
        for l, mlp in enumerate(self._mlps):
            if mode == "record":
                handles.append(mlp.register_forward_hook(
                    lambda _m, _a, out, l=l: self._mlp_raw.__setitem__(l, _detached(out))))
            else:  # the output is replaced by out_hook: the MLP itself need not run
                patched.append((mlp, mlp.__dict__.get("forward")))
                mlp.forward = lambda *_a, l=l, **_k: self._mlp_raw[l]

        def final_hook(_mod, _a, out):
            if live is not None:
                live["final"] = out[0]
            if mode == "replay":
                raise _StopReplay
        handles.append(self._final.register_forward_hook(final_hook))
        token = _STATE.set(st)
        try:
            with frozen_attention(self.lm):
                yield
        finally:
            _STATE.reset(token)
            for h in handles:
                h.remove()
            for mlp, old in patched:
                if old is None:
                    del mlp.forward
                else:
                    mlp.forward = old

    def _forward(self):
        ids = torch.tensor([self.ids], device=self.lm.device)
        try:
            return self.lm.model(input_ids=ids, use_cache=False)
        except _StopReplay:
            return None

    @torch.no_grad()
    def _record(self) -> None:
        self.x_in: dict[int, torch.Tensor] = {}
        self.mlp_out: dict[int, torch.Tensor] = {}
        self._mlp_raw: dict[int, object] = {}  # what each MLP module returned (replays return it without running)
        with self._hooks("record"):
            self.real_logits = self._forward().logits[0].detach()  # (T, V)
        self.const = {l: self.mlp_out[l] - (self.tset.skip(l, self.x_in[l]) if l in self.tset.W_skip else 0)
                      for l in range(self.n_layers)}

    def _features(self) -> None:
        """Feature activations (BOS position zeroed), reconstructions and error vectors per layer."""
        self.acts: dict[int, torch.Tensor] = {}
        with torch.no_grad():
            for l, enc in self.tset.encoders.items():
                a = enc.encode(self.x_in[l])
                if self.zero_bos:
                    a[0] = 0
                self.acts[l] = a
            self.error: dict[int, torch.Tensor] = {}
            for l in range(self.n_layers):
                rec = self.tset.reconstruction(self.acts, self.x_in, l)
                err = self.mlp_out[l] - rec if rec is not None else self.mlp_out[l].clone()
                if self.zero_bos:
                    err[0] = 0
                self.error[l] = err

    # -------------------------------------------------------------- replay
    def replay(self, deltas: dict | None = None) -> Replay:
        """A replay pass: deltas = {'embed': (T, d), layer: (T, d) added to that MLP's output}."""
        live: dict = {}
        params = [p for p in self.lm.model.parameters() if p.requires_grad]
        for p in params:  # gradients flow to the deltas only
            p.requires_grad_(False)
        try:
            with self._hooks("replay", deltas, live):
                self._forward()
        finally:
            for p in params:
                p.requires_grad_(True)
        return Replay({l: live[l] for l in range(self.n_layers)}, live["final"], self.W_U, self.b_U)

    def demeaned_unembed(self, token: int | list[int]) -> torch.Tensor:
        """W_U[:, token] minus the mean column: (d,), or (d, n) for a list of tokens."""
        if getattr(self, "_W_U_mean", None) is None:
            self._W_U_mean = self.W_U.mean(dim=1)
        if isinstance(token, list):
            return self.W_U[:, token] - self._W_U_mean[:, None]
        return self.W_U[:, token] - self._W_U_mean


def _detached(out):
    if isinstance(out, torch.Tensor):
        return out.detach()
    if isinstance(out, tuple):
        return tuple(_detached(o) for o in out)
    return out
