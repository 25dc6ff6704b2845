"""The worker's interventions: steering, ablation on text, attribution and activation patching, through
precompute.interventions (the one SAE splice the tests check against independent hooks). Each runs in a thread under
the engine's model lock."""

from __future__ import annotations

import asyncio

import numpy as np

import torch

from saescope.precompute import interventions as iv

from ..errors import AppError, echo
from ..settings import WORKER
from .batcher import Engine
from .genbatch import batcher_of
from .wire import (AblateOut, AttributeIn, AttributeOut, AttributionOut, ChatSteerIn, ChatSteerOut, ContinuationOut,
                   EditsIn, FeatureScaleOut, PatchEntryOut, PatchIn, PatchOut, ScaleOut, SteerIn, SteerOut,
                   TokenLogprobOut, TopLogprobOut)


def _edits(body: EditsIn) -> list[iv.Edit]:
    return [iv.Edit(e.feature, e.mode, e.value, tuple(e.positions) if e.positions is not None else None,
                    e.normalize) for e in body.edits]


async def _run(engine: Engine, fn, *args, timeout: float):
    """fn(*args) in a thread under the model lock; ValueError (bad input) -> 422, too slow -> 504."""
    def locked():
        with engine.model_lock:
            return fn(*args)

    try:
        return await asyncio.wait_for(asyncio.to_thread(locked), timeout=timeout)
    except ValueError as err:
        raise AppError(str(err), 422) from err
    except asyncio.TimeoutError as err:
        raise AppError(f"no answer within {timeout:.0f} s (the worker is busy); retry shortly", 504) from err


async def _generate(engine: Engine, sae_id: str, req: iv.GenRequest):
    """A steering request through the generation batcher (decoded together with concurrent ones); bad input -> 422,
    too slow -> 504."""
    timeout = WORKER.generation_time_s + engine.timeout
    try:
        return await asyncio.wait_for(batcher_of(engine).submit(sae_id, req), timeout=timeout)
    except ValueError as err:
        raise AppError(str(err), 422) from err
    except asyncio.TimeoutError as err:
        raise AppError(f"no answer within {timeout:.0f} s (the worker is busy); retry shortly", 504) from err


def _ids(engine: Engine, body) -> np.ndarray:
    """The prompt's token ids, admitted by the one prompt rule every route shares (Engine.tokenize)."""
    return engine.tokenize(body.sae_id, body.text, body.ids)


def _check_features(engine: Engine, body: EditsIn) -> None:
    d_sae = engine.sae(body.sae_id).cfg.d_sae
    bad = [e.feature for e in body.edits if e.feature >= d_sae]
    if bad:
        raise AppError(f"feature {bad[0]} does not exist: {body.sae_id} has features 0 to {d_sae - 1}", 404)


def _cont(engine: Engine, c: iv.Continuation) -> ContinuationOut:
    strs = engine.strs(c.ids)
    tops = [[TopLogprobOut(token=engine.strs([i])[0], id=i, logprob=v) for i, v in top] for top in c.top_logprobs]
    return ContinuationOut(ids=c.ids, tokens=strs, text=c.text or "", logprobs=c.logprobs,
                           feature_acts=c.feature_acts,
                           token_logprobs=[TokenLogprobOut(token=t, id=i, logprob=lp, top_logprobs=top)
                                           for t, i, lp, top in zip(strs, c.ids, c.logprobs, tops)])


def _scale(s: iv.strength.Scale) -> ScaleOut:
    return ScaleOut(resid_norm=s.resid_norm, features=[FeatureScaleOut(**vars(f)) for f in s.features])


async def steer(engine: Engine, body: SteerIn) -> SteerOut:
    _check_features(engine, body)
    ids = _ids(engine, body)
    req = iv.GenRequest(ids.tolist(), _edits(body), body.max_new_tokens,
                        iv.Sampling(body.temperature, body.top_p, body.seed), time_limit=WORKER.generation_time_s,
                        n_logprobs=body.n_logprobs, kl=body.kl)
    g, scale = await _generate(engine, body.sae_id, req)
    assert g.default is not None
    return SteerOut(prompt_tokens=engine.strs(ids), watch=g.watch, default=_cont(engine, g.default),
                    steered=_cont(engine, g.steered), stopped=g.stopped, seconds=g.seconds, kl=g.kl,
                    scale=_scale(scale))


async def steer_chat(engine: Engine, body: ChatSteerIn) -> ChatSteerOut:
    """The default and the steered assistant reply to a conversation (the model's chat template applied)."""
    _check_features(engine, body)
    edits = _edits(body)
    msgs = [m.model_dump() for m in body.messages]
    try:
        text, ids = iv.chat.chat_prompt(engine.lm, msgs)
    except ValueError as err:
        raise AppError(str(err), 422) from err
    req = iv.GenRequest(ids, edits, body.max_new_tokens, iv.Sampling(body.temperature, body.top_p, body.seed),
                        time_limit=WORKER.generation_time_s, n_logprobs=body.n_logprobs, kl=body.kl)
    g, scale = await _generate(engine, body.sae_id, req)
    assert g.default is not None
    return ChatSteerOut(prompt_tokens=engine.strs(g.prompt_ids), watch=g.watch, default=_cont(engine, g.default),
                        steered=_cont(engine, g.steered), stopped=g.stopped, seconds=g.seconds, kl=g.kl,
                        scale=_scale(scale), template=text,
                        default_reply=iv.chat.reply_text(engine.lm, g.default.ids),
                        steered_reply=iv.chat.reply_text(engine.lm, g.steered.ids))


