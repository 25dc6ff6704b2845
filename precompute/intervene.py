"""Interventions through an SAE spliced into the model: steering, ablation on text, and attribution.

The splice
----------
At the SAE's hook the activation x (raw model space) is replaced by

    x_new = unnorm(decode(z_edit)) + (x - unnorm(decode(z))),     z = encode(x)

i.e. the SAE's reconstruction of the edited latents plus the SAE's error term, so the rest of the model (all
later layers, the final norm, the unembedding and Gemma-2's logit soft-capping: the model's own forward runs to
the logits) sees the edited activation. `unnorm` inverts the SAE's per-token input normalisation with the
statistics of the ORIGINAL x: if normalize(x) == (x - shift) / scale then unnorm(y) = y * scale + shift, with

    none                   scale = 1,                 shift = 0
    constant_norm_rescale  scale = |x| / sqrt(d_in),  shift = 0
    layer_norm             scale = std(x) + 1e-5,     shift = mean(x)

Because decode is affine and b_dec and shift cancel, the splice is applied as the exact equivalent

    x_new = x + scale * (z_edit - z) @ W_dec

so that with no edit (or where an edit changes nothing) x_new is bit-for-bit x. The literal reconstruction-plus-
error form is what attribution differentiates through (`forward_from_latents`); both are tested to agree.

Edits (`Edit`), applied in the order given, at all positions (positions=None) or at chosen absolute positions:
    ablate  z_f := 0                       (latent space; un-normalised as above)
    clamp   z_f := value                   (latent space; un-normalised as above)
    add     x   += value * W_dec[f]        (raw space, like Neuronpedia's SIMPLE_ADDITIVE steering, which adds
                                            strength * decoder row to the hooked activation at every position;
                                            for an SAE without input normalisation this is exactly z_f += value)

The hook is installed on the same modules HookedLM reads (precompute.models) and fires only in the thread that
installed it, so a worker serving other requests from other threads is not affected.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Literal

import torch

from .models import HookedLM, _StopForward, hook_site, parse_hook
from .saes import SAE
from .errors import UserError

log = logging.getLogger(__name__)

# ---- limits (the worker and CLI show these; every refusal names the limit) ----
MAX_EDITS = 16  # edits (feature interventions) in one request
MAX_ABS_VALUE = 1000.0  # |clamp value| and |steering coefficient|, in SAE activation units
MAX_NEW_TOKENS = 256  # new tokens in one steered generation
MAX_PROMPT_TOKENS = 1024  # tokens in a prompt or text
MAX_TOP_FEATURES = 100  # features listed by attribution
MAX_VERIFY = 20  # features whose true ablation effect attribution measures
MAX_TEMPERATURE = 10.0
EDIT_MODES = ("ablate", "clamp", "add")

EditMode = Literal["ablate", "clamp", "add"]


@dataclass(frozen=True)
class Edit:
    """One intervention on one SAE feature. positions: absolute token positions (0 = first prompt token); None = all."""

    feature: int
    mode: EditMode = "ablate"
    value: float = 0.0
    positions: tuple[int, ...] | None = None


# ------------------------------------------------------------------ validation
def _check_int(name: str, v: object, lo: int, hi: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int):
        try:
            ok = not isinstance(v, bool) and float(v) == int(v)  # numpy ints, 3.0
        except (TypeError, ValueError, OverflowError):
            ok = False
        if not ok:
            raise UserError(f"{name} must be an integer in {lo}..{hi}; got {v!r}")
        v = int(v)  # type: ignore[arg-type]
    if not lo <= v <= hi:
        raise UserError(f"{name} {v} is out of range; allowed: {lo}..{hi}")
    return v


def validate_ids(ids: Sequence[int] | torch.Tensor, vocab_size: int, limit: int = MAX_PROMPT_TOKENS) -> torch.Tensor:
    """Token ids as a 1-D long tensor, or ValueError naming what is wrong (empty, too long, outside the vocabulary)."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() > 2 or (ids.dim() == 2 and ids.shape[0] != 1):
            raise UserError(f"expected one sequence of token ids; got a tensor of shape {tuple(ids.shape)}")
        t = ids.detach().cpu().reshape(-1)
    else:
        try:
            t = torch.tensor(list(ids))
        except (TypeError, ValueError, RuntimeError):
            raise UserError("token ids must be a flat list of integers") from None
    if t.numel() == 0:
        raise UserError("the prompt is empty; give at least 1 token")
    if t.numel() > limit:
        raise UserError(f"the prompt has {t.numel()} tokens; the limit is {limit}")
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool or t.dim() != 1:
        raise UserError("token ids must be a flat list of integers")
    t = t.long()
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= vocab_size:
        bad = lo if lo < 0 else hi
        raise UserError(f"token id {bad} is outside the vocabulary; allowed: 0..{vocab_size - 1}")
    return t


