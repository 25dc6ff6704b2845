"""The SAE splice: the activation at the SAE's hook replaced by the SAE's reconstruction of edited latents plus its
error term (see the package docstring), installed through HookedLM's public hook API."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch

from ..errors import UserError
from ..models import HookedLM
from ..saes import SAE, check_d_in
from .edits import STEER_MODES, Edit, prompt_ids, validate_edits

log = logging.getLogger(__name__)


def hook_of(lm: HookedLM, sae: SAE, hook: str | None) -> str:
    """The hook an SAE is spliced in at (its own unless given), checked to fit the model."""
    hook = hook or sae.cfg.hook_name
    if not hook:
        raise UserError("the SAE names no hook (cfg.hook_name is empty); pass hook='blocks.<L>.<kind>'")
    check_d_in(sae, lm.hook_width(hook), hook, lm.name)
    return hook


class EditSplice:
    """The hook body, row by row, edits in the order given: latent edits and additions accumulate as
    x + scale * (z_edit - z) @ W_dec + sum value * v; an orthogonal or cap edit acts on the activation as edited so
    far (as Neuronpedia applies its features one after the other). Records the watched (pre-edit) latents."""

    def __init__(self, sae: SAE, row_edits: Sequence[Sequence[Edit]], watch: Sequence[int] = ()):
        self.sae, self.row_edits, self.watch = sae, [tuple(r) for r in row_edits], list(watch)
        self.offset = 0  # absolute position of the first token of the next forward call (KV-cache steps)
        self.pads: list[int] | None = None  # left padding per row (batched prompts of different lengths)
        self.records: list[torch.Tensor] = []  # (B, T_call, n_watch) per forward call, pre-edit latents
        self.record_only = False  # record the latents and leave x as it is (a last step that only needs them)
        self.need_z = bool(self.watch) or any(e.mode in ("ablate", "clamp") for r in self.row_edits for e in r)
        W = sae.W_dec
        steer = sorted({e.feature for r in self.row_edits for e in r if e.mode in STEER_MODES})
        norms = W[steer].norm(dim=-1) if steer else torch.zeros(0)
        for f, n in zip(steer, norms.tolist()):
            if not n > 0:
                raise UserError(f"feature {f} has a zero decoder row: it gives no direction to steer along")
        self.unit = {f: W[f] / n for f, n in zip(steer, norms)}  # u = v / |v|

    def direction(self, e: Edit) -> torch.Tensor:
        return self.unit[e.feature] if e.normalize else self.sae.W_dec[e.feature]

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:  # (B, T, d_in) -> (B, T, d_in)
        sae = self.sae
        B, T, _ = x.shape
        if len(self.row_edits) not in (1, B):
            raise RuntimeError(f"splice has edits for {len(self.row_edits)} rows but the batch has {B}")
        W = sae.W_dec
        xs = x.to(device=W.device, dtype=W.dtype)  # (B, T, d_in)
        z = sae.encode(xs) if self.need_z else None  # (B, T, d_sae)
        if self.watch:
            self.records.append(z[..., self.watch].detach().float().cpu())
        if self.record_only:
            return None
        if not any(self.row_edits):
            return x
        scale, _ = sae.norm_stats(xs)  # (B, T, 1)
        pos = torch.arange(self.offset, self.offset + T, device=W.device)  # (T,)
        out = x.clone()
        for b in range(B):
            edits = self.row_edits[b if len(self.row_edits) == B else 0]
            if not edits:
                continue
            h = xs[b]  # (T, d_in): the activation before the pending additive delta
            delta = torch.zeros_like(xs[b])  # (T, d_in)
            cur: dict[int, torch.Tensor] = {}  # feature -> its latent after the edits so far, (T,)
            pos_b = pos - self.pads[b] if self.pads else pos  # the row's own positions (pads sit at negative ones)
            for e in edits:
                mask = torch.ones(T, dtype=torch.bool, device=W.device) if e.positions is None else \
                    torch.isin(pos_b, torch.tensor(e.positions, device=W.device))  # (T,)
                if not mask.any():
                    continue
                if e.mode == "add":
                    delta += (mask.to(W.dtype) * e.value)[:, None] * self.direction(e)
                    continue
                if e.mode in ("orthogonal", "cap"):
                    h, delta = h + delta, torch.zeros_like(delta)
                    u = self.unit[e.feature]
                    p = h @ u  # (T,): the projection on u
                    # orthogonal: (I - P) h + c P h = h + (c - 1)(h.u) u;  cap: h + (min(h.u, c) - h.u) u
                    step = (e.value - 1.0) * p if e.mode == "orthogonal" else p.clamp(max=e.value) - p
                    h = h + (step * mask.to(W.dtype))[:, None] * u
                    continue
                old = cur.get(e.feature, z[b, :, e.feature])  # (T,)
                new = torch.where(mask, torch.full_like(old, e.value), old)
                delta += ((new - old) * scale[b, :, 0])[:, None] * W[e.feature]
                cur[e.feature] = new
            out[b] = (h + delta).to(device=x.device, dtype=x.dtype)
        return out


@contextmanager
def splice(lm: HookedLM, sae: SAE, row_edits: Sequence[Sequence[Edit]], watch: Sequence[int] = (),
           hook: str | None = None) -> Iterator[EditSplice]:
    """Splice the SAE in at its hook for this thread's forward passes in this block; row_edits: one edit list per
    batch row (or a single list for every row). Yields the splice state (.offset for KV-cache steps, .records)."""
    state = EditSplice(sae, row_edits, watch)
    with lm.hooks({hook_of(lm, sae, hook): state}):
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
    t = prompt_ids(lm, ids)
    edits = validate_edits(edits, sae.cfg.d_sae, t.numel(), allow_empty=True)
    return run_with_edits(lm, sae, t[None], [edits], hook)[0]


# ------------------------------------------------------------------ reconstruction + error (attribution path)
class LatentSplice:
    """The hook body: x -> denormalize(decode(z)) + err with z = encode(x) a leaf (requires grad) and err detached."""

    def __init__(self, sae: SAE, z: torch.Tensor | None = None, grad: bool = True):
        self.sae, self.z_given, self.grad = sae, z, grad
        self.z: torch.Tensor | None = None  # (B, T, d_sae) leaf
        self.err: torch.Tensor | None = None  # (B, T, d_in) leaf (requires grad too, for the error attribution)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        sae = self.sae
        xs = x.detach().to(device=sae.W_dec.device, dtype=sae.W_dec.dtype)  # (B, T, d_in)
        stats = sae.norm_stats(xs)
        with torch.no_grad():
            z0 = sae.encode(xs)  # (B, T, d_sae)
            err = xs - sae.denormalize(sae.decode(z0), stats)
        z = (z0 if self.z_given is None else self.z_given.to(z0)).clone()
        self.z, self.err = z.requires_grad_(self.grad), err.requires_grad_(self.grad)
        if self.grad:
            # The layers before the hook ran without a graph (no_grad); record one from here on. Grad mode is
            # thread-local and the caller's no_grad block restores it when the forward pass returns.
            torch.set_grad_enabled(True)
        return (sae.denormalize(sae.decode(self.z), stats) + self.err).to(x.dtype)


def forward_from_latents(lm: HookedLM, sae: SAE, ids: torch.Tensor, hook: str | None = None,
                         logits_to_keep: int = 0, grad: bool = False,
                         z: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Run with x replaced by denormalize(decode(z)) + (x - denormalize(decode(encode(x)))): ids (B, T) ->
    (logits (B, T', vocab), z (B, T, d_sae), err (B, T, d_in)). z defaults to encode(x); with grad=True, z and err
    are leaves with requires_grad, so d(logits)/dz holds the error term fixed."""
    hook = hook_of(lm, sae, hook)
    state = LatentSplice(sae, z, grad)
    with lm.hooks({hook: state}), torch.no_grad():
        out = lm.model(input_ids=ids.to(lm.device), use_cache=False, logits_to_keep=logits_to_keep)
    assert state.z is not None and state.err is not None, "the splice hook did not fire"
    if grad and not out.logits.requires_grad:  # a module after the hook switched grad mode off: record everything
        log.warning("%s dropped the gradient after the hook; recomputing with a full graph", type(lm.model).__name__)
        state = LatentSplice(sae, z, grad)
        with lm.hooks({hook: state}), torch.enable_grad():
            out = lm.model(input_ids=ids.to(lm.device), use_cache=False, logits_to_keep=logits_to_keep)
    return out.logits, state.z, state.err
