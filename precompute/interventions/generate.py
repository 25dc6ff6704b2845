"""Steered generation: the default and the steered continuation of a prompt side by side, with the KV cache, the
SAE spliced in at every step, seeded sampling per row, and a wall-time cap."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..config import LIMITS
from ..errors import UserError
from ..models import HookedLM, cache_kwarg, output_cache
from ..saes import SAE
from .edits import Edit, check_int, context_limit, prompt_ids, validate_edits
from .splice import hook_of, splice


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
    top_logprobs: list[list[tuple[int, float]]] = field(default_factory=list)  # per new token: the n most likely
    # (id, log-prob) of that step's distribution, most likely first (empty lists when n_logprobs is 0)


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
    # per new token of the steered continuation: KL(p_default || p_steered) of the next-token distribution, nats,
    # both given the same (steered) prefix: the default model is fed the steered tokens alongside (None without
    # the default)
    kl: list[float] | None = None


def check_sampling(s: Sampling) -> Sampling:
    try:
        temp, top_p = float(s.temperature), float(s.top_p)
    except (TypeError, ValueError):
        raise UserError("temperature and top_p must be numbers") from None
    if not (math.isfinite(temp) and 0.0 <= temp <= LIMITS.max_temperature):
        raise UserError(f"temperature {s.temperature!r} is out of range; allowed: 0 (greedy)..{LIMITS.max_temperature:g}")
    if not (math.isfinite(top_p) and 0.0 < top_p <= 1.0):
        raise UserError(f"top_p {s.top_p!r} is out of range; allowed: greater than 0, at most 1")
    seed = check_int("seed", s.seed, 0, LIMITS.max_seed)
    return Sampling(temp, top_p, seed)


def _pick(logits: torch.Tensor, samplings: Sequence[Sampling], gens: list[torch.Generator]) -> torch.Tensor:
    """Next token per row, each row with its own sampling: logits (B, vocab) float32 -> (B,) long."""
    out = logits.argmax(-1)
    for b, s in enumerate(samplings):
        if s.temperature == 0.0:
            continue
        probs = torch.softmax(logits[b].cpu() / s.temperature, dim=-1)  # (vocab,)
        if s.top_p < 1.0:
            sp, si = probs.sort(descending=True)
            keep = (sp.cumsum(-1) - sp) < s.top_p  # always keeps the most likely token
            probs = torch.zeros_like(probs).scatter_(-1, si, sp * keep)
        out[b] = torch.multinomial(probs, 1, generator=gens[b])[0].to(out.device)
    return out


def _eos_ids(lm: HookedLM) -> set[int]:
    e = getattr(getattr(lm.model, "generation_config", None), "eos_token_id", None)
    if e is None:
        e = getattr(lm.model.config, "eos_token_id", None)
    return set() if e is None else ({int(e)} if isinstance(e, int) else {int(i) for i in e})


def check_n_logprobs(n: object) -> int:
    return check_int("n_logprobs", n, 0, LIMITS.max_logprobs)


@dataclass(frozen=True)
class _Row:
    """One decoded sequence of a batch: its own prompt, edits, sampling (and seed), length, stopping and deadline.
    follow=r: teacher-forced with row r's tokens (the unedited shadow row of KL(default || steered))."""

    prompt: torch.Tensor  # (T,) long
    edits: tuple[Edit, ...]
    sampling: Sampling
    n_new: int
    eos: frozenset[int]
    n_lp: int
    deadline: float | None
    follow: int | None = None


@dataclass
class _RowOut:
    new: list[int]
    lps: list[float]
    tops: list[list[tuple[int, float]]]
    acts: torch.Tensor  # (T + n, n_watch) watched latents
    stopped: str  # "length" | "eos" | "time"
    kl: list[float]  # only for a row some shadow follows: KL(shadow || this row) per step