def validate_edits(edits: Sequence[Edit], d_sae: int, seq_len: int, *, allow_empty: bool = False) -> tuple[Edit, ...]:
    """Checked edits (positions as sorted tuples) or ValueError saying which edit is wrong and what is allowed."""
    edits = tuple(edits)
    if not edits and not allow_empty:
        raise UserError("no edits given; give at least 1 (feature, mode, value)")
    if len(edits) > MAX_EDITS:
        raise UserError(f"{len(edits)} edits given; the limit is {MAX_EDITS}")
    out = []
    for i, e in enumerate(edits):
        if not isinstance(e, Edit):
            raise UserError(f"edit {i} is a {type(e).__name__}; expected an Edit")
        f = _check_int(f"edit {i}: feature", e.feature, 0, d_sae - 1)
        if e.mode not in EDIT_MODES:
            raise UserError(f"edit {i}: unknown mode {e.mode!r}; valid: {', '.join(EDIT_MODES)}")
        try:
            v = float(e.value)
        except (TypeError, ValueError):
            raise UserError(f"edit {i}: value must be a number; got {e.value!r}") from None
        if not math.isfinite(v):
            raise UserError(f"edit {i}: value {v} is not finite; allowed: -{MAX_ABS_VALUE:g}..{MAX_ABS_VALUE:g}")
        if abs(v) > MAX_ABS_VALUE:
            raise UserError(f"edit {i}: value {v:g} is too large; allowed: -{MAX_ABS_VALUE:g}..{MAX_ABS_VALUE:g}")
        pos = None
        if e.positions is not None:
            if len(e.positions) == 0:
                raise UserError(f"edit {i}: positions is empty; give positions, or none at all for every position")
            pos = tuple(sorted({_check_int(f"edit {i}: position", p, 0, seq_len - 1) for p in e.positions}))
        out.append(Edit(f, e.mode, 0.0 if e.mode == "ablate" else v, pos))
    return tuple(out)


def _hook_of(lm: HookedLM, sae: SAE, hook: str | None) -> str:
    hook = hook or sae.cfg.hook_name
    if not hook:
        raise UserError("the SAE names no hook (cfg.hook_name is empty); pass hook='blocks.<L>.<kind>'")
    width = lm.hook_width(hook)
    if width != sae.cfg.d_in:
        raise UserError(f"the SAE reads {sae.cfg.d_in}-wide activations but {hook} of {lm.name} is {width} wide")
    return hook


def _vocab(lm: HookedLM) -> int:
    return int(lm.model.get_input_embeddings().weight.shape[0])


def _context(lm: HookedLM) -> int:
    """Longest sequence the model takes: its position limit, capped by MAX_PROMPT_TOKENS + MAX_NEW_TOKENS."""
    cfg = lm.model.config
    n = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return min(int(n), MAX_PROMPT_TOKENS + MAX_NEW_TOKENS) if n else MAX_PROMPT_TOKENS + MAX_NEW_TOKENS


def _prompt(lm: HookedLM, ids: Sequence[int] | torch.Tensor) -> torch.Tensor:
    return validate_ids(ids, _vocab(lm), min(MAX_PROMPT_TOKENS, _context(lm)))


