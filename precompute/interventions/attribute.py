"""Attribution: which features (at which positions) make the model predict a token, from one backward pass through
the reconstruction-plus-error splice, with the true ablation effect of the top features measured."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from ..config import LIMITS
from ..models import HookedLM
from ..saes import SAE
from .edits import Edit, check_int, prompt_ids, vocab_size
from .splice import forward_from_latents, run_with_edits


@dataclass
class FeatureAttribution:
    feature: int
    attribution: float  # sum over positions t <= p of z[t, f] * d logp(target) / d z[t, f]
    best_position: int  # the position with the largest |z * grad|
    best_attribution: float
    activation_at_best_position: float  # z[best_position, f]
    activation_at_position: float  # z[p, f], at the explained position itself
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
    t = prompt_ids(lm, ids)
    p = t.numel() - 1 if position is None else check_int("position", position, 0, t.numel() - 1)
    if target is not None:
        target = check_int("target token id", target, 0, vocab_size(lm) - 1)
    sub = t[: p + 1][None]  # (1, p+1): later tokens cannot change the prediction at p
    logits, z, err = forward_from_latents(lm, sae, sub, hook, logits_to_keep=1, grad=True)
    lp_all = torch.log_softmax(logits[0, -1].float(), dim=-1)  # (vocab,)
    if target is None:
        target = int(lp_all.argmax())
    gz, gerr = torch.autograd.grad(lp_all[target], [z, err])
    return LatentGradients(position=p, target=target, logprob=float(lp_all[target].detach()), z=z.detach()[0].float(),
                           grad_z=gz[0].float(), err=err.detach()[0].float(), grad_err=gerr[0].float())


def attribute(lm: HookedLM, sae: SAE, ids: Sequence[int] | torch.Tensor, position: int | None = None,
              target: int | None = None, n_top: int = LIMITS.attribution_top,
              n_verify: int = LIMITS.attribution_verify,
              hook: str | None = None) -> AttributionResult:
    """Why does the model predict `target` at `position` (default: the last token)? Attribution of every feature at
    every position <= p from one backward pass (error term fixed); the top n_top by |sum over positions|; the true
    effect of ablating each of the first n_verify (at every position <= p, one batched forward).

    target defaults to the model's top prediction at `position`."""
    n_top = check_int("n_top", n_top, 1, LIMITS.max_n_top)
    n_verify = check_int("n_verify", n_verify, 0, min(LIMITS.max_verify, n_top))
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
                                best_attribution=float(attr[bp, f]), activation_at_best_position=float(g.z[bp, f]),
                                activation_at_position=float(g.z[p, f]), ablation_estimate=-float(total[f]))
             for f, bp in zip(top.tolist(), best.tolist())]
    if n_verify:
        t0 = time.perf_counter()
        ver = feats[:n_verify]
        sub = prompt_ids(lm, ids)[: p + 1][None]
        rows = [()] + [(Edit(fa.feature, "ablate"),) for fa in ver]
        out = run_with_edits(lm, sae, sub.expand(len(rows), -1), rows, hook, logits_to_keep=1)[:, -1]  # (R, vocab)
        lps = torch.log_softmax(out, dim=-1)[:, target]  # (R,)
        for i, fa in enumerate(ver):
            fa.ablation_true = float(lps[i + 1] - lps[0])
        secs["verify"] = time.perf_counter() - t0
    return AttributionResult(position=p, target=target, target_logprob=g.logprob, features=feats,
                             error_attribution=float((g.err * g.grad_err).sum()), n_active=int((g.z != 0).sum()),
                             seconds=secs)