async def ablate(engine: Engine, body: EditsIn) -> AblateOut:
    _check_features(engine, body)
    sae = engine.sae(body.sae_id)
    ids = _ids(engine, body)
    r = await _run(engine, iv.ablation_effects, engine.lm, sae, ids.tolist(), _edits(body), timeout=engine.timeout)
    return AblateOut(tokens=engine.strs(ids), delta_logprob=r.delta_logprob, kl=r.kl, clean_logprob=r.clean_logprob,
                     feature_acts={str(f): v for f, v in r.feature_acts.items()})


async def attribute(engine: Engine, body: AttributeIn) -> AttributeOut:
    sae = engine.sae(body.sae_id)
    ids = _ids(engine, body)
    if body.position is not None and body.position >= len(ids):
        raise AppError(f"position {body.position} is outside the prompt's {len(ids)} tokens (0 to {len(ids) - 1})", 422)
    if body.target is not None and body.target >= len(engine.vocab):
        raise AppError(f"target token id {body.target} is outside the vocabulary (0 to {len(engine.vocab) - 1})", 422)
    n_verify = min(body.n_verify, body.n_top)

    def work():
        r = iv.attribute(engine.lm, sae, ids.tolist(), body.position, body.target, body.n_top, n_verify)
        with torch.no_grad():
            logits = engine.lm.model(input_ids=torch.as_tensor(ids[: r.position + 1], dtype=torch.long)[None]
                                     .to(engine.lm.device), use_cache=False, logits_to_keep=1).logits[0, -1]
        top = torch.log_softmax(logits.float(), -1).topk(5)
        return r, [(engine.strs([int(i)])[0], int(i), float(v)) for v, i in zip(top.values, top.indices)]

    r, preds = await _run(engine, work, timeout=engine.timeout)
    return AttributeOut(
        tokens=engine.strs(ids), position=r.position, target=r.target, target_token=engine.strs([r.target])[0],
        target_logprob=r.target_logprob, top_predictions=preds, error_attribution=r.error_attribution,
        n_active=r.n_active,
        features=[AttributionOut(feature=f.feature, attribution=f.attribution, best_position=f.best_position,
                                 activation_at_best_position=f.activation_at_best_position,
                                 activation_at_position=f.activation_at_position,
                                 ablation_estimate=f.ablation_estimate, ablation_true=f.ablation_true)
                  for f in r.features])


async def patch(engine: Engine, body: PatchIn) -> PatchOut:
    """Activation patching from a counterfactual prompt (precompute.interventions.patching)."""
    from saescope.precompute.interventions.patching import Metric
    from saescope.precompute.interventions.patching import patch as run_patch

    sae = engine.sae(body.sae_id)
    clean = engine.tokenize(body.sae_id, body.clean, body.clean_ids)
    corrupted = engine.tokenize(body.sae_id, body.corrupted, body.corrupted_ids)
    vocab = len(engine.vocab)
    tgt, oth = body.target, body.other
    for name, text in (("target", body.target_text), ("other", body.other_text)):
        if text is None:
            continue
        ids_ = engine.lm.tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids_) != 1:
            raise AppError(f"the {name} {echo(text)} is {len(ids_)} tokens; it must be exactly one token "
                           "(a leading space often matters, e.g. ' Paris')", 422)
        if name == "target":
            tgt = ids_[0]
        else:
            oth = ids_[0]
    for name, v in (("target", tgt), ("other", oth)):
        if v is not None and v >= vocab:
            raise AppError(f"{name} token id {v} is outside the vocabulary (0 to {vocab - 1})", 422)
    if body.features is not None:
        _check_feature_ids(engine, body.sae_id, body.features)

    def work():
        with torch.no_grad():
            def top(ids):
                x = torch.as_tensor(ids, dtype=torch.long)[None].to(engine.lm.device)
                return int(engine.lm.model(input_ids=x, use_cache=False, logits_to_keep=1).logits[0, -1].argmax())
            target = tgt if tgt is not None else top(clean)
            other = oth
            if body.metric == "logit_diff" and other is None:
                other = top(corrupted)
        m = Metric(body.metric, target, other if body.metric == "logit_diff" else None)
        return run_patch(engine.lm, sae, clean.tolist(), corrupted.tolist(), m, direction=body.direction,
                         align=body.align, features=body.features, positions=body.positions,
                         n_features=body.n_features, patch_error=body.patch_error)

    r = await _run(engine, work, timeout=engine.timeout)
    entry = lambda e: PatchEntryOut(**vars(e))  # noqa: E731
    m = r.metric
    return PatchOut(
        clean_tokens=engine.strs(clean), corrupted_tokens=engine.strs(corrupted), direction=r.direction,
        metric=m.kind, target=m.target, target_token=engine.strs([m.target])[0], other=m.other,
        other_token=engine.strs([m.other])[0] if m.other is not None else None, clean_metric=r.clean_metric,
        corrupted_metric=r.corrupted_metric, base_metric=r.base_metric, source_metric=r.source_metric,
        positions=r.positions, source_positions=r.source_positions, features=r.features,
        per_position=[entry(e) for e in r.per_position], per_feature=[entry(e) for e in r.per_feature],
        cells=r.cells, cell_estimates=r.cell_estimates, all_latents=r.all_latents, all_with_error=r.all_with_error,
        error_estimate=r.error_estimate, seconds=r.seconds)


def _check_feature_ids(engine: Engine, sae_id: str, feats: list[int]) -> None:
    d_sae = engine.sae(sae_id).cfg.d_sae
    bad = [f for f in feats if not 0 <= f < d_sae]
    if bad:
        raise AppError(f"feature {bad[0]} does not exist: {sae_id} has features 0 to {d_sae - 1}", 404)