# ------------------------------------------------------------------ normalisation
def norm_stats(sae: SAE, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, shift), each (..., 1), such that sae.normalize(x) == (x - shift) / scale; unnorm(y) = y*scale + shift."""
    mode = sae.cfg.normalize_activations
    if mode == "constant_norm_rescale":
        return x.norm(dim=-1, keepdim=True) / math.sqrt(sae.cfg.d_in), torch.zeros_like(x[..., :1])
    if mode == "layer_norm":
        return x.std(dim=-1, keepdim=True) + 1e-5, x.mean(dim=-1, keepdim=True)
    return torch.ones_like(x[..., :1]), torch.zeros_like(x[..., :1])


# ------------------------------------------------------------------ hook installation
@contextmanager
def _hooked(lm: HookedLM, hook: str, fn: Callable[[torch.Tensor], torch.Tensor]) -> Iterator[None]:
    """Replace the activation at `hook` by fn(activation) in this thread's forward passes."""
    spec = parse_hook(hook, lm.n_layers)
    owner = threading.get_ident()
    target, where = hook_site(lm.layers[spec.layer], spec.kind, lm.model_type)

    if where == "pre":
        def pre_hook(_mod, args, kwargs):
            if threading.get_ident() != owner:
                return None
            if args:
                return (fn(args[0]),) + tuple(args[1:]), kwargs
            return args, {**kwargs, "hidden_states": fn(kwargs["hidden_states"])}
        handle = target.register_forward_pre_hook(pre_hook, with_kwargs=True)
    else:
        def post_hook(_mod, _args, out):
            if threading.get_ident() != owner:
                return None
            if isinstance(out, tuple):
                return (fn(out[0]),) + out[1:]
            return fn(out)
        handle = target.register_forward_hook(post_hook)
    try:
        yield
    finally:
        handle.remove()


class _EditSplice:
    """The hook body: x -> x + scale * (z_edit - z) @ W_dec (+ raw additions), row by row; records watched latents."""

    def __init__(self, sae: SAE, row_edits: Sequence[Sequence[Edit]], watch: Sequence[int] = ()):
        self.sae, self.row_edits, self.watch = sae, [tuple(r) for r in row_edits], list(watch)
        self.offset = 0  # absolute position of the first token of the next forward call (KV-cache steps)
        self.records: list[torch.Tensor] = []  # (B, T_call, n_watch) per forward call, pre-edit latents
        self.stop = False  # raise _StopForward after recording (a last step that only needs the latents)
        self.need_z = bool(self.watch) or any(e.mode != "add" for r in self.row_edits for e in r)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # (B, T, d_in) -> (B, T, d_in)
        sae = self.sae
        B, T, _ = x.shape
        if len(self.row_edits) not in (1, B):
            raise RuntimeError(f"splice has edits for {len(self.row_edits)} rows but the batch has {B}")
        W = sae.W_dec
        xs = x.to(device=W.device, dtype=W.dtype)  # (B, T, d_in)
        z = sae.encode(xs) if self.need_z else None  # (B, T, d_sae)
        if self.watch:
            self.records.append(z[..., self.watch].detach().float().cpu())
        if self.stop:
            raise _StopForward
        if not any(self.row_edits):
            return x
        scale, _ = norm_stats(sae, xs)  # (B, T, 1)
        pos = torch.arange(self.offset, self.offset + T, device=W.device)  # (T,)
        out = x.clone()
        for b in range(B):
            edits = self.row_edits[b if len(self.row_edits) == B else 0]
            if not edits:
                continue
            delta = torch.zeros_like(xs[b])  # (T, d_in)
            cur: dict[int, torch.Tensor] = {}  # feature -> its latent after the edits so far, (T,)
            for e in edits:
                mask = torch.ones(T, dtype=torch.bool, device=W.device) if e.positions is None else \
                    torch.isin(pos, torch.tensor(e.positions, device=W.device))  # (T,)
                if not mask.any():
                    continue
                if e.mode == "add":
                    delta += (mask.to(W.dtype) * e.value)[:, None] * W[e.feature]
                    continue
                old = cur.get(e.feature, z[b, :, e.feature])  # (T,)
                new = torch.where(mask, torch.full_like(old, e.value), old)
                delta += ((new - old) * scale[b, :, 0])[:, None] * W[e.feature]
                cur[e.feature] = new
            out[b] = (xs[b] + delta).to(device=x.device, dtype=x.dtype)
        return out


