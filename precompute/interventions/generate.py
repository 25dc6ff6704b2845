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


@dataclass
class _Rows:
    new: list[list[int]]  # new ids per row (cut after EOS)
    lps: list[list[float]]
    tops: list[list[list[tuple[int, float]]]]
    acts: torch.Tensor  # (B, T + n_new, n_watch) watched latents
    stopped: str
    kl: list[float] | None  # KL(shadow || row `shadow_of`) per step of that row


def check_n_logprobs(n: object) -> int:
    return check_int("n_logprobs", n, 0, LIMITS.max_logprobs)


@torch.no_grad()
def _generate_rows(lm: HookedLM, sae: SAE, prompt: torch.Tensor, rows: list[tuple[Edit, ...]], watch: list[int],
                   n_new: int, s: Sampling, hook: str, eos: set[int], deadline: float | None, n_lp: int = 0,
                   shadow_of: int | None = None) -> _Rows:
    """Decode len(rows) sequences from the same prompt as one batch with a KV cache.

    shadow_of=r adds one unedited row fed row r's tokens (teacher forcing), for KL(default || row r) per step."""
    run_rows = list(rows) + ([()] if shadow_of is not None else [])
    B, T = len(run_rows), prompt.numel()
    gens = [torch.Generator().manual_seed(s.seed) for _ in range(B)]
    new: list[list[int]] = [[] for _ in range(B)]
    lps: list[list[float]] = [[] for _ in range(B)]
    tops: list[list[list[tuple[int, float]]]] = [[] for _ in range(B)]
    kls: list[float] = []
    done = [False] * B
    stopped = "length"
    kw = cache_kwarg(lm.model)
    with splice(lm, sae, run_rows, watch, hook) as sp:
        out = lm.model(input_ids=prompt[None].expand(B, -1).to(lm.device), use_cache=True, logits_to_keep=1)
        cache, step = output_cache(out), 0
        while True:
            last = out.logits[:, -1].float()  # (B, vocab)
            tok = _pick(last, s, gens)  # (B,)
            lp_all = torch.log_softmax(last, dim=-1)  # (B, vocab)
            if shadow_of is not None:
                tok[-1] = tok[shadow_of]
                if not done[shadow_of]:
                    kls.append(float((lp_all[-1].exp() * (lp_all[-1] - lp_all[shadow_of])).sum().clamp_min(0)))
            lp = lp_all.gather(-1, tok[:, None])[:, 0].tolist()
            if n_lp:
                tv, ti = lp_all.topk(n_lp, dim=-1)
                top = [list(zip(i, v)) for i, v in zip(ti.tolist(), tv.tolist())]
            for b, i in enumerate(tok.tolist()):
                if not done[b]:
                    new[b].append(i)
                    lps[b].append(lp[b])
                    tops[b].append(top[b] if n_lp else [])
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
            out = lm.model(input_ids=tok[:, None], use_cache=True, logits_to_keep=1, **{kw: cache})
            cache = output_cache(out)
        if watch:  # latents at the last new token: run the model up to the hook only
            sp.offset, sp.record_only = T + step - 1, True
            lm.run_with_hooks(tok[:, None], stop_at=hook, use_cache=True, **{cache_kwarg(lm.base_model()): cache})
    acts = torch.cat(sp.records, dim=1) if watch else torch.zeros(B, T + step, 0)  # (B, T + step, n_watch)
    n = len(rows)
    return _Rows(new[:n], lps[:n], tops[:n], acts[:n], stopped, kls if shadow_of is not None else None)


def _continuation(lm: HookedLM, ids: list[int], lps: list[float], acts: torch.Tensor,
                  tops: list[list[tuple[int, float]]]) -> Continuation:
    tok = lm.tokenizer
    text = tok.decode(ids) if tok is not None else None
    tokens = [tok.decode([i]) for i in ids] if tok is not None else None
    return Continuation(ids=ids, text=text, tokens=tokens, logprobs=lps, feature_acts=acts[: len(ids)].tolist(),
                        top_logprobs=tops)


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
    prompt = prompt_ids(lm, ids)
    n_new = check_int("max_new_tokens", max_new_tokens, 1, LIMITS.max_new_tokens)
    n_lp = check_n_logprobs(n_logprobs)
    s = check_sampling(sampling)
    T = prompt.numel()
    if T + n_new > context_limit(lm):
        raise UserError(f"prompt ({T} tokens) + max_new_tokens ({n_new}) is {T + n_new}; "
                        f"the limit for {lm.name} is {context_limit(lm)}")
    edits = validate_edits(edits, sae.cfg.d_sae, T + n_new)
    watch = list(dict.fromkeys(e.feature for e in edits))
    eos = _eos_ids(lm) if stop_at_eos else set()
    deadline = None if time_limit is None else time.monotonic() + float(time_limit)
    rows = [(), edits] if with_default else [edits]
    want_kl = kl and with_default
    if batched or len(rows) == 1:
        parts = [_generate_rows(lm, sae, prompt, rows, watch, n_new, s, hook, eos, deadline, n_lp,
                                len(rows) - 1 if want_kl else None)]
    else:
        parts = [_generate_rows(lm, sae, prompt, [r], watch, n_new, s, hook, eos, deadline, n_lp,
                                0 if want_kl and i == len(rows) - 1 else None) for i, r in enumerate(rows)]
    # one (ids, logprobs, latents (T + n, n_watch), top logprobs) per row, in the order of `rows`
    per_row = [row for p in parts for row in zip(p.new, p.lps, p.acts, p.tops)]
    conts = [_continuation(lm, i, lp, a[T:], tp) for i, lp, a, tp in per_row]
    reasons = [p.stopped for p in parts]
    stopped = "time" if "time" in reasons else ("eos" if all(r == "eos" for r in reasons) else "length")
    return Generation(prompt_ids=prompt.tolist(), edits=list(edits), watch=watch, prompt_acts=per_row[-1][2][:T].tolist(),
                      steered=conts[-1], default=conts[0] if with_default else None, stopped=stopped,
                      seconds=time.perf_counter() - t0, kl=parts[-1].kl if want_kl else None)