@torch.no_grad()
def _decode(lm: HookedLM, sae: SAE, hook: str, rows: Sequence[_Row], watch: list[int]) -> list[_RowOut]:
    """Decode every row as one KV-cached batch. Prompts of different lengths are left-padded (attention mask and
    position ids per row, splice positions per row), so each row computes what it would alone."""
    B = len(rows)
    lens = [r.prompt.numel() for r in rows]
    Tm = max(lens)
    pads = [Tm - n for n in lens]
    padded = any(pads)
    ids = torch.zeros(B, Tm, dtype=torch.long)
    mask = torch.zeros(B, Tm, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, pads[b]:] = r.prompt
        mask[b, pads[b]:] = 1
    pos = (mask.cumsum(-1) - 1).clamp_min(0)
    gens = [torch.Generator().manual_seed(r.sampling.seed) for r in rows]
    samplings = [r.sampling for r in rows]
    n_lp = max(r.n_lp for r in rows)
    outs = [_RowOut([], [], [], torch.zeros(0), "length", []) for _ in rows]
    done = [False] * B
    followed = {r.follow for r in rows if r.follow is not None}
    kw = cache_kwarg(lm.model)
    dev = lm.device

    def extra(m: torch.Tensor, p: torch.Tensor) -> dict:
        return {"attention_mask": m.to(dev), "position_ids": p.to(dev)} if padded else {}

    with splice(lm, sae, [r.edits for r in rows], watch, hook) as sp:
        sp.pads = pads
        out = lm.model(input_ids=ids.to(dev), use_cache=True, logits_to_keep=1, **extra(mask, pos))
        cache, step = output_cache(out), 0
        last_pos = pos[:, -1:]
        while True:
            last = out.logits[:, -1].float()  # (B, vocab)
            tok = _pick(last, samplings, gens)  # (B,)
            lp_all = torch.log_softmax(last, dim=-1)  # (B, vocab)
            for b, r in enumerate(rows):
                if r.follow is not None:
                    tok[b] = tok[r.follow]
                    if not done[r.follow]:
                        kl = (lp_all[b].exp() * (lp_all[b] - lp_all[r.follow])).sum().clamp_min(0)
                        outs[r.follow].kl.append(float(kl))
            lp = lp_all.gather(-1, tok[:, None])[:, 0].tolist()
            if n_lp:
                tv, ti = lp_all.topk(n_lp, dim=-1)
                ti, tv = ti.tolist(), tv.tolist()
            now = time.monotonic()
            for b, (r, i) in enumerate(zip(rows, tok.tolist())):
                if done[b]:
                    continue
                o = outs[b]
                o.new.append(i)
                o.lps.append(lp[b])
                o.tops.append(list(zip(ti[b][:r.n_lp], tv[b][:r.n_lp])) if r.n_lp else [])
                if i in r.eos:
                    done[b], o.stopped = True, "eos"
                elif len(o.new) >= r.n_new:
                    done[b] = True
                elif r.deadline is not None and now > r.deadline:
                    done[b], o.stopped = True, "time"
            # a shadow row ends with the row it follows
            for b, r in enumerate(rows):
                if r.follow is not None and done[r.follow] and not done[b]:
                    done[b], outs[b].stopped = True, outs[r.follow].stopped
            step += 1
            if all(done):
                break
            sp.offset = Tm + step - 1
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
            last_pos = last_pos + 1
            out = lm.model(input_ids=tok[:, None].to(dev), use_cache=True, logits_to_keep=1,
                           **extra(mask, last_pos), **{kw: cache})
            cache = output_cache(out)
        if watch:  # latents at the last new token: run the model up to the hook only
            sp.offset, sp.record_only = Tm + step - 1, True
            mask = torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], dim=1)
            lm.run_with_hooks(tok[:, None], stop_at=hook, use_cache=True, **extra(mask, last_pos + 1),
                              **{cache_kwarg(lm.base_model()): cache})
    acts = torch.cat(sp.records, dim=1) if watch else torch.zeros(B, Tm + step, 0)  # (B, Tm + step, n_watch)
    for b, o in enumerate(outs):
        o.acts = acts[b, pads[b]:]
        if b not in followed:
            o.kl = []
    return outs


@dataclass(frozen=True)
class GenRequest:
    """One steering request (the arguments of generate)."""

    ids: Sequence[int] | torch.Tensor
    edits: Sequence[Edit]
    max_new_tokens: int = LIMITS.default_new_tokens
    sampling: Sampling = Sampling()
    with_default: bool = True
    stop_at_eos: bool = True
    time_limit: float | None = None
    n_logprobs: int = 0
    kl: bool = False


def _continuation(lm: HookedLM, ids: list[int], lps: list[float], acts: torch.Tensor,
                  tops: list[list[tuple[int, float]]]) -> Continuation:
    tok = lm.tokenizer
    text = tok.decode(ids) if tok is not None else None
    tokens = [tok.decode([i]) for i in ids] if tok is not None else None
    return Continuation(ids=ids, text=text, tokens=tokens, logprobs=lps, feature_acts=acts[: len(ids)].tolist(),
                        top_logprobs=tops)


def _rows_of(lm: HookedLM, sae: SAE, req: GenRequest) -> tuple[list[_Row], list[int], torch.Tensor, tuple[Edit, ...]]:
    """A request validated and turned into rows: (default,) steered (, shadow following the steered row)."""
    prompt = prompt_ids(lm, req.ids)
    n_new = check_int("max_new_tokens", req.max_new_tokens, 1, LIMITS.max_new_tokens)
    n_lp = check_n_logprobs(req.n_logprobs)
    s = check_sampling(req.sampling)
    T = prompt.numel()
    if T + n_new > context_limit(lm):
        raise UserError(f"prompt ({T} tokens) + max_new_tokens ({n_new}) is {T + n_new}; "
                        f"the limit for {lm.name} is {context_limit(lm)}")
    edits = validate_edits(req.edits, sae.cfg.d_sae, T + n_new)
    watch = list(dict.fromkeys(e.feature for e in edits))
    eos = frozenset(_eos_ids(lm) if req.stop_at_eos else ())
    deadline = None if req.time_limit is None else time.monotonic() + float(req.time_limit)
    row = lambda e, follow=None: _Row(prompt, e, s, n_new, eos, n_lp, deadline, follow)  # noqa: E731
    rows = ([row(())] if req.with_default else []) + [row(edits)]
    if req.kl and req.with_default:
        rows.append(row((), len(rows) - 1))
    return rows, watch, prompt, edits