@contextmanager
def splice(lm: HookedLM, sae: SAE, row_edits: Sequence[Sequence[Edit]], watch: Sequence[int] = (),
           hook: str | None = None) -> Iterator[_EditSplice]:
    """Splice the SAE in at its hook for forward passes in this block; row_edits: one edit list per batch row
    (or a single list for every row). Yields the splice state (.offset for KV-cache steps, .records)."""
    state = _EditSplice(sae, row_edits, watch)
    with _hooked(lm, _hook_of(lm, sae, hook), state):
        yield state


@torch.no_grad()
def run_with_edits(lm: HookedLM, sae: SAE, ids: torch.Tensor, row_edits: Sequence[Sequence[Edit]],
                   hook: str | None = None, logits_to_keep: int = 0) -> torch.Tensor:
    """Logits of the model with the SAE spliced in: ids (B, T), one edit list per row -> (B, T', vocab) float32.

    Edits are used as given (call validate_edits first for untrusted input)."""
    with splice(lm, sae, row_edits, hook=hook):
        out = lm.model(input_ids=ids.to(lm.device), use_cache=False, logits_to_keep=logits_to_keep)
    return out.logits.float()


def spliced_logits(lm: HookedLM, sae: SAE, ids: Sequence[int] | torch.Tensor, edits: Sequence[Edit] = (),
                   hook: str | None = None) -> torch.Tensor:
    """Validated single-text form: ids (T,) and edits -> logits (T, vocab) float32."""
    t = _prompt(lm, ids)
    edits = validate_edits(edits, sae.cfg.d_sae, t.numel(), allow_empty=True)
    return run_with_edits(lm, sae, t[None], [edits], hook)[0]


# ------------------------------------------------------------------ reconstruction + error (attribution path)
class _LatentSplice:
    """The hook body: x -> unnorm(decode(z)) + err with z = encode(x) a leaf (requires grad) and err detached."""

    def __init__(self, sae: SAE, z: torch.Tensor | None = None, grad: bool = True):
        self.sae, self.z_given, self.grad = sae, z, grad
        self.z: torch.Tensor | None = None  # (B, T, d_sae) leaf
        self.err: torch.Tensor | None = None  # (B, T, d_in) leaf (requires grad too, for the error attribution)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        sae = self.sae
        xs = x.detach().to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)  # (B, T, d_in)
        scale, shift = norm_stats(sae, xs)
        with torch.no_grad():
            z0 = sae.encode(xs)  # (B, T, d_sae)
            err = xs - (sae.decode(z0) * scale + shift)
        z = (z0 if self.z_given is None else self.z_given.to(z0)).clone()
        self.z, self.err = z.requires_grad_(self.grad), err.requires_grad_(self.grad)
        if self.grad:
            # The layers before the hook ran without a graph (no_grad); record one from here on. Grad mode is
            # thread-local and the caller's no_grad block restores it when the forward pass returns.
            torch.set_grad_enabled(True)
        return (sae.decode(self.z) * scale + shift + self.err).to(x.dtype)


