"""Activation patching from a counterfactual prompt, through the SAE's latents.

Two prompts, clean and corrupted, of equal token length (position t <-> t) or with aligned positions given as
(clean position, corrupted position) pairs. One of them is the *base* run, the other the *source*:
direction "corrupted_into_clean" (default) runs the clean prompt with latents taken from the corrupted run (which
of them carry the corruption's effect?), "clean_into_corrupted" the other way round (which restore the clean
behaviour?).

At the SAE's hook of the base run, a patch of latent f at base position t (source position s) is

    x[t] += scale_b[t] * (z_src[s, f] - z_b[t, f]) * W_dec[f]        (the splice of splice.py, base statistics)

and patching the error term too adds err_src[s] - err_b[t] (err = x - unnorm(decode(encode(x))), each run with its
own statistics); every latent and the error at a position is x[t] := x_src[s] exactly (so for a residual-stream hook, patching
everything at every position gives the source's metric: later layers see only the residual stream).

The metric, at the base prompt's metric position (default: its last token): log p(target), or the logit difference
logit(target) - logit(other). For each patch the result is the metric after it and the fraction of the
base-to-source difference it moves:

    fraction = (m_patched - m_base) / (m_source - m_base)     (1: the patch alone gives the source's metric)

next to the attribution-patching estimate of the same change, from one backward pass on the base run
(reconstruction-plus-error splice, error fixed):

    estimate[t, f] = (z_src[s, f] - z_b[t, f]) * d metric / d z_b[t, f]

Reported: per position (the chosen latents, or all, at that position; with the error when asked), per feature (at
every chosen position), the position x feature cells of the features with the largest estimates, and everything
at once. Limits: config.LIMITS (max_patch_features, max_patch_rows).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from ..config import LIMITS
from ..errors import UserError
from ..models import HookedLM
from ..saes import SAE
from .edits import check_int, prompt_ids, vocab_size
from .splice import forward_from_latents, hook_of

DIRECTIONS = ("corrupted_into_clean", "clean_into_corrupted")
METRICS = ("logprob", "logit_diff")


@dataclass(frozen=True)
class Metric:
    kind: Literal["logprob", "logit_diff"] = "logprob"
    target: int = 0
    other: int | None = None  # the second token of logit_diff


@dataclass(frozen=True)
class Patch:
    """One patched run: (base position, features or None = every latent) cells, and whether the error term at
    those positions is patched too."""

    cells: tuple[tuple[int, tuple[int, ...] | None], ...] = ()
    error: bool = False


@dataclass
class PatchEntry:
    key: int  # the position (per-position rows) or the feature (per-feature rows)
    metric: float  # the metric after the real patch
    change: float  # metric - base metric
    fraction: float | None  # change / (source - base metric); None when the two prompts agree
    estimate: float  # attribution-patching estimate of change
    estimate_fraction: float | None


@dataclass
class PatchingResult:
    direction: str
    metric: Metric
    clean_metric: float
    corrupted_metric: float
    base_metric: float
    source_metric: float
    positions: list[int]  # patchable base positions (<= the metric position)
    source_positions: list[int]  # the source position aligned with each
    features: list[int]  # the heatmap's features (chosen, or the largest estimates)
    per_position: list[PatchEntry]
    per_feature: list[PatchEntry]
    cells: list[list[float]]  # (positions, features): real change of the metric
    cell_estimates: list[list[float]]
    all_latents: float  # metric with every latent at every patchable position patched
    all_with_error: float  # ... and the error term too (= the source metric up to rounding)
    error_estimate: list[float]  # per position: (err_src - err_b) . d metric / d err
    patched_features: list[int] | None  # the latents per-position rows patch (None: all)
    seconds: dict[str, float] = field(default_factory=dict)


def check_metric(lm: HookedLM, m: Metric) -> Metric:
    if m.kind not in METRICS:
        raise UserError(f"unknown metric {m.kind!r}; valid: {', '.join(METRICS)}")
    v = vocab_size(lm)
    target = check_int("target token id", m.target, 0, v - 1)
    other = None
    if m.kind == "logit_diff":
        if m.other is None:
            raise UserError("the logit_diff metric needs a second token (other): logit(target) - logit(other)")
        other = check_int("other token id", m.other, 0, v - 1)
    elif m.other is not None:
        raise UserError("other is only used by the logit_diff metric")
    return Metric(m.kind, target, other)


def metric_of(logits: torch.Tensor, m: Metric) -> torch.Tensor:
    """logits (..., vocab) float32 -> the metric (...)."""
    if m.kind == "logprob":
        return torch.log_softmax(logits, dim=-1)[..., m.target]
    return logits[..., m.target] - logits[..., m.other]


def align_positions(n_base: int, n_src: int, align: Sequence[tuple[int, int]] | None,
                    base_is_clean: bool) -> list[tuple[int, int]]:
    """(base position, source position) pairs, from equal lengths or the (clean, corrupted) pairs given."""
    if align is None:
        if n_base != n_src:
            c, x = (n_base, n_src) if base_is_clean else (n_src, n_base)
            raise UserError(f"the clean prompt has {c} tokens and the corrupted one {x}: patching needs equal token "
                            "lengths, or aligned positions (clean position, corrupted position) pairs")
        return [(t, t) for t in range(n_base)]
    if len(align) == 0:
        raise UserError("aligned positions are empty; give (clean position, corrupted position) pairs")
    if len(align) > LIMITS.max_prompt_tokens:
        raise UserError(f"{len(align)} aligned pairs given; the limit is {LIMITS.max_prompt_tokens}")
    nc, nx = (n_base, n_src) if base_is_clean else (n_src, n_base)
    out: dict[int, int] = {}
    for i, pair in enumerate(align):
        try:
            c, x = pair
        except (TypeError, ValueError):
            raise UserError(f"aligned pair {i} is not a (clean position, corrupted position) pair") from None
        c = check_int(f"aligned pair {i}: clean position", c, 0, nc - 1)
        x = check_int(f"aligned pair {i}: corrupted position", x, 0, nx - 1)
        b, s = (c, x) if base_is_clean else (x, c)
        if b in out and out[b] != s:
            raise UserError(f"aligned pair {i}: {'clean' if base_is_clean else 'corrupted'} position {b} is aligned "
                            "twice")
        out[b] = s
    return sorted(out.items())


class _PatchHook:
    """The hook body: row r of the batch gets patches[r] (all rows run the same base prompt)."""

    def __init__(self, sae: SAE, patches: Sequence[Patch], src_of: dict[int, int], x_src: torch.Tensor):
        self.sae, self.patches, self.src_of = sae, list(patches), src_of
        W = sae.W_dec
        self.x_src = x_src.to(W)  # (T_src, d_in)
        self.z_src = sae.encode(self.x_src)
        st = sae.norm_stats(self.x_src)
        self.err_src = self.x_src - sae.denormalize(sae.decode(self.z_src), st)

    def __call__(self, x: torch.Tensor) -> torch.Tensor | None:
        if not any(p.cells for p in self.patches):
            return None
        sae, W = self.sae, self.sae.W_dec
        xs = x.to(W)  # (R, T, d_in): identical rows
        z = sae.encode(xs[:1])[0]  # (T, d_sae)
        stats = sae.norm_stats(xs[:1])
        scale = stats[0][0, :, 0]  # (T,)
        err = (xs[:1] - sae.denormalize(sae.decode(z[None]), stats))[0]  # (T, d_in)
        out = x.clone()
        for r, p in enumerate(self.patches):
            if not p.cells:
                continue
            row = xs[r].clone()
            for t, feats in p.cells:
                s = self.src_of[t]
                if feats is None and p.error:
                    row[t] = self.x_src[s]
                    continue
                if feats is None:
                    dz = self.z_src[s] - z[t]  # (d_sae,)
                    row[t] = row[t] + scale[t] * (dz @ W)
                else:
                    idx = list(feats)
                    if idx:
                        row[t] = row[t] + scale[t] * ((self.z_src[s, idx] - z[t, idx]) @ W[idx])
                if p.error:
                    row[t] = row[t] + (self.err_src[s] - err[t])
            out[r] = row.to(x.dtype)
        return out


@torch.no_grad()
def run_patched(lm: HookedLM, sae: SAE, base: torch.Tensor, source: torch.Tensor, pairs: Sequence[tuple[int, int]],
                patches: Sequence[Patch], metric: Metric, position: int, hook: str | None = None,
                chunk: int | None = None) -> list[float]:
    """The metric at `position` of the base prompt for each patch (a Patch with no cells: the base run itself)."""
    hook = hook_of(lm, sae, hook)
    chunk = chunk or LIMITS.patch_batch
    src_of = dict(pairs)
    x_src = lm.activations(source[None], hook)[0]
    sub = base[: position + 1]
    out: list[float] = []
    for i in range(0, len(patches), chunk):
        part = list(patches[i:i + chunk])
        state = _PatchHook(sae, part, src_of, x_src)
        with lm.hooks({hook: state}):
            logits = lm.model(input_ids=sub[None].expand(len(part), -1).to(lm.device), use_cache=False,
                              logits_to_keep=1).logits[:, -1].float()
        out += metric_of(logits, metric).tolist()
    return out


def patching_estimates(lm: HookedLM, sae: SAE, base: torch.Tensor, source: torch.Tensor,
                       pairs: Sequence[tuple[int, int]], metric: Metric, position: int,
                       hook: str | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Attribution patching from one backward pass on the base run: per (patchable position, feature) the estimate
    (z_src - z_b) * d metric / d z_b (n_pairs, d_sae), the error term's (err_src - err_b) . d metric / d err per
    position (n_pairs,), and the base metric."""
    hook = hook_of(lm, sae, hook)
    logits, z, err = forward_from_latents(lm, sae, base[: position + 1][None], hook, logits_to_keep=1, grad=True)
    m = metric_of(logits[0, -1].float(), metric)
    gz, gerr = torch.autograd.grad(m, [z, err])
    with torch.no_grad():
        x_src = lm.activations(source[None], hook)[0].to(sae.W_dec)
        z_src = sae.encode(x_src)
        err_src = x_src - sae.denormalize(sae.decode(z_src), sae.norm_stats(x_src))
        b = torch.tensor([p for p, _ in pairs])
        s = torch.tensor([q for _, q in pairs])
        est = (z_src[s] - z.detach()[0, b]) * gz[0, b]  # (n_pairs, d_sae)
        est_err = ((err_src[s] - err.detach()[0, b]) * gerr[0, b]).sum(-1)  # (n_pairs,)
    return est.float(), est_err.float(), float(m.detach())


