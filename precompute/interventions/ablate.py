"""Ablation on text: the effect of edits (typically one ablation) on every next-token prediction of a prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..models import HookedLM
from ..saes import SAE
from .edits import Edit, prompt_ids, validate_edits
from .splice import splice


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
    """Effect of the edits on each next-token prediction: one batch of 2 (clean, edited)."""
    t = prompt_ids(lm, ids)
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