def forward_from_latents(lm: HookedLM, sae: SAE, ids: torch.Tensor, hook: str | None = None,
                         logits_to_keep: int = 0, grad: bool = False,
                         z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run with x replaced by unnorm(decode(z)) + (x - unnorm(decode(encode(x)))): ids (B, T) ->
    (logits (B, T', vocab), z (B, T, d_sae), err (B, T, d_in)). z defaults to encode(x); with grad=True, z and err
    are leaves with requires_grad, so d(logits)/dz holds the error term fixed."""
    state = _LatentSplice(sae, z, grad)
    with _hooked(lm, _hook_of(lm, sae, hook), state), torch.no_grad():
        out = lm.model(input_ids=ids.to(lm.device), use_cache=False, logits_to_keep=logits_to_keep)
    assert state.z is not None and state.err is not None, "the splice hook did not fire"
    if grad and not out.logits.requires_grad:  # a module after the hook switched grad mode off: record everything
        log.warning("%s dropped the gradient after the hook; recomputing with a full graph", type(lm.model).__name__)
        state = _LatentSplice(sae, z, grad)
        with _hooked(lm, _hook_of(lm, sae, hook), state), torch.enable_grad():
            out = lm.model(input_ids=ids.to(lm.device), use_cache=False, logits_to_keep=logits_to_keep)
    return out.logits, state.z, state.err


# ------------------------------------------------------------------ ablation on text
@dataclass
class AblationResult:
    """Per token position t (aligned with the input tokens, the position that makes the prediction):
    delta_logprob[t] = log p_edited(ids[t+1]) - log p_clean(ids[t+1])   (None at the last position)
    kl[t]            = KL(p_clean || p_edited) of the next-token distribution at t (nats)."""

    ids: list[int]
    edits: list[Edit]
    clean_logprob: list[float | None]
    delta_logprob: list[float | None]
    kl: list[float]
    feature_acts: dict[int, list[float]]  # clean activation of each edited feature per position


def ablation_effects(lm: HookedLM, sae: SAE, ids: Sequence[int] | torch.Tensor, edits: Sequence[Edit],
                     hook: str | None = None) -> AblationResult:
    """Effect of the edits (typically one ablation) on each next-token prediction: one batch of 2 (clean, edited)."""
    t = _prompt(lm, ids)
    edits = validate_edits(edits, sae.cfg.d_sae, t.numel())
    watch = list(dict.fromkeys(e.feature for e in edits))
    with torch.no_grad(), splice(lm, sae, [(), edits], watch, hook) as s:
        logits = lm.model(input_ids=t[None].expand(2, -1).to(lm.device), use_cache=False).logits.float()
    lp = torch.log_softmax(logits, dim=-1).cpu()  # (2, T, vocab)
    kl = (lp[0].exp() * (lp[0] - lp[1])).sum(-1).clamp_min(0)  # (T,)
    nxt = t[1:]
    clean = lp[0, :-1].gather(-1, nxt[:, None])[:, 0]  # (T-1,)
    edited = lp[1, :-1].gather(-1, nxt[:, None])[:, 0]
    acts = s.records[0][0]  # (T, n_watch)
    return AblationResult(
        ids=t.tolist(), edits=list(edits),
        clean_logprob=clean.tolist() + [None], delta_logprob=(edited - clean).tolist() + [None],
        kl=kl.tolist(), feature_acts={f: acts[:, i].tolist() for i, f in enumerate(watch)})


# ------------------------------------------------------------------ attribution
@dataclass
class FeatureAttribution:
    feature: int
    attribution: float  # sum over positions t <= p of z[t, f] * d logp(target) / d z[t, f]
    best_position: int  # the position with the largest |z * grad|
    best_attribution: float
    activation: float  # z at best_position
    ablation_estimate: float  # linear estimate of ablating f at every position: -attribution
    ablation_true: float | None = None  # measured: logp(target | f ablated at every position <= p) - clean


@dataclass
class AttributionResult:
    position: int
    target: int
    target_logprob: float  # clean log-prob of the target at `position`
    features: list[FeatureAttribution]  # top by |attribution|
    error_attribution: float  # sum over positions of err . d logp / d err (the part the SAE does not explain)
    n_active: int  # (position, feature) pairs with z != 0
    seconds: dict[str, float] = field(default_factory=dict)


@dataclass
class LatentGradients:
    """For a prompt cut after `position`: the latents, the gradient of the target's log-prob w.r.t. them (error
    term fixed), and the same for the error term. Row t is token position t (0..position)."""

    position: int
    target: int
    logprob: float  # log p(target) at position (spliced forward == clean forward to fp32 rounding)
    z: torch.Tensor  # (position+1, d_sae)
    grad_z: torch.Tensor  # (position+1, d_sae)
    err: torch.Tensor  # (position+1, d_in)
    grad_err: torch.Tensor  # (position+1, d_in)

    @property
    def attribution(self) -> torch.Tensor:  # (position+1, d_sae): z * d logp / dz
        return self.z * self.grad_z


def latent_gradients(lm: HookedLM, sae: SAE, ids: Sequence[int] | torch.Tensor, position: int | None = None,
                     target: int | None = None, hook: str | None = None) -> LatentGradients:
    """One forward (graph recorded only after the hook) and one backward pass for all features and positions <= p."""
    t = _prompt(lm, ids)
    p = t.numel() - 1 if position is None else _check_int("position", position, 0, t.numel() - 1)
    if target is not None:
        target = _check_int("target token id", target, 0, _vocab(lm) - 1)
    sub = t[: p + 1][None]  # (1, p+1): later tokens cannot change the prediction at p
    logits, z, err = forward_from_latents(lm, sae, sub, hook, logits_to_keep=1, grad=True)
    lp_all = torch.log_softmax(logits[0, -1].float(), dim=-1)  # (vocab,)
    if target is None:
        target = int(lp_all.argmax())
    gz, gerr = torch.autograd.grad(lp_all[target], [z, err])
    return LatentGradients(position=p, target=target, logprob=float(lp_all[target].detach()), z=z.detach()[0].float(),
                           grad_z=gz[0].float(), err=err.detach()[0].float(), grad_err=gerr[0].float())


def attribute(lm: HookedLM, sae: SAE, ids: Sequence[int] | torch.Tensor, position: int | None = None,
              target: int | None = None, n_top: int = 20, n_verify: int = 10,
              hook: str | None = None) -> AttributionResult:
    """Why does the model predict `target` at `position` (default: the last token)? Attribution of every feature at
    every position <= p from one backward pass (error term fixed); the top n_top by |sum over positions|; the true
    effect of ablating each of the first n_verify (at every position <= p, one batched forward).

    target defaults to the model's top prediction at `position`."""
    n_top = _check_int("n_top", n_top, 1, MAX_TOP_FEATURES)
    n_verify = _check_int("n_verify", n_verify, 0, min(MAX_VERIFY, n_top))
    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    g = latent_gradients(lm, sae, ids, position, target, hook)
    secs["attribution"] = time.perf_counter() - t0
    p, target = g.position, g.target
    attr = g.attribution  # (p+1, d_sae)
    total = attr.sum(0)  # (d_sae,)
    n = min(n_top, max(1, int((attr != 0).any(0).sum())))
    top = total.abs().topk(n).indices
    best = attr[:, top].abs().argmax(0)  # (n,)
    feats = [FeatureAttribution(feature=int(f), attribution=float(total[f]), best_position=int(bp),
                                best_attribution=float(attr[bp, f]), activation=float(g.z[bp, f]),
                                ablation_estimate=-float(total[f]))
             for f, bp in zip(top.tolist(), best.tolist())]
    if n_verify:
        t0 = time.perf_counter()
        ver = feats[:n_verify]
        sub = _prompt(lm, ids)[: p + 1][None]
        rows = [()] + [(Edit(fa.feature, "ablate"),) for fa in ver]
        out = run_with_edits(lm, sae, sub.expand(len(rows), -1), rows, hook, logits_to_keep=1)[:, -1]  # (R, vocab)
        lps = torch.log_softmax(out, dim=-1)[:, target]  # (R,)
        for i, fa in enumerate(ver):
            fa.ablation_true = float(lps[i + 1] - lps[0])
        secs["verify"] = time.perf_counter() - t0
    return AttributionResult(position=p, target=target, target_logprob=g.logprob, features=feats,
                             error_attribution=float((g.err * g.grad_err).sum()), n_active=int((g.z != 0).sum()),
                             seconds=secs)


# ------------------------------------------------------------------ steered generation
@dataclass(frozen=True)
class Sampling:
    """temperature 0 = greedy (argmax); otherwise softmax(logits / temperature), nucleus top_p, per-row seed."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0


@dataclass
class Continuation:
    ids: list[int]  # new tokens only (ending with EOS when the model stopped)
    text: str | None  # decoded new tokens (None without a tokenizer)
    tokens: list[str] | None  # each new token decoded alone
    logprobs: list[float]  # log-prob of each new token under the distribution it was drawn from (before temperature)
    feature_acts: list[list[float]]  # (n_new, n_watch): pre-edit activation of each watched feature at each new token


@dataclass
class Generation:
    prompt_ids: list[int]
    edits: list[Edit]
    watch: list[int]  # the steered features, in the order of feature_acts columns
    prompt_acts: list[list[float]]  # (T, n_watch) activations on the prompt (identical in both runs)
    steered: Continuation
    default: Continuation | None
    stopped: str  # "length" | "eos" | "time"
    seconds: float


def _check_sampling(s: Sampling) -> Sampling:
    try:
        temp, top_p = float(s.temperature), float(s.top_p)
    except (TypeError, ValueError):
        raise UserError("temperature and top_p must be numbers") from None
    if not (math.isfinite(temp) and 0.0 <= temp <= MAX_TEMPERATURE):
        raise UserError(f"temperature {s.temperature!r} is out of range; allowed: 0 (greedy)..{MAX_TEMPERATURE:g}")
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise UserError(f"top_p {s.top_p!r} is out of range; allowed: greater than 0, at most 1")
    seed = _check_int("seed", s.seed, 0, 2**63 - 1)
    return Sampling(temp, top_p, seed)


def _pick(logits: torch.Tensor, s: Sampling, gens: list[torch.Generator]) -> torch.Tensor:
    """Next token per row: logits (B, vocab) float32 -> (B,) long."""
    if s.temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.cpu() / s.temperature, dim=-1)  # (B, vocab)
    if s.top_p < 1.0:
        sp, si = probs.sort(dim=-1, descending=True)
        keep = (sp.cumsum(-1) - sp) < s.top_p  # always keeps the most likely token
        probs = torch.zeros_like(probs).scatter_(-1, si, sp * keep)
    return torch.stack([torch.multinomial(probs[b], 1, generator=gens[b])[0] for b in range(len(gens))]).to(logits.device)


def _eos_ids(lm: HookedLM) -> set[int]:
    e = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    if e is None:
        e = getattr(lm.model.config, "eos_token_id", None)
    return set() if e is None else ({int(e)} if isinstance(e, int) else {int(i) for i in e})


@torch.no_grad()
def _generate_rows(lm: HookedLM, sae: SAE, prompt: torch.Tensor, rows: list[tuple[Edit, ...]], watch: list[int],
                   n_new: int, s: Sampling, hook: str, eos: set[int],
                   deadline: float | None) -> tuple[list[list[int]], list[list[float]], torch.Tensor, str]:
    """Decode len(rows) sequences from the same prompt as one batch with a KV cache.

    Returns new ids per row (cut after EOS), the watched latents (B, T + n_new, n_watch), and why it stopped."""
    B, T = len(rows), prompt.numel()
    gens = [torch.Generator().manual_seed(s.seed) for _ in range(B)]
    new: list[list[int]] = [[] for _ in range(B)]
    lps: list[list[float]] = [[] for _ in range(B)]
    done = [False] * B
    stopped = "length"
    with splice(lm, sae, rows, watch, hook) as sp:
        out = lm.model(input_ids=prompt[None].expand(B, -1).to(lm.device), use_cache=True, logits_to_keep=1)
        cache, step = out.past_key_values, 0
        while True:
            last = out.logits[:, -1].float()  # (B, vocab)
            tok = _pick(last, s, gens)  # (B,)
            lp = torch.log_softmax(last, dim=-1).gather(-1, tok[:, None])[:, 0].tolist()
            for b, i in enumerate(tok.tolist()):
                if not done[b]:
                    new[b].append(i)
                    lps[b].append(lp[b])
                    done[b] = i in eos
            step += 1
            if all(done):
                stopped = "eos"
                break
            if step >= n_new:
                break
            if deadline is not None and time.monotonic() > deadline:
                stopped = "time"
                break
            sp.offset = T + step - 1
            out = lm.model(input_ids=tok[:, None], past_key_values=cache, use_cache=True, logits_to_keep=1)
            cache = out.past_key_values
        if watch:  # latents at the last new token: run the model up to the hook only
            sp.offset, sp.stop = T + step - 1, True
            base = getattr(lm.model, lm.model.base_model_prefix, None) or lm.model
            try:
                base(input_ids=tok[:, None], past_key_values=cache, use_cache=True)
            except _StopForward:
                pass
    acts = torch.cat(sp.records, dim=1) if watch else torch.zeros(B, T + step, 0)  # (B, T + step, n_watch)
    return new, lps, acts, stopped


def _continuation(lm: HookedLM, ids: list[int], lps: list[float], acts: torch.Tensor) -> Continuation:
    tok = lm.tokenizer
    text = tok.decode(ids) if tok is not None else None
    tokens = [tok.decode([i]) for i in ids] if tok is not None else None
    return Continuation(ids=ids, text=text, tokens=tokens, logprobs=lps, feature_acts=acts[: len(ids)].tolist())


def generate(lm: HookedLM, sae: SAE, ids: Sequence[int] | torch.Tensor, edits: Sequence[Edit],
             max_new_tokens: int = 32, sampling: Sampling = Sampling(), *, with_default: bool = True,
             batched: bool = True, stop_at_eos: bool = True, time_limit: float | None = None,
             hook: str | None = None) -> Generation:
    """Steered continuation of a prompt (and the default one, side by side), with the KV cache.

    Edits with positions=None apply to every position, the prompt and each new token; positions count from the first
    prompt token, so positions >= len(prompt) reach into the new tokens. The default and steered runs go as one batch
    of 2 (batched=True) or one after the other; each row samples from its own generator seeded with sampling.seed,
    so a row's tokens do not depend on the other row. feature_acts are the steered features' activations read by the
    SAE at the hook before the edit (so a steered feature shows where the steered text itself evokes it)."""
    t0 = time.perf_counter()
    hook = _hook_of(lm, sae, hook)
    prompt = _prompt(lm, ids)
    n_new = _check_int("max_new_tokens", max_new_tokens, 1, MAX_NEW_TOKENS)
    s = _check_sampling(sampling)
    T = prompt.numel()
    if T + n_new > _context(lm):
        raise UserError(f"prompt ({T} tokens) + max_new_tokens ({n_new}) is {T + n_new}; "
                         f"the limit for {lm.name} is {_context(lm)}")
    edits = validate_edits(edits, sae.cfg.d_sae, T + n_new)
    watch = list(dict.fromkeys(e.feature for e in edits))
    eos = _eos_ids(lm) if stop_at_eos else set()
    deadline = None if time_limit is None else time.monotonic() + float(time_limit)
    rows = [(), edits] if with_default else [edits]
    if batched or len(rows) == 1:
        parts = [_generate_rows(lm, sae, prompt, rows, watch, n_new, s, hook, eos, deadline)]
    else:
        parts = [_generate_rows(lm, sae, prompt, [r], watch, n_new, s, hook, eos, deadline) for r in rows]
    # one (ids, logprobs, latents (T + n, n_watch)) per row, in the order of `rows`
    per_row = [(ids_, lps_, acts_) for new, lps, acts, _ in parts for ids_, lps_, acts_ in zip(new, lps, acts)]
    conts = [_continuation(lm, i, lp, a[T:]) for i, lp, a in per_row]
    reasons = [p[3] for p in parts]
    stopped = "time" if "time" in reasons else ("eos" if all(r == "eos" for r in reasons) else "length")
    return Generation(prompt_ids=prompt.tolist(), edits=list(edits), watch=watch, prompt_acts=per_row[-1][2][:T].tolist(),
                      steered=conts[-1], default=conts[0] if with_default else None, stopped=stopped,
                      seconds=time.perf_counter() - t0)