def _frac(change: float, diff: float) -> float | None:
    return change / diff if abs(diff) > 1e-9 else None


def patch(lm: HookedLM, sae: SAE, clean: Sequence[int] | torch.Tensor, corrupted: Sequence[int] | torch.Tensor,
          metric: Metric, *, direction: str = "corrupted_into_clean", align: Sequence[tuple[int, int]] | None = None,
          features: Sequence[int] | None = None, positions: Sequence[int] | None = None,
          n_features: int = LIMITS.patch_features, patch_error: bool = False, position: int | None = None,
          hook: str | None = None) -> PatchingResult:
    """The activation-patching experiment (see the module docstring). features: the latents each per-position row
    patches and the heatmap's columns (default: all latents per position, the heatmap's columns the n_features
    largest estimates); positions: the base positions patched (default: every aligned one up to the metric
    position, which defaults to the base prompt's last token)."""
    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    if direction not in DIRECTIONS:
        raise UserError(f"unknown direction {direction!r}; valid: {', '.join(DIRECTIONS)}")
    hook = hook_of(lm, sae, hook)
    metric = check_metric(lm, metric)
    tc, tx = prompt_ids(lm, clean), prompt_ids(lm, corrupted)
    base_is_clean = direction == "corrupted_into_clean"
    base, source = (tc, tx) if base_is_clean else (tx, tc)
    pairs = align_positions(base.numel(), source.numel(), align, base_is_clean)
    p = base.numel() - 1 if position is None else check_int("metric position", position, 0, base.numel() - 1)
    pairs = [(b, s) for b, s in pairs if b <= p]
    if positions is not None:
        if len(positions) == 0:
            raise UserError("positions is empty: give at least one base position to patch, or leave it out to patch "
                            "every aligned one")
        want = {check_int("position", q, 0, base.numel() - 1) for q in positions}
        missing = sorted(want - {b for b, _ in pairs})
        if missing:
            raise UserError(f"position {missing[0]} is not patchable: positions must be aligned and at most the "
                            f"metric position {p}")
        pairs = [(b, s) for b, s in pairs if b in want]
    if not pairs:
        raise UserError(f"no position to patch: none is aligned at or before the metric position {p}")
    d_sae = sae.cfg.d_sae
    if features is not None:
        # an empty list would leave no heatmap column: torch.tensor([]) is a float tensor, and indexing with it
        # raised IndexError (a 500 from the worker, whose connection uvicorn then reset)
        if len(features) == 0:
            raise UserError("features is empty: give at least one feature to patch, or leave it out to patch every "
                            "latent (the heatmap's columns then are the largest estimates)")
        if len(features) > LIMITS.max_patch_features:
            raise UserError(f"{len(features)} features given; the limit is {LIMITS.max_patch_features}")
        feats = list(dict.fromkeys(check_int("feature", f, 0, d_sae - 1) for f in features))
    n_features = check_int("n_features", n_features, 1, LIMITS.max_patch_features)
    # the metric of both prompts, at each one's own metric position (the base's, or the source's last token /
    # the position aligned with the base's)
    with torch.no_grad():
        src_pos = dict(align_positions(base.numel(), source.numel(), align, base_is_clean)).get(p, source.numel() - 1)
        mb = float(metric_of(lm.model(input_ids=base[: p + 1][None].to(lm.device), use_cache=False,
                                      logits_to_keep=1).logits[0, -1].float(), metric))
        ms = float(metric_of(lm.model(input_ids=source[: src_pos + 1][None].to(lm.device), use_cache=False,
                                      logits_to_keep=1).logits[0, -1].float(), metric))
    est, est_err, _ = patching_estimates(lm, sae, base, source, pairs, metric, p, hook)
    secs["estimate"] = time.perf_counter() - t0
    if features is None:
        top = est.abs().amax(0)
        live = int((top > 0).sum())
        cols = top.topk(min(n_features, max(live, 1))).indices.tolist()
    else:
        cols = feats
    pos = [b for b, _ in pairs]
    sel = None if features is None else tuple(cols)
    rows: list[Patch] = [Patch(((b, sel),), patch_error) for b in pos]  # per position
    rows += [Patch(tuple((b, (f,)) for b in pos)) for f in cols]  # per feature
    cells = [Patch(((b, (f,)),)) for b in pos for f in cols]
    if len(rows) + len(cells) + 2 > LIMITS.max_patch_rows:
        raise UserError(f"this experiment needs {len(rows) + len(cells) + 2} patched runs (positions x features); "
                        f"the limit is {LIMITS.max_patch_rows}: choose fewer positions or features")
    rows += cells
    rows += [Patch(tuple((b, None) for b in pos)), Patch(tuple((b, None) for b in pos), True)]
    t1 = time.perf_counter()
    got = run_patched(lm, sae, base, source, pairs, rows, metric, p, hook)
    secs["patch"] = time.perf_counter() - t1
    diff = ms - mb
    n_p, n_f = len(pos), len(cols)
    col_idx = torch.tensor(cols, dtype=torch.long)
    est_pos = (est if sel is None else est[:, col_idx]).sum(1) + (est_err if patch_error else 0)  # (n_p,)
    per_position = [PatchEntry(b, got[i], got[i] - mb, _frac(got[i] - mb, diff), float(est_pos[i]),
                               _frac(float(est_pos[i]), diff)) for i, b in enumerate(pos)]
    est_feat = est[:, col_idx].sum(0)
    per_feature = [PatchEntry(f, got[n_p + j], got[n_p + j] - mb, _frac(got[n_p + j] - mb, diff),
                              float(est_feat[j]), _frac(float(est_feat[j]), diff)) for j, f in enumerate(cols)]
    base_i = n_p + n_f
    cell = [[got[base_i + i * n_f + j] - mb for j in range(n_f)] for i in range(n_p)]
    cell_est = est[:, col_idx].tolist()
    secs["total"] = time.perf_counter() - t0
    return PatchingResult(
        direction=direction, metric=metric, clean_metric=mb if base_is_clean else ms,
        corrupted_metric=ms if base_is_clean else mb, base_metric=mb, source_metric=ms, positions=pos,
        source_positions=[s for _, s in pairs], features=cols, per_position=per_position, per_feature=per_feature,
        cells=cell, cell_estimates=cell_est, all_latents=got[-2], all_with_error=got[-1],
        error_estimate=est_err.tolist(), patched_features=None if sel is None else list(sel), seconds=secs)