def _generation(lm: HookedLM, req: GenRequest, prompt: torch.Tensor, edits: tuple[Edit, ...], watch: list[int],
                all_watch: list[int], outs: list[_RowOut], seconds: float) -> Generation:
    T = prompt.numel()
    cols = [all_watch.index(f) for f in watch]
    conts = [_continuation(lm, o.new, o.lps, o.acts[T:][:, cols], o.tops) for o in outs]
    steered_i = 1 if req.with_default else 0
    reasons = [o.stopped for o in outs]
    stopped = "time" if "time" in reasons else ("eos" if all(r == "eos" for r in reasons) else "length")
    kl = outs[steered_i].kl if req.kl and req.with_default else None
    return Generation(prompt_ids=prompt.tolist(), edits=list(edits), watch=watch,
                      prompt_acts=outs[steered_i].acts[:T][:, cols].tolist(), steered=conts[steered_i],
                      default=conts[0] if req.with_default else None, stopped=stopped, seconds=seconds, kl=kl)


def generate_many(lm: HookedLM, sae: SAE, requests: Sequence[GenRequest], hook: str | None = None) -> list[Generation]:
    """Several steering requests as one KV-cached batch (left padding, per-row seeds, sampling and stopping): each
    request's tokens and log-probs are what it gets alone (tested), and the batch costs far less than the sum of
    its requests run one after the other. A request that fails validation raises before anything runs."""
    t0 = time.perf_counter()
    hook = hook_of(lm, sae, hook)
    prepared = [_rows_of(lm, sae, r) for r in requests]
    rows: list[_Row] = []
    spans = []
    for rs, *_ in prepared:
        base = len(rows)
        rows += [r if r.follow is None else _Row(r.prompt, r.edits, r.sampling, r.n_new, r.eos, r.n_lp, r.deadline,
                                                 r.follow + base) for r in rs]
        spans.append((base, len(rows)))
    all_watch = list(dict.fromkeys(f for _, w, _, _ in prepared for f in w))
    outs = _decode(lm, sae, hook, rows, all_watch)
    secs = time.perf_counter() - t0
    return [_generation(lm, req, prompt, edits, watch, all_watch, outs[a:b], secs)
            for req, (_, watch, prompt, edits), (a, b) in zip(requests, prepared, spans)]


def generate(lm: HookedLM, sae: SAE, ids: Sequence[int] | torch.Tensor, edits: Sequence[Edit],
             max_new_tokens: int = LIMITS.default_new_tokens, sampling: Sampling = Sampling(), *, with_default: bool = True,
             batched: bool = True, stop_at_eos: bool = True, time_limit: float | None = None,
             hook: str | None = None, n_logprobs: int = 0, kl: bool = False) -> Generation:
    """Steered continuation of a prompt (and the default one, side by side), with the KV cache.

    Edits with positions=None apply to every position, the prompt and each new token; positions count from the first
    prompt token, so positions >= len(prompt) reach into the new tokens. The default and steered runs go as one batch
    of 2 (batched=True) or one after the other; each row samples from its own generator seeded with sampling.seed,
    so a row's tokens do not depend on the other row. feature_acts are the steered features' activations read by the
    SAE at the hook before the edit (so a steered feature shows where the steered text itself evokes it).

    n_logprobs (0..LIMITS.max_logprobs): the most likely tokens of every step with their log-probs. kl=True (with the
    default): KL(p_default || p_steered) per step of the steered continuation, the default model fed the steered
    tokens as one more row of the batch."""
    t0 = time.perf_counter()
    hook = hook_of(lm, sae, hook)
    req = GenRequest(ids, edits, max_new_tokens, sampling, with_default, stop_at_eos, time_limit, n_logprobs, kl)
    rows, watch, prompt, ed = _rows_of(lm, sae, req)
    if batched or len(rows) == 1:
        outs = _decode(lm, sae, hook, rows, watch)
    else:  # one row at a time (a shadow row goes with the row it follows)
        groups = [[i] for i, r in enumerate(rows) if r.follow is None]
        for i, r in enumerate(rows):
            if r.follow is not None:
                next(g for g in groups if g[0] == r.follow).append(i)
        outs = [None] * len(rows)
        for g in groups:
            part = [rows[i] if rows[i].follow is None else
                    _Row(rows[i].prompt, rows[i].edits, rows[i].sampling, rows[i].n_new, rows[i].eos, rows[i].n_lp,
                         rows[i].deadline, 0) for i in g]
            for i, o in zip(g, _decode(lm, sae, hook, part, watch)):
                outs[i] = o
    return _generation(lm, req, prompt, ed, watch, watch, outs, time.perf_counter() - t0)
